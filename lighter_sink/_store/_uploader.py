"""S3 uploads through s3fs in a process of their own, so that the client's Python never holds the caller's.

botocore spends about a millisecond of Python per request. In the process that runs the predict loop, that time
holds the interpreter lock the loop needs to launch its next step: with a request every millisecond the loop woke
up 5-6 ms late on average (``python -m benchmarks.stall``). So the sink's objects go to an upload process:
:class:`UploadingStore` is the S3 store of the sink's process, and its :meth:`~UploadingStore.put` hands each
object to the upload process (:mod:`._upload_process`), which stores it through a store of its own, opened from
the same url and options with the same retry policy, and answers with the outcome. Everything else (listing,
reading, deleting, conditional creates, streamed shards) stays in the sink's process.

Objects of :data:`IN_PROCESS_FROM` bytes and more are put from the sink's process, as before: few requests, many
bytes. The others' bytes are not copied on the sink's side: a thread sends the encoded buffers as they are over a
Unix socket (``sendmsg``, the kernel copies them, the lock released), and ``put`` answers once the upload process
stored the object, so the buffers live until then and the queue's byte bound still counts them. An object is
recorded only once the upload process said it was stored; its retries count in :attr:`Store.retries` as if they
had been made here; an error it raised (after its retries) is raised by ``put``, as the store's own would be.

The upload process imports the store alone (not torch: it starts in half a second), runs in a session of its own
(a Ctrl-C to the terminal reaches the sink, which decides what happens to the writes), and ends when its socket
closes: when the sink closes the store, or when the sink's process dies. If it dies first, every object it had
not confirmed fails with an error that says so, and the run fails: nothing it did not confirm is recorded, and no
``_SUCCESS`` is written. :meth:`~UploadingStore.fence` kills it: no object completes after an abort.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import queue
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio.to_thread

from lighter_sink._errors import SinkStateError
from lighter_sink._store._deadline import bounded
from lighter_sink._store._fsspec import AsyncFsStore
from lighter_sink._types import Buffer

__all__ = ["ANSWER", "CONFIG", "IN_PROCESS_FROM", "REQUEST", "UploadingStore", "dumped", "usable"]

logger = logging.getLogger(__name__)

# A request: its number, the object's CRC-32 (or -1), the key's length, the body's length; then key and body.
REQUEST = struct.Struct("!QqIQ")
# An answer: the request's number (0: the process's own start), the process's retries so far, the error's length
# (0: stored), then the error, pickled.
ANSWER = struct.Struct("!QQI")
CONFIG = struct.Struct("!I")
# Buffers one sendmsg call takes at most (the kernel's IOV_MAX is 1,024).
_IOV = 512
#: Objects from this size on are put from the sink's process: at their rate (tens a second) the client's Python per
#: request is a few percent of the interpreter, less than the two copies of their bytes through the socket cost on
#: a busy machine (short runs of 16 MiB predictions to S3: overlap 54-55% through the socket, 59-60% put here).
IN_PROCESS_FROM = 4 * 2**20
# How long the upload process may take to end once its socket closed, and to be reaped once killed.
_EXIT_WAIT = 30.0
# The package's __init__ imports torch (seconds); the upload process needs the store only.
_BOOT = (
    "import sys, types\n"
    "package = types.ModuleType('lighter_sink')\n"
    "package.__path__ = [sys.argv[1]]\n"
    "sys.modules['lighter_sink'] = package\n"
    "from lighter_sink._store._upload_process import serve\n"
    "serve(int(sys.argv[2]), int(sys.argv[3]))\n"
)


def usable(options: dict[str, Any]) -> bool:
    """Whether the upload process can be given these storage options (they travel pickled) on this system."""
    if os.name != "posix" or not hasattr(socket, "AF_UNIX"):
        return False
    try:
        pickle.dumps(options)
    except Exception as exc:
        logger.info("uploads run in this process: its storage options cannot be passed to another (%r)", exc)
        return False
    return True


class UploadingStore(AsyncFsStore):
    """An S3 store (s3fs) whose :meth:`put` is made by an upload process; see the module's docstring."""

    _own_retries = 0
    _process_retries = 0

    def __init__(self, *args: Any, config: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._config = config  # open_store's arguments for the upload process's own store
        self._process: subprocess.Popen[bytes] | None = None
        self._requests: socket.socket | None = None  # blocking, written by the sender thread
        self._answers: socket.socket | None = None  # non-blocking, read on the loop
        self._outbox: queue.SimpleQueue[list[Buffer] | None] = queue.SimpleQueue()
        self._batch: list[Buffer] = []  # requests put in this loop iteration, for the sender thread
        self._sender: threading.Thread | None = None
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._numbers = itertools.count(1)
        self._received = bytearray()
        self._failure: BaseException | None = None  # why no more object can be put
        self._loop: asyncio.AbstractEventLoop | None = None
        bound = self.retry.bound()
        # (what the upload process may take over all its attempts, and as long again for its queue)
        self._wait = None if bound is None else 2 * bound

    @property
    def retries(self) -> int:
        return self._own_retries + self._process_retries

    @retries.setter
    def retries(self, value: int) -> None:
        self._own_retries = value - self._process_retries

    @property
    def pid(self) -> int | None:
        """The upload process's id (None before :meth:`connect`)."""
        return None if self._process is None else self._process.pid

    async def connect(self) -> None:
        await super().connect()
        requests, their_requests = socket.socketpair()
        answers, their_answers = socket.socketpair()
        package = Path(__file__).resolve().parents[1]
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(package), str(their_requests.fileno()), str(their_answers.fileno())],
                pass_fds=(their_requests.fileno(), their_answers.fileno()),
                start_new_session=True,
            )
        finally:
            their_requests.close()
            their_answers.close()
        config = pickle.dumps(self._config)
        requests.sendall(CONFIG.pack(len(config)) + config)
        answers.setblocking(False)
        self._requests, self._answers = requests, answers
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(answers.fileno(), self._read_answers)
        self._sender = threading.Thread(target=self._send, name="lighter-sink-uploads", daemon=True)
        self._sender.start()

    async def put(self, key: str, buffers: Sequence[Buffer], crc32: int | None = None) -> None:
        if self._failure is not None:
            raise self._failure
        assert self._loop is not None, "connect() first"
        views = [memoryview(buffer).cast("B") for buffer in buffers]
        size = sum(v.nbytes for v in views)
        if size >= IN_PROCESS_FROM:
            await super().put(key, buffers, crc32)
            return
        number = next(self._numbers)
        name = key.encode()
        head = REQUEST.pack(number, -1 if crc32 is None else crc32, len(name), size)
        answer = self._pending[number] = self._loop.create_future()
        if not self._batch:
            self._loop.call_soon(self._hand_over)
        self._batch += [head, name, *views]
        try:
            if self._wait is None:
                await answer
            else:
                await bounded(lambda: answer, self._wait)
        except TimeoutError:
            raise TimeoutError(f"{key}: the upload process did not answer within {self._wait:g} s") from None
        finally:
            self._pending.pop(number, None)

    def fence(self) -> None:
        # (any thread: the pending puts fail on the loop, once the killed process's socket reports its end)
        super().fence()
        if self._failure is None:
            self._failure = SinkStateError(
                f"the sink writing to {self.url} was aborted: its upload process was stopped"
            )
        if self._process is not None and self._process.poll() is None:
            self._process.kill()

    async def aclose(self) -> None:
        try:
            await self._stop()
        finally:
            await super().aclose()

    async def _stop(self) -> None:
        if self._process is None:
            return
        self._fail(SinkStateError(f"the store of {self.url} is closed"))
        if self._batch:
            self._hand_over()
        self._outbox.put(None)  # the sender closes the socket once the rest is sent; the process then ends
        process = self._process
        try:
            await anyio.to_thread.run_sync(process.wait, _EXIT_WAIT, abandon_on_cancel=True)
        except subprocess.TimeoutExpired:
            logger.warning("the upload process of %s did not end within %g s: killed", self.url, _EXIT_WAIT)
            process.kill()
            await anyio.to_thread.run_sync(process.wait, _EXIT_WAIT, abandon_on_cancel=True)
        finally:
            self._close_answers()
            if self._sender is not None:
                await anyio.to_thread.run_sync(self._sender.join, _EXIT_WAIT, abandon_on_cancel=True)
            if self._requests is not None:
                self._requests.close()

    def _hand_over(self) -> None:
        """The requests put since the last loop iteration, to the sender thread at once: one wake-up of that thread
        (and one hand-over of the interpreter lock) per iteration, not one per object."""
        batch, self._batch = self._batch, []
        self._outbox.put(batch)

    def _send(self) -> None:
        """The sender thread: requests in the order they were put, several to a system call."""
        requests = self._requests
        assert requests is not None
        try:
            while (first := self._outbox.get()) is not None:
                batch = list(first)
                end = False
                while len(batch) < _IOV:
                    try:
                        more = self._outbox.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        end = True
                        break
                    batch += more
                _send_all(requests, batch)
                if end:
                    break
        except OSError as exc:  # the process is gone: the answers' end says so to every put
            logger.debug("the upload process of %s takes no more requests: %r", self.url, exc)
        finally:
            with contextlib.suppress(OSError):
                requests.shutdown(socket.SHUT_WR)

    def _read_answers(self) -> None:
        """On the loop, whenever answers arrived."""
        answers = self._answers
        assert answers is not None
        try:
            data = answers.recv(2**16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the process ended
            self._close_answers()
            code = None if self._process is None else self._process.poll()
            ended = "ended" if code is None else f"exited with code {code}"
            self._fail(
                self._failure
                or OSError(
                    f"the upload process of {self.url} {ended} before it answered; what it did not confirm is not "
                    "recorded (its error, if any, is above in stderr)"
                )
            )
            return
        received = self._received
        received += data
        position = 0
        while len(received) - position >= ANSWER.size:
            number, retries, size = ANSWER.unpack_from(received, position)
            if len(received) - position - ANSWER.size < size:
                break
            error = bytes(received[position + ANSWER.size : position + ANSWER.size + size]) if size else b""
            position += ANSWER.size + size
            self._process_retries = max(self._process_retries, retries)
            answer = self._pending.get(number)
            if error:
                exc = _loaded(error)
                if number == 0:  # the process could not start its store
                    self._fail(exc)
                elif answer is not None and not answer.done():
                    answer.set_exception(exc)
            elif answer is not None and not answer.done():
                answer.set_result(None)
        del received[:position]

    def _fail(self, error: BaseException) -> None:
        if self._failure is None:
            self._failure = error
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(self._failure)

    def _close_answers(self) -> None:
        if self._answers is not None and self._answers.fileno() >= 0:
            if self._loop is not None:
                self._loop.remove_reader(self._answers.fileno())
            self._answers.close()


def _send_all(sock: socket.socket, buffers: list[Buffer]) -> None:
    """``sock.sendmsg`` until every byte of ``buffers`` went (it may take part of them)."""
    views = [memoryview(b) for b in buffers]
    while views:
        sent = sock.sendmsg(views[:_IOV])
        while sent:
            if sent >= views[0].nbytes:
                sent -= views[0].nbytes
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0
        while views and not views[0].nbytes:
            views.pop(0)


def _loaded(error: bytes) -> BaseException:
    try:
        exc = pickle.loads(error)
    except Exception as problem:
        return OSError(f"the upload process failed, and its error could not be read: {problem!r}")
    return exc if isinstance(exc, BaseException) else OSError(f"the upload process failed: {exc!r}")


def dumped(exc: BaseException) -> bytes:
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)  # (an exception whose __init__ takes other arguments than its args fails here)
        return data
    except Exception:
        return pickle.dumps(OSError(f"{type(exc).__name__}: {exc}"))
