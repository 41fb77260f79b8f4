"""The upload process of :mod:`._uploader`: it opens the sink's store for itself and puts what it is sent.

Requests come on one socket (read by a thread, each started as a task on this process's loop), answers go back on
another, one per request once its object was stored or failed after its retries; the process ends when the
requests' socket closes, once the puts it began ended.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import sys
import threading
from typing import Any

from lighter_sink._store._open import open_store
from lighter_sink._store._uploader import ANSWER, CONFIG, REQUEST, dumped

__all__ = ["serve"]


def serve(requests_fd: int, answers_fd: int) -> None:
    """The upload process: store what the requests ask until their socket closes."""
    logging.basicConfig(level=logging.WARNING, format="lighter-sink upload process: %(levelname)s %(message)s")
    requests = socket.socket(fileno=requests_fd)
    answers = socket.socket(fileno=answers_fd)
    (size,) = CONFIG.unpack(_receive(requests, CONFIG.size))
    config = pickle.loads(_receive(requests, size))
    asyncio.run(_serve(requests, answers, config))
    # Every request was answered and the store closed: the interpreter's own teardown (a sixth of a second here)
    # would only hold the sink's close up.
    logging.shutdown()
    sys.stderr.flush()
    os._exit(0)


async def _serve(requests: socket.socket, answers: socket.socket, config: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    # Requests are read by a thread (``recv`` straight into each body, the lock released), handed to the loop a
    # burst at a time; answers are written on the loop, those of one iteration in one write. (One wake-up of the
    # loop and one write per object cost this process more than the client; streams on the loop instead copied
    # each body twice more, holding the lock.)
    # (both ends kept: a stream's writer closes its socket when it is collected)
    answers_reader, writer = await asyncio.open_connection(sock=answers)
    outgoing: list[bytes] = []  # answers not yet written

    def send() -> None:
        writer.write(b"".join(outgoing))
        outgoing.clear()

    def answer(number: int, retries: int, error: BaseException | None) -> None:
        data = b"" if error is None else dumped(error)
        if not outgoing:
            loop.call_soon(send)
        outgoing.append(ANSWER.pack(number, retries, len(data)) + data)

    try:
        store = await open_store(**config)
    except Exception as exc:
        answer(0, 0, exc)
        await asyncio.sleep(0)  # (the answer's write)
        await writer.drain()
        writer.close()
        return
    tasks: set[asyncio.Task[None]] = set()
    arrived: list[tuple[int, str, bytes, int | None]] = []  # read, not yet on the loop
    lock = threading.Lock()
    ended = asyncio.Event()

    async def one(number: int, key: str, body: bytes, crc32: int | None) -> None:
        try:
            await store.put(key, [body], crc32)
        except Exception as exc:
            answer(number, store.retries, exc)
        else:
            answer(number, store.retries, None)

    def start() -> None:
        with lock:
            burst = arrived[:]
            arrived.clear()
        for request in burst:
            task = loop.create_task(one(*request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def read() -> None:
        try:
            while head := _receive(requests, REQUEST.size, eof_ok=True):
                number, crc32, key_size, body_size = REQUEST.unpack(head)
                key = _receive(requests, key_size).decode()
                body = _receive(requests, body_size)
                with lock:
                    first = not arrived
                    arrived.append((number, key, body, None if crc32 < 0 else crc32))
                if first:
                    loop.call_soon_threadsafe(start)
        except OSError as exc:
            logging.getLogger(__name__).warning("the sink's requests ended within a request: %r", exc)
        finally:
            loop.call_soon_threadsafe(ended.set)  # (after the last start: the loop runs them in order)

    reader = threading.Thread(target=read, name="lighter-sink-requests", daemon=True)
    reader.start()
    try:
        await ended.wait()
        while tasks:
            await asyncio.wait(list(tasks))
        await asyncio.sleep(0)  # (the last answers' write)
        await writer.drain()
    finally:
        await store.aclose()
        writer.close()
        del answers_reader


def _receive(sock: socket.socket, size: int, *, eof_ok: bool = False) -> bytes:
    """Exactly ``size`` bytes from ``sock`` (b"" at its end where ``eof_ok``)."""
    if size == 0:
        return b""
    data = sock.recv(size, socket.MSG_WAITALL)
    if len(data) == size:
        return data
    chunks = [data]
    got = len(data)
    while got < size:
        if not data:
            if eof_ok and got == 0:
                return b""
            raise ConnectionError(f"the sink's process closed the connection ({got} of {size} bytes)")
        data = sock.recv(size - got)
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)
