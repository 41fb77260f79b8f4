"""Storage: an fsspec url turned into a small async API (put, get, list, delete) with bounded retries.

The store puts bytes and knows nothing of tensors. Async filesystems (s3fs, gcsfs) are created inside the sink's
event loop, because an async fsspec instance belongs to the loop that made it; synchronous ones (``memory://``,
other fsspec backends) run in worker threads; local paths are written atomically (temporary name, then rename),
since fsspec's own local transactions stage files in the system temp directory, which may be another device.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import errno
import functools
import itertools
import logging
import os
import random
import sys
import tempfile
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import fsspec
from fsspec.core import split_protocol, url_to_fs

from lighter_sink._errors import DestinationError, SinkStateError
from lighter_sink._types import Buffer, Output

__all__ = ["DeleteError", "RetryPolicy", "Store", "is_transient", "open_store"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

# HTTP statuses and S3/GCS error codes that mean "try again", per AWS's and Google's retry guidance.
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "BandwidthLimitExceeded",
        "500",
        "502",
        "503",
        "504",
    }
)
# DeleteObjects takes at most 1,000 keys per request.
_S3_DELETE_BATCH = 1000
# s3fs's _pipe_file sends one PUT below twice its 50 MiB chunk size, a multipart upload from there on.
_S3_SINGLE_PUT = 100 * 2**20
_TRANSIENT_ERRNOS = frozenset(
    {errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE, errno.EAGAIN}
)


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [TimeoutError, ConnectionError]
    try:
        from botocore import exceptions as botocore_exceptions

        types += [botocore_exceptions.HTTPClientError, botocore_exceptions.ConnectionError]
    except ImportError:  # the s3 extra is not installed
        pass
    try:
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ServerTimeoutError]
    except ImportError:
        pass
    return tuple(types)


_TRANSIENT_TYPES = _transient_types()


def _status_and_code(exc: BaseException) -> tuple[int | None, str | None]:
    # botocore's ClientError keeps the parsed response; aiohttp/gcsfs errors carry .status or .code.
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        error = response.get("Error", {}) or {}
        meta = response.get("ResponseMetadata", {}) or {}
        status = meta.get("HTTPStatusCode")
        return (status if isinstance(status, int) else None), error.get("Code")
    status = getattr(exc, "status", None)
    if not isinstance(status, int):
        code_attr = getattr(exc, "code", None)
        status = code_attr if isinstance(code_attr, int) else None
    return status, None


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is worth retrying.

    Transient: timeouts, connection resets, throttling (``SlowDown``, 429) and server errors (5xx). Permanent:
    everything else, such as missing buckets, denied access or a full disk, which retrying cannot fix.
    Classification uses exception types, HTTP statuses and service error codes, never message text.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _TRANSIENT_TYPES):
            return True
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        status, code = _status_and_code(current)
        if (code is not None and code in _TRANSIENT_CODES) or (status is not None and status in _TRANSIENT_STATUS):
            return True
        current = current.__cause__ or current.__context__
    return False


class DeleteError(OSError):
    """Objects a bulk delete refused; ``response`` carries the service's code, as botocore's errors do."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.response = {"Error": {"Code": code}}


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently one object is written.

    Attributes:
        attempts: tries per object, the first included; only transient errors are retried.
        base_delay: first back-off in seconds; doubles each attempt, with full jitter.
        max_delay: ceiling of one back-off.
        timeout: seconds one attempt may take before it counts as a transient failure (``None``: no bound).
    """

    attempts: int = 5
    base_delay: float = 0.1
    max_delay: float = 5.0
    timeout: float | None = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("retry delays must be >= 0")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 or None, got {self.timeout}")

    def delay(self, attempt: int) -> float:
        """Back-off before retry number ``attempt`` (1-based): full jitter, as AWS recommends."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))

    def bound(self) -> float | None:
        """The longest one operation may take over all its attempts: each attempt's timeout, the longest back-offs."""
        if self.timeout is None:
            return None
        pauses = sum(min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1)) for attempt in range(1, self.attempts))
        return float(self.timeout * self.attempts + pauses)


class Store(ABC):
    """Bytes under one url. Keys are relative, '/'-separated and already validated."""

    def __init__(self, url: str, retry: RetryPolicy) -> None:
        self.url = url.rstrip("/")
        self.retry = retry
        self.retries = 0  # transient failures that were retried, for stats

    def __repr__(self) -> str:
        # storage options (credentials) are deliberately absent
        return f"<{type(self).__name__} {self.url!r}>"

    @property
    def is_local(self) -> bool:
        return False

    #: Capability: a thread-safe synchronous ``write_many(items) -> errors`` for callers already on a worker
    #: thread (they save a thread hop per group), or None when writes must go through :meth:`put_many`.
    #: ``since`` is the :attr:`fence_epoch` taken when the caller's work began (default: when this call began).
    write_many: Callable[..., list[BaseException | None]] | None = None

    @property
    def supports_write_many(self) -> bool:
        return self.write_many is not None

    #: Bounds the worker threads this store's I/O may occupy.
    limiter: anyio.CapacityLimiter | None = None

    #: Capability: writes want one contiguous buffer (object stores send one body); callers that can join
    #: buffers off the event loop should do so.
    contiguous_writes: bool = False

    #: Objects this store finished writing (advanced by worker threads): how a bounded thread call tells a
    #: store that is slow from one that is stuck.
    completed: int = 0
    _fence_epoch: int = 0

    def fence(self) -> None:
        """Let no write of this store complete from now on; synchronous, callable from any thread.

        An aborting sink calls it first: a worker thread stuck in a write (a dead mount) that wakes up later,
        long after its wait was abandoned, must not make an object or a control object appear. A write checks
        the fence right before it makes its object visible (a rename, a request); one already past that point
        (inside the system call) cannot be stopped.
        """
        self._fence_epoch += 1

    @property
    def fence_epoch(self) -> int:
        """Taken when a write begins, and given back to the check before it completes: a write begun before the
        latest :meth:`fence` never completes; one the sink begins afterwards on purpose (giving up its lease)
        does."""
        return self._fence_epoch

    def _check_fence(self, key: str, since: int) -> None:
        if since != self._fence_epoch:
            raise SinkStateError(f"{key} was not written to {self.url}: the sink was aborted")

    async def sync(self) -> None:  # noqa: B027 - optional hook: object stores acknowledge durable writes
        """Make everything this store wrote so far durable. Object stores answer a write once it is durable."""

    async def run_bounded(self, func: Callable[[], T], what: str) -> T:
        """Run ``func`` (writes through :attr:`write_many`) in one of this store's worker threads, bounded.

        The wait ends with a :class:`TimeoutError` once ``timeout`` seconds passed in which no object of this
        store was completed: a batch that keeps making progress is slow, not stuck. The thread itself cannot be
        stopped: it is abandoned (the fence keeps it from completing a write once the sink aborted).
        """
        timeout = self.retry.timeout
        call = anyio.to_thread.run_sync(func, limiter=self.limiter, abandon_on_cancel=True)
        if timeout is None:
            return await call
        task = asyncio.ensure_future(call)
        try:
            seen = self.completed
            while True:
                done, _ = await asyncio.wait((task,), timeout=timeout)
                if done:
                    return task.result()
                if self.completed == seen:
                    raise TimeoutError(f"{what}: no write finished within {timeout:g} s")
                seen = self.completed
        finally:
            if not task.done():
                task.cancel()  # the thread is abandoned; the task ends at once
                task.add_done_callback(_consume)

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]], first_attempt: int = 1) -> T:
        attempt = first_attempt
        timeout = self.retry.timeout
        while True:
            try:
                if timeout is None:
                    return await call()
                # asyncio's own timeout, not anyio.fail_after: a cancel scope per object cost about an eighth
                # of the event loop's time on small objects (the sink's loop is asyncio by design).
                async with asyncio.timeout(timeout):
                    return await call()
            except Exception as exc:
                error = exc
                if type(exc) is TimeoutError and not exc.args:  # asyncio's own, which says nothing
                    error = TimeoutError(f"{what}: no answer within {timeout:g} s")
                if attempt >= self.retry.attempts or not is_transient(error):
                    if error is exc:
                        raise
                    raise error from None
                self.retries += 1
                pause = self.retry.delay(attempt)
                logger.debug("transient error on %s (attempt %d), retrying in %.2fs: %r", what, attempt, pause, error)
                attempt += 1
                await anyio.sleep(pause)

    async def put(self, key: str, buffers: Sequence[Buffer], crc32: int | None = None) -> None:
        """Store one object under ``key``; it becomes visible whole or not at all.

        ``crc32`` is the body's CRC-32 when the caller computed it already: a store that sends an upload checksum
        sends this one instead of computing its own.
        """
        await self._retrying(key, lambda: self._put_once(key, buffers, crc32))

    async def retry_failed(
        self, items: Sequence[tuple[str, Sequence[Buffer]]], results: list[BaseException | None]
    ) -> list[BaseException | None]:
        """Give objects whose first attempt failed transiently the rest of their attempts."""
        for index, error in enumerate(results):
            if error is not None and is_transient(error) and self.retry.attempts > 1:
                key, buffers = items[index]
                self.retries += 1
                try:
                    await self._retrying(key, functools.partial(self._put_once, key, buffers, None), first_attempt=2)
                    results[index] = None
                except Exception as exc:
                    results[index] = exc
        return results

    async def put_many(self, items: Sequence[tuple[str, Sequence[Buffer]]]) -> list[BaseException | None]:
        """Store several objects concurrently; return each one's error (``None`` when stored)."""
        results: list[BaseException | None] = [None] * len(items)

        async def one(index: int, key: str, buffers: Sequence[Buffer]) -> None:
            try:
                await self.put(key, buffers)
            except Exception as exc:
                results[index] = exc

        async with anyio.create_task_group() as tg:
            for index, (key, buffers) in enumerate(items):
                tg.start_soon(one, index, key, buffers)
        return results

    @abstractmethod
    async def _put_once(self, key: str, buffers: Sequence[Buffer], crc32: int | None) -> None: ...

    @abstractmethod
    async def get(self, key: str) -> bytes:
        """Read a whole object; raises ``FileNotFoundError`` when absent."""

    @abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abstractmethod
    async def delete(self, keys: Sequence[str]) -> None:
        """Remove objects; missing ones are ignored."""

    @abstractmethod
    async def list(self, prefix: str = "") -> list[str]:
        """Keys of every object below ``prefix`` (recursively), relative to the url."""

    async def remove_incomplete(self) -> int:
        """Remove what interrupted writes left behind; return how many. Object stores leave nothing."""
        return 0

    async def create(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` only if no object is there; return whether this call created it.

        Atomic where the store can do it (an exclusive link locally, a conditional PUT on S3 and GCS); elsewhere
        a check then a write, which two writers racing within milliseconds can both pass.
        """
        if await self.exists(key):
            return False
        await self.put(key, [data])
        return True

    async def delete_prefix(self, prefix: str) -> None:
        await self.delete(await self.list(prefix))

    def open_output(self, key: str) -> Output:
        """An object written piece by piece: held in memory and stored in one PUT (object stores have no append)."""
        return _HeldOutput(self, key)

    async def aclose(self) -> None:  # noqa: B027 - optional hook: most stores hold no connection
        """Release connections."""


class _HeldOutput:
    """Object stores: the pieces are held and stored in one PUT of the whole object (no append, no rename)."""

    def __init__(self, store: Store, key: str) -> None:
        self._store = store
        self._key = key
        self._pieces: list[Buffer] = []

    async def write(self, data: Buffer) -> None:
        self._pieces.append(data)

    async def finish(self) -> None:
        pieces, self._pieces = self._pieces, []
        await self._store.put(self._key, [b"".join(pieces)])

    async def discard(self) -> None:
        self._pieces = []


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned task's outcome, so that asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def _join(root: str, key: str) -> str:
    return f"{root.rstrip('/')}/{key}" if key else root


def _relative(root: str, path: str) -> str:
    root = root.rstrip("/") + "/"
    return path[len(root) :] if path.startswith(root) else path


class _AsyncFsStore(Store):
    """An async fsspec filesystem (s3fs, gcsfs) used natively on the sink's loop.

    With ``s3_crc32`` an upload whose CRC-32 the caller computed sends it as the object's checksum
    (``x-amz-checksum-crc32``): the server verifies the body, and botocore, seeing the header, computes none.
    """

    contiguous_writes = True

    def __init__(
        self,
        url: str,
        retry: RetryPolicy,
        fs: Any,
        root: str,
        limiter: anyio.CapacityLimiter,
        *,
        s3_crc32: bool = False,
        s3: bool = False,
    ) -> None:
        super().__init__(url, retry)
        self._fs = fs
        self._root = root.rstrip("/")
        self._limiter = limiter
        self._s3_crc32 = s3_crc32
        self._s3 = s3

    async def _put_once(self, key: str, buffers: Sequence[Buffer], crc32: int | None) -> None:
        # (no fence: an asyncio request is cancelled with its task, and nothing of it wakes up later)
        data = buffers[0] if len(buffers) == 1 else b"".join(buffers)
        extra: dict[str, str] = {}
        # (s3fs switches to a multipart upload from 100 MiB, whose parts each carry their own checksum)
        if crc32 is not None and self._s3_crc32 and memoryview(data).nbytes < _S3_SINGLE_PUT:
            extra["ChecksumAlgorithm"] = "CRC32"
            extra["ChecksumCRC32"] = base64.b64encode(crc32.to_bytes(4, "big")).decode("ascii")
        # One PUT of the whole encoded object: much faster than file-object writes, and atomic on S3/GCS.
        async with self._limiter:
            await self._fs._pipe_file(_join(self._root, key), data, **extra)

    async def get(self, key: str) -> bytes:
        async with self._limiter:
            data: bytes = await self._retrying(key, lambda: self._fs._cat_file(_join(self._root, key)))
            return data

    async def exists(self, key: str) -> bool:
        return bool(await self._retrying(key, lambda: self._fs._exists(_join(self._root, key))))

    async def delete(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        paths = [_join(self._root, k) for k in keys]
        if self._s3:
            for start in range(0, len(paths), _S3_DELETE_BATCH):
                batch = paths[start : start + _S3_DELETE_BATCH]
                await self._retrying("delete", functools.partial(self._s3_delete, batch))
            return
        with contextlib.suppress(FileNotFoundError):
            await self._retrying("delete", lambda: self._fs._rm(paths))

    async def _s3_delete(self, paths: Sequence[str]) -> None:
        """One DeleteObjects request, every per-key error checked: S3 answers 200 even when keys were refused."""
        bucket = self._fs.split_path(paths[0])[0]
        objects = [{"Key": self._fs.split_path(p)[1]} for p in paths]
        out = await self._fs._call_s3("delete_objects", Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
        self._fs.invalidate_cache()
        errors = [e for e in out.get("Errors", []) if e.get("Code") != "NoSuchKey"]
        if errors:
            first = errors[0]
            raise DeleteError(
                f"{len(errors)} of {len(paths)} objects could not be deleted from {self.url}, for example "
                f"{first.get('Key')!r}: {first.get('Code')}: {first.get('Message', '')}",
                code=str(first.get("Code")),
            )

    async def create(self, key: str, data: bytes) -> bool:
        path = _join(self._root, key)
        try:
            await self._retrying(key, lambda: self._fs._pipe_file(path, data, mode="create"))
        except FileExistsError:
            return False
        return True

    async def list(self, prefix: str = "") -> list[str]:
        base = _join(self._root, prefix.rstrip("/"))
        self._fs.invalidate_cache()
        try:
            found = await self._retrying("list", lambda: self._fs._find(base, withdirs=False))
        except FileNotFoundError:
            return []
        return sorted(_relative(self._root, p) for p in found)

    async def aclose(self) -> None:
        # s3fs keeps its aiobotocore client in _s3creator and closes it only at garbage collection
        # (or not at all for asynchronous instances): close it here, on the loop that owns it.
        creator = getattr(self._fs, "_s3creator", None)
        if creator is not None:
            await creator.__aexit__(None, None, None)
            self._fs._s3creator = None
            self._fs._s3 = None
        session = getattr(self._fs, "_session", None)
        close = getattr(session, "close", None)
        if close is not None and not getattr(session, "closed", True):
            await close()


class _ThreadFsStore(Store):
    """A synchronous fsspec filesystem (``memory://`` and others) driven from worker threads."""

    def __init__(self, url: str, retry: RetryPolicy, fs: Any, root: str, limiter: anyio.CapacityLimiter) -> None:
        super().__init__(url, retry)
        self._fs = fs
        self._root = root.rstrip("/")
        self._limiter = limiter

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        # Abandoned on cancellation: a call stuck in the filesystem holds neither the loop nor a timeout up.
        return await anyio.to_thread.run_sync(func, *args, limiter=self._limiter, abandon_on_cancel=True)

    def _pipe(self, key: str, data: bytes, since: int) -> None:
        # (the fence is checked before the call only: a filesystem without renames has no later point to check)
        self._check_fence(key, since)
        self._fs.pipe_file(_join(self._root, key), data)

    async def _put_once(self, key: str, buffers: Sequence[Buffer], crc32: int | None) -> None:
        data = bytes(buffers[0]) if len(buffers) == 1 else b"".join(buffers)
        await self._run(self._pipe, key, data, self.fence_epoch)

    async def get(self, key: str) -> bytes:
        data: bytes = await self._retrying(key, lambda: self._run(self._fs.cat_file, _join(self._root, key)))
        return data

    async def exists(self, key: str) -> bool:
        return bool(await self._retrying(key, lambda: self._run(self._fs.exists, _join(self._root, key))))

    async def create(self, key: str, data: bytes) -> bool:
        path = _join(self._root, key)
        try:
            await self._retrying(
                key, lambda: self._run(functools.partial(self._fs.pipe_file, path, data, mode="create"))
            )
        except FileExistsError:
            return False
        return True

    async def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            path = _join(self._root, key)
            with contextlib.suppress(FileNotFoundError):
                await self._retrying(key, functools.partial(self._run, self._fs.rm_file, path))

    async def list(self, prefix: str = "") -> list[str]:
        base = _join(self._root, prefix.rstrip("/"))
        try:
            found = await self._retrying("list", lambda: self._run(lambda: self._fs.find(base, withdirs=False)))
        except FileNotFoundError:
            return []
        return sorted(_relative(self._root, p) for p in found)


_temp_counter = itertools.count()
_DIR_FDS = 256  # directory descriptors a local store keeps open at most


_SMALL = 64 * 2**10  # below this, one joined write beats a gathered one


def _write_all(fd: int, buffers: Sequence[Buffer]) -> None:
    """Write every buffer to ``fd``, in order, whatever the kernel accepts per call."""
    if len(buffers) == 1 and isinstance(buffers[0], bytes | bytearray):  # the common case: one call
        written = os.write(fd, buffers[0])
        if written == len(buffers[0]):
            return
        buffers = (memoryview(buffers[0])[written:],)
    if len(buffers) > 1 and sum(b.nbytes if isinstance(b, memoryview) else len(b) for b in buffers) <= _SMALL:
        buffers = (b"".join(buffers),)
    pending = [memoryview(b).cast("B") for b in buffers]
    while pending:
        written = os.writev(fd, pending) if len(pending) > 1 else os.write(fd, pending[0])
        while pending and written >= pending[0].nbytes:
            written -= pending[0].nbytes
            pending.pop(0)
        if pending and written:
            pending[0] = pending[0][written:]


TEMP_PREFIX = ".lsink."


def _new_run() -> str:
    return uuid.uuid4().hex[:16]


@functools.cache
def _syncfs() -> Callable[[int], int] | None:
    """Linux's ``syncfs(fd)``, which makes one filesystem's written data durable in one call; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):  # a C library without it (musl before 1.1.10, old glibc)
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def _fsync_path(path: str, *, directory: bool = False) -> None:
    """fsync a file or a directory by path; a file deleted since is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems cannot fsync a directory (EINVAL); their entries are durable by other means.
        if not (directory and exc.errno == errno.EINVAL):
            raise
    finally:
        os.close(fd)


class _LocalStore(Store):
    """A local (or mounted shared) directory, written atomically and in batches per thread call.

    Temporary files are ``{temp_prefix}{run}.{n}.tmp`` in the object's directory: a name of bounded length
    whatever the object's (a 245-byte name is legal; a name built from it would not be), in a namespace that
    says which run left it, so that a sweep removes only earlier runs' leftovers of its own prefix. ``run``
    must be unique per process (``n`` counts per process).

    ``durable``: control objects (keys starting with ``_``) are fsynced before their rename and their directory
    after it, and :meth:`sync` makes everything else durable.
    """

    def __init__(
        self,
        url: str,
        retry: RetryPolicy,
        root: str,
        limiter: anyio.CapacityLimiter,
        *,
        temp_prefix: str = TEMP_PREFIX,
        run: str | None = None,
        durable: bool = False,
    ) -> None:
        super().__init__(url, retry)
        run = _new_run() if run is None else run
        for what, value in (("temp_prefix", temp_prefix), ("run", run)):
            if not value or "/" in value or os.sep in value or len(value.encode()) > 64:
                raise ValueError(f"{what} must be 1 to 64 bytes without path separators, got {value!r}")
        self._root = os.path.abspath(root)
        self._limiter = self.limiter = limiter
        self._made_dirs: set[str] = set()
        self._dir_fds: dict[str, int] = {}
        self._dirs_lock = threading.Lock()
        self.temp_prefix = temp_prefix
        self.run = run
        self._temp_stem = f"{temp_prefix}{run}."
        self.durable = durable
        self._syncfs = _syncfs() if durable else None
        # What the next sync must make durable where syncfs is missing: files written, the directories they
        # were renamed into, and directories created (whose own entries live in their parents).
        self._track = durable and self._syncfs is None
        self._unsynced_files: set[str] = set()
        self._unsynced_dirs: set[str] = set()
        self._fresh_dirs: set[str] = set()
        self._abandoned = False  # a thread call was given up on: it may still use the directory descriptors
        self.write_many = self._write_many

    @property
    def is_local(self) -> bool:
        return True

    @property
    def root(self) -> str:
        return self._root

    async def _thread(self, func: Callable[..., T], *args: Any, limiter: anyio.CapacityLimiter | None = None) -> T:
        """Run ``func`` in a worker thread; on cancellation (a timeout, an abort) stop waiting for it at once."""
        try:
            return await anyio.to_thread.run_sync(func, *args, limiter=limiter, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            self._abandoned = True
            raise

    async def run_bounded(self, func: Callable[[], T], what: str) -> T:
        try:
            return await super().run_bounded(func, what)
        except (TimeoutError, anyio.get_cancelled_exc_class()):
            self._abandoned = True
            raise

    def _ensure_dir(self, directory: str) -> None:
        if directory in self._made_dirs:
            return
        os.makedirs(directory, exist_ok=True)
        with self._dirs_lock:
            self._made_dirs.add(directory)
            if self.durable:
                # a directory made by this run is durable only once its entry in its parent is
                while directory.startswith(self._root + os.sep):
                    self._fresh_dirs.add(directory)
                    directory = os.path.dirname(directory)

    def _directory_fd(self, directory: str) -> int | None:
        """An open descriptor of ``directory`` (created if needed), or None past the cache's bound.

        Paths relative to a directory descriptor spare the kernel a walk of the whole path twice per object
        (create and rename): about 30% more small files per second here. Descriptors are never evicted, since
        another thread may be using one; directories past the bound are written by absolute path.
        """
        fd = self._dir_fds.get(directory)
        if fd is not None:
            return fd
        self._ensure_dir(directory)
        with self._dirs_lock:
            fd = self._dir_fds.get(directory)
            if fd is None and len(self._dir_fds) < _DIR_FDS:
                fd = self._dir_fds[directory] = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        return fd

    def _write(self, key: str, buffers: Sequence[Buffer], since: int) -> None:
        self._check_fence(key, since)
        if "/" in key:
            directory, name = os.path.split(os.path.join(self._root, key))
        else:
            directory, name = self._root, key
        dir_fd = self._directory_fd(directory)
        # A temporary name in the same directory: rename is atomic only within one filesystem.
        temp = f"{self._temp_stem}{next(_temp_counter)}.tmp"
        if dir_fd is None:
            name = os.path.join(directory, name)
            temp = os.path.join(directory, temp)
        durable = self.durable and key.startswith("_")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=dir_fd)
        try:
            try:
                _write_all(fd, buffers)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            # A thread stuck above (a dead mount) may wake up long after the sink aborted: it must not make
            # its object appear then.
            self._check_fence(key, since)
            os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=dir_fd)
            raise
        # (from several threads at once an increment may be lost: it only has to move)
        self.completed += 1
        if durable:
            self._sync_entries(directory, dir_fd)
        elif self._track:
            self._unsynced_files.add(os.path.join(directory, name))
            self._unsynced_dirs.add(directory)

    def _sync_entries(self, directory: str, dir_fd: int | None) -> None:
        """Make the entries of ``directory`` durable, and its own entry (and its parents') if this run made it."""
        if dir_fd is None:
            _fsync_path(directory, directory=True)
        else:
            os.fsync(dir_fd)
        with self._dirs_lock:
            fresh = []
            while directory in self._fresh_dirs:
                self._fresh_dirs.discard(directory)
                directory = os.path.dirname(directory)
                fresh.append(directory)
        for parent in fresh:
            _fsync_path(parent, directory=True)

    def _write_many(
        self, items: Sequence[tuple[str, Sequence[Buffer]]], since: int | None = None
    ) -> list[BaseException | None]:
        if since is None:
            since = self.fence_epoch  # (a call stuck on its first object must not write the rest once woken)
        results: list[BaseException | None] = []
        for key, buffers in items:
            try:
                self._write(key, buffers, since)
                results.append(None)
            except Exception as exc:
                results.append(exc)
        return results

    async def _put_once(self, key: str, buffers: Sequence[Buffer], crc32: int | None) -> None:
        await self._thread(self._write, key, buffers, self.fence_epoch, limiter=self._limiter)

    async def _write_bounded(self, items: Sequence[tuple[str, Sequence[Buffer]]]) -> list[BaseException | None]:
        """One thread call for ``items``; each fails with a :class:`TimeoutError` when the call is given up on."""
        try:
            return await self.run_bounded(functools.partial(self._write_many, items), f"writing {len(items)} objects")
        except TimeoutError as exc:
            return [exc] * len(items)

    async def put_many(self, items: Sequence[tuple[str, Sequence[Buffer]]]) -> list[BaseException | None]:
        # One thread hop per batch rather than per object: tiny predictions are dominated by hop costs.
        return await self.retry_failed(items, await self._write_bounded(items))

    async def retry_failed(
        self, items: Sequence[tuple[str, Sequence[Buffer]]], results: list[BaseException | None]
    ) -> list[BaseException | None]:
        """Retry the objects that failed transiently, together, one bounded thread call per attempt.

        Together: objects of a batch that timed out are retried in one call, so that a stuck disk fails the
        batch after ``attempts`` timeouts, not one object after another.
        """
        for attempt in range(2, self.retry.attempts + 1):
            failed = [index for index, error in enumerate(results) if error is not None and is_transient(error)]
            if not failed:
                break
            self.retries += len(failed)
            await anyio.sleep(self.retry.delay(attempt - 1))
            retried = await self._write_bounded([items[index] for index in failed])
            for index, error in zip(failed, retried, strict=True):
                results[index] = error
        return results

    def open_output(self, key: str) -> Output:
        """A local object written piece by piece: streamed to a temporary file, renamed into place whole."""
        return _FileOutput(self, key)

    def temp_path(self, key: str) -> str:
        """The absolute path of a fresh temporary file next to ``key`` (no I/O: the caller makes the directory).

        For writers that stream a file themselves and then :meth:`replace` it into place: a sweep treats it
        as this run's, and :meth:`list` does not show it.
        """
        directory = os.path.dirname(os.path.join(self._root, key))
        return os.path.join(directory, f"{self._temp_stem}{next(_temp_counter)}.tmp")

    def replace(self, temp: str, key: str, since: int) -> None:
        """Make a finished temporary file (from :meth:`temp_path`) the object ``key``: fenced (``since`` is the
        :attr:`fence_epoch` taken when its writing began) and durable as the store's own writes. Synchronous:
        call it from a worker thread."""
        path = os.path.join(self._root, key)
        self._check_fence(key, since)
        if self.durable:
            _fsync_path(temp)
        self._check_fence(key, since)
        os.replace(temp, path)
        self.completed += 1
        if self.durable:
            self._sync_entries(os.path.dirname(path), None)

    async def sync(self) -> None:
        """Make everything this store wrote durable (nothing to do unless ``durable``).

        Linux: one ``syncfs`` of the root's filesystem (every file and directory at once, and only that
        filesystem). Elsewhere: an fsync of each file and directory written or made since the last sync.
        Bounded by the retry policy (its timeout times its attempts), in one attempt: a second sync would wait
        on the same disk.
        """
        if not self.durable:
            return
        bound = self.retry.bound()
        call = self._thread(self._sync_now)
        if bound is None:
            await call
            return
        try:
            async with asyncio.timeout(bound) as scope:
                await call
        except TimeoutError:
            if not scope.expired():
                raise
            raise TimeoutError(f"making the objects under {self.url} durable took more than {bound:g} s") from None

    def _sync_now(self) -> None:
        with self._dirs_lock:
            files, self._unsynced_files = self._unsynced_files, set()
            dirs, self._unsynced_dirs = self._unsynced_dirs, set()
            fresh, self._fresh_dirs = self._fresh_dirs, set()
        # (copies: a write finishing right now may still add to the old sets; it is not promised to this sync)
        files, dirs, fresh = set(files), set(dirs), set(fresh)
        try:
            syncfs = self._syncfs
            if syncfs is not None:
                fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    if syncfs(fd) != 0:
                        code = ctypes.get_errno()
                        raise OSError(code, f"syncfs failed: {os.strerror(code)}", self._root)
                finally:
                    os.close(fd)
                return
            for path in files:
                _fsync_path(path)
            for directory in dirs | {os.path.dirname(d) for d in fresh}:
                _fsync_path(directory, directory=True)
        except BaseException:
            with self._dirs_lock:  # still to be made durable: the next sync tries again
                self._unsynced_files |= files
                self._unsynced_dirs |= dirs
                self._fresh_dirs |= fresh
            raise

    async def aclose(self) -> None:
        with self._dirs_lock:
            fds, self._dir_fds = list(self._dir_fds.values()), {}
        if self._abandoned:
            # A thread given up on may still write relative to these descriptors: closing them could let a
            # reused number point it at another file. They are few and close with the process.
            return
        for fd in fds:
            os.close(fd)

    def _is_temporary(self, name: str) -> bool:
        """Whether ``name`` is a temporary file of this store's prefix, whichever run wrote it."""
        return name.startswith(self.temp_prefix) and name.endswith(".tmp")

    async def remove_incomplete(self) -> int:
        """Remove temporary files of this store's prefix that another run left (an earlier, killed one).

        This run's own are kept: they may be writes in flight. Other prefixes are other outputs' namespaces.
        """
        own = self._temp_stem

        def sweep() -> int:
            removed = 0
            for directory, _dirs, files in os.walk(self._root):
                for name in files:
                    if self._is_temporary(name) and not name.startswith(own):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(directory, name))
                            removed += 1
            return removed

        removed = await self._retrying("removing temporary files", lambda: self._thread(sweep))
        if removed:
            logger.info("removed %d temporary files left by an interrupted run under %s", removed, self.url)
        return removed

    async def get(self, key: str) -> bytes:
        path = os.path.join(self._root, key)

        def read() -> bytes:
            with open(path, "rb") as f:
                return f.read()

        return await self._retrying(key, lambda: self._thread(read, limiter=self._limiter))

    async def exists(self, key: str) -> bool:
        path = os.path.join(self._root, key)
        return await self._retrying(key, lambda: self._thread(os.path.exists, path))

    async def create(self, key: str, data: bytes) -> bool:
        path = os.path.join(self._root, key)
        since = self.fence_epoch

        def create() -> bool:
            self._check_fence(key, since)
            return _create_file(path, data, durable=self.durable)

        return await self._retrying(key, lambda: self._thread(create))

    async def delete(self, keys: Sequence[str]) -> None:
        def remove() -> None:
            parents = set()
            for key in keys:
                path = os.path.join(self._root, key)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                parents.add(os.path.dirname(path))
            # Object stores have no directories: leave no empty ones behind either (the _parts/ tree).
            for deepest in sorted(parents, key=len, reverse=True):
                directory = deepest
                while directory.startswith(self._root + os.sep):
                    try:
                        os.rmdir(directory)
                    except OSError:  # not empty, or already gone
                        break
                    with self._dirs_lock:
                        self._made_dirs.discard(directory)
                        self._fresh_dirs.discard(directory)
                        stale = self._dir_fds.pop(directory, None)
                    if stale is not None:
                        os.close(stale)
                    directory = os.path.dirname(directory)

        await self._retrying("delete", lambda: self._thread(remove, limiter=self._limiter))

    async def list(self, prefix: str = "") -> list[str]:
        base = os.path.join(self._root, prefix)

        def walk() -> list[str]:
            if os.path.isfile(base):
                return [prefix]
            keys = []
            for directory, _dirs, files in os.walk(base):
                for name in files:
                    if self._is_temporary(name):
                        continue  # an unfinished atomic write
                    full = os.path.join(directory, name)
                    keys.append(os.path.relpath(full, self._root).replace(os.sep, "/"))
            return sorted(keys)

        return await self._retrying("list", lambda: self._thread(walk, limiter=self._limiter))


_OUTPUT_PIECE = 1 << 20  # a local output is written in pieces of this size


class _FileOutput:
    """A local object streamed to a hidden temporary file and renamed into place when complete."""

    def __init__(self, store: _LocalStore, key: str) -> None:
        self._store = store
        self._key = key
        # a temporary name of the store's own (bounded whatever the key; swept after a crash)
        self._temp = store.temp_path(key)
        self._since = store.fence_epoch  # (a write stuck from before an abort never replaces the object)
        self._file: Any = None
        self._pieces: list[Buffer] = []
        self._size = 0

    async def write(self, data: Buffer) -> None:
        self._pieces.append(data)
        self._size += memoryview(data).nbytes
        if self._size >= _OUTPUT_PIECE:
            await self._spill()

    async def _spill(self) -> None:
        pieces, self._pieces, self._size = self._pieces, [], 0

        def write() -> None:
            if self._file is None:
                os.makedirs(os.path.dirname(self._temp), exist_ok=True)
                self._file = open(self._temp, "wb")  # noqa: SIM115 - closed in finish() or discard()
            self._file.writelines(pieces)

        # (an abort does not wait for a write stuck on a dead mount; the store's fence keeps it from landing)
        await anyio.to_thread.run_sync(write, abandon_on_cancel=True)

    async def finish(self) -> None:
        await self._spill()

        def close() -> None:
            self._file.close()
            self._store.replace(self._temp, self._key, self._since)  # fenced and, where asked, durable

        await anyio.to_thread.run_sync(close, abandon_on_cancel=True)

    async def discard(self) -> None:
        def remove() -> None:
            if self._file is not None:
                self._file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._temp)

        await anyio.to_thread.run_sync(remove)


def _write_and_close(fd: int, data: bytes, *, durable: bool) -> None:
    try:
        _write_all(fd, [data])
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _create_file(path: str, data: bytes, *, durable: bool) -> bool:
    """Create ``path`` holding ``data`` unless it exists, atomically: written aside, then hard-linked into place
    (a link fails if the name exists, and a reader never sees the file half written)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    # (a name no sweep of temporary files matches: another output's sink sweeping this directory must not
    # remove it between the write and the link)
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".lsink-create")
    try:
        _write_and_close(fd, data, durable=durable)
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
        except OSError as exc:  # a filesystem without hard links: an exclusive create, then the bytes
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            try:
                target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                return False
            _write_and_close(target, data, durable=durable)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def check_local_destination(path: str) -> None:
    """Refuse a local destination that is a regular file or cannot be created and written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise DestinationError(f"{path} is a regular file; expected a directory (or a new path)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise DestinationError(f"cannot create the directory {path}: {exc.strerror}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise DestinationError(f"the directory {path} is not writable")


def protocol_of(url: str) -> str:
    protocol = split_protocol(url)[0]
    return protocol or "file"


def is_local_url(url: str) -> bool:
    return protocol_of(url) in ("file", "local")


def local_path(url: str) -> str:
    """The filesystem path of a local url (``file://`` prefix removed)."""
    return os.path.abspath(split_protocol(url)[1] if "://" in url else url)


def _s3_options(
    options: dict[str, Any], concurrency: int, retry: RetryPolicy, upload_checksums: bool
) -> dict[str, Any]:
    # botocore's pool of 10 connections silently caps concurrency, and botocore (5 attempts) and s3fs
    # (5 retries) stack their own retries under ours: give the sink's policy sole control of retries and time.
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("max_pool_connections", max(10, concurrency + 4))
    # (botocore's max_attempts counts retries after the first try; total_max_attempts counts every try)
    config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
    # botocore checksums every PUT body (CRC32) by default, a CPU cost per byte on the event loop's thread. The
    # sink's own objects come with their CRC-32 and skip it; the rest (parts, manifest, marker) are small.
    config.setdefault("request_checksum_calculation", "when_supported" if upload_checksums else "when_required")
    if upload_checksums and _is_https(options):
        # botocore skips hashing a body for the signature over TLS only when it computed the checksum header
        # itself; for a header the caller provides it would SHA-256 every body on the loop. Over TLS the signed
        # CRC-32 header and TLS's own integrity make that hash redundant (what botocore does with its own
        # checksums); plain http keeps the signed payload hash, as botocore does there.
        s3_config = dict(config.get("s3") or {})
        s3_config.setdefault("payload_signing_enabled", False)
        config["s3"] = s3_config
    if retry.timeout is not None:
        config.setdefault("connect_timeout", min(10.0, retry.timeout))
        config.setdefault("read_timeout", retry.timeout)
    return {**options, "config_kwargs": config}


def _is_https(options: Mapping[str, Any]) -> bool:
    """Whether an s3fs client with these options talks TLS (AWS's default endpoints do)."""
    client_kwargs = options.get("client_kwargs") or {}
    endpoint = options.get("endpoint_url") or client_kwargs.get("endpoint_url")
    if endpoint:
        return str(endpoint).lower().startswith("https://")
    return bool(options.get("use_ssl", client_kwargs.get("use_ssl", True)))


async def open_store(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    concurrency: int = 16,
    retry: RetryPolicy | None = None,
    backend: str = "fsspec",
    upload_checksums: bool = True,
    temp_prefix: str = TEMP_PREFIX,
    run: str | None = None,
    durable: bool = True,
) -> Store:
    """Open the store for ``url``. Must run inside the event loop that will use the store.

    ``backend`` is ``"fsspec"`` (every protocol) or ``"obstore"`` (S3 only; see ``_obstore``).
    ``upload_checksums`` has the server verify each upload body: on S3 through s3fs with the CRC-32 a caller
    passes to :meth:`Store.put` (botocore computes its own CRC32 for bodies that come without one).
    Local directories only: temporary files are named ``{temp_prefix}{run}.{n}.tmp`` (``run``: unique per
    process; a fresh one when None), and ``durable`` fsyncs control objects and lets :meth:`Store.sync` make
    the rest durable.
    """
    retry = retry or RetryPolicy()
    options = dict(storage_options or {})
    if backend == "obstore" and not is_local_url(url):
        from lighter_sink._obstore import open_obstore

        return open_obstore(url, options, retry, upload_checksums)
    limiter = anyio.CapacityLimiter(concurrency)
    if is_local_url(url):
        # Writes to one local directory contend on the directory lock and, for small files, on the GIL:
        # more threads than cores only add switching. Network filesystems want more: raise it with concurrency.
        threads = min(concurrency, max(2, os.cpu_count() or 2))
        limiter = anyio.CapacityLimiter(threads)
        return _LocalStore(url, retry, local_path(url), limiter, temp_prefix=temp_prefix, run=run, durable=durable)
    protocol = protocol_of(url)
    cls = fsspec.get_filesystem_class(protocol)
    if getattr(cls, "async_impl", False):
        if protocol in ("s3", "s3a"):
            options = _s3_options(options, concurrency, retry, upload_checksums)
        fs, root = url_to_fs(
            url, asynchronous=True, skip_instance_cache=True, loop=asyncio.get_running_loop(), **options
        )
        s3 = protocol in ("s3", "s3a")
        if s3:
            fs.retries = 1  # s3fs's own retry loop; ours decides
            await fs.set_session()
        return _AsyncFsStore(url, retry, fs, root, limiter, s3_crc32=s3 and upload_checksums, s3=s3)
    fs, root = await anyio.to_thread.run_sync(lambda: url_to_fs(url, **options))
    return _ThreadFsStore(url, retry, fs, root, limiter)
