"""A fault-injecting HTTP/1.1 proxy for loopback tests, placed between a client and an S3 server.

It speaks enough HTTP/1.1 for what S3 clients send: several requests per connection (keep-alive),
``Expect: 100-continue`` (the proxy answers ``100 Continue`` itself and forwards the request without the header),
``Content-Length`` and chunked request bodies (forwarded de-chunked, with a ``Content-Length``), and responses
framed by ``Content-Length``, chunks or the end of the connection (re-framed with a ``Content-Length``). Each
client connection has its own upstream connection, reopened whenever the server closes it.

Faults are set at run time with :meth:`FaultProxy.configure`: a fraction of requests answered ``503 SlowDown``
with S3's XML error body, a fraction of connections reset (``SO_LINGER`` 0, then close, so the client sees
``ECONNRESET``), latency added before forwarding, and a black hole (requests are read and never answered) that
may start after a number of requests. Decisions come from a seeded generator, so a failing run can be replayed.

The proxy runs an asyncio loop on its own thread; :meth:`FaultProxy.stop` closes every connection, ends the loop
and joins the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import struct
import threading
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["FaultProxy", "Faults", "ProxyStats"]

_MAX_HEAD = 64 * 1024
_NO_BODY_STATUSES = {204, 304}


@dataclass(frozen=True)
class Faults:
    """What the proxy does to requests whose method is in ``methods`` (black holes apply to every request).

    Attributes:
        error_rate: fraction answered ``503 SlowDown`` (the request is not forwarded).
        reset_rate: fraction whose connection is reset, half before forwarding and half after (the server then
            stored the object but the client never hears so).
        latency: seconds added before each request is forwarded.
        methods: HTTP methods that errors and resets apply to.
        blackhole_after: once this many requests were received in total, every request and every new
            connection is black-holed; ``None``: never; ``0``: from now on.
        deny_deletes: answer every multi-object delete (``POST ?delete``) as S3 does when a policy denies
            ``s3:DeleteObject``: ``200 OK`` with an ``AccessDenied`` error per key, nothing deleted.
    """

    error_rate: float = 0.0
    reset_rate: float = 0.0
    latency: float = 0.0
    methods: frozenset[str] = frozenset({"PUT"})
    blackhole_after: int | None = None
    deny_deletes: bool = False


@dataclass
class ProxyStats:
    """Counters, updated by the proxy thread; read them once the client is done.

    ``blackholed`` counts requests and new connections that were held without an answer.
    """

    connections: int = 0
    requests: int = 0
    forwarded: int = 0
    errors: int = 0
    resets: int = 0
    blackholed: int = 0
    continues: int = 0
    chunked: int = 0
    max_requests_per_connection: int = 0
    methods: dict[str, int] = field(default_factory=dict)


class _Reset(Exception):
    """Raised inside a connection handler to reset the client connection."""


class _ProtocolError(Exception):
    """The peer sent something this proxy does not understand; the connection is closed."""


def _linger_close(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """One request or response head, up to and including the blank line; ``None`` at a clean end of stream."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise _ProtocolError("the connection closed in the middle of a message head") from exc
    except asyncio.LimitOverrunError as exc:
        raise _ProtocolError("message head too large") from exc


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _ProtocolError(f"malformed header line {line!r}")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _is_chunked(headers: list[tuple[str, str]]) -> bool:
    encoding = _header(headers, "Transfer-Encoding")
    return encoding is not None and encoding.split(",")[-1].strip().lower() == "chunked"


async def _read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """A chunked body: (its bytes as sent, the decoded payload). Trailers are kept in the raw bytes only."""
    raw = bytearray()
    payload = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        raw += size_line
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError as exc:
            raise _ProtocolError(f"bad chunk size line {size_line!r}") from exc
        if size == 0:
            while True:  # optional trailers, then the blank line
                line = await reader.readuntil(b"\r\n")
                raw += line
                if line == b"\r\n":
                    return bytes(raw), bytes(payload)
        chunk = await reader.readexactly(size + 2)
        raw += chunk
        payload += chunk[:-2]


class FaultProxy:
    """A loopback HTTP proxy in front of ``upstream`` (``http://host:port``) that injects :class:`Faults`.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, upstream: str, *, seed: int = 0, faults: Faults | None = None) -> None:
        host, _, port = upstream.removeprefix("http://").rstrip("/").partition(":")
        self.upstream = (host, int(port or 80))
        self.seed = seed
        self.stats = ProxyStats()
        self._faults = faults or Faults()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._transports: set[asyncio.BaseTransport] = set()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}

    @property
    def faults(self) -> Faults:
        with self._lock:
            return self._faults

    def configure(self, **changes: Any) -> None:
        """Change the faults from now on (thread-safe), e.g. ``configure(error_rate=0.1)``.

        ``blackhole_after=n`` counts from the requests received so far: ``0`` black-holes at once.
        """
        with self._lock:
            if changes.get("blackhole_after") is not None:
                changes["blackhole_after"] = self.stats.requests + changes["blackhole_after"]
            if "methods" in changes:
                changes["methods"] = frozenset(m.upper() for m in changes["methods"])
            self._faults = replace(self._faults, **changes)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("the proxy is already started")
        self._thread = threading.Thread(target=self._run, name=f"fault-proxy-{self.seed}")
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError("the proxy did not start within 30 s")
        if self._startup_error is not None:
            self._thread.join()
            raise RuntimeError("the proxy could not start") from self._startup_error
        return self

    def stop(self, timeout: float = 30) -> None:
        """Close the listening socket and every connection, end the loop and join the thread."""
        thread = self._thread
        if thread is None:
            return
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"the proxy thread did not stop within {timeout} s")
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._startup_error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0, limit=_MAX_HEAD)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            # Closing every socket ends every handler through its own error path (no task is cancelled).
            for transport in list(self._transports):
                transport.abort()
            if self._handlers:
                _, stuck = await asyncio.wait(set(self._handlers), timeout=10)
                for task in stuck:
                    task.cancel()
            await server.wait_closed()

    # ------------------------------------------------------------------ decisions

    def _blackholed(self) -> bool:
        after = self._faults.blackhole_after
        return after is not None and self.stats.requests >= after

    def _decide(self, method: str) -> str:
        """``forward``, ``error``, ``reset-before``, ``reset-after`` or ``blackhole`` for one request."""
        with self._lock:
            faults = self._faults
            blackholed = self._blackholed()
            self.stats.requests += 1
            self.stats.methods[method] = self.stats.methods.get(method, 0) + 1
            if blackholed:
                self.stats.blackholed += 1
                return "blackhole"
            if method not in faults.methods:
                return "forward"
            # Always draw both numbers, so one seed gives one sequence of decisions whatever the rates.
            draw, half = self._random.random(), self._random.random()
            if draw < faults.error_rate:
                self.stats.errors += 1
                return "error"
            if draw < faults.error_rate + faults.reset_rate:
                self.stats.resets += 1
                return "reset-before" if half < 0.5 else "reset-after"
            return "forward"

    # ------------------------------------------------------------------ connections

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._transports.add(writer.transport)
        with self._lock:
            self.stats.connections += 1
            blackholed = self._blackholed()
            if blackholed:
                self.stats.blackholed += 1
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        served = 0
        reset = False
        try:
            if blackholed:
                await self._hold()
            while True:
                head = await _read_head(reader)
                if head is None:
                    return
                request_line, headers = _parse_head(head)
                method = request_line.split(" ", 1)[0].upper()
                expects_continue = (_header(headers, "Expect") or "").lower() == "100-continue"
                decision = self._decide(method)
                served += 1
                with self._lock:
                    self.stats.max_requests_per_connection = max(self.stats.max_requests_per_connection, served)
                if decision == "blackhole":
                    await self._hold()
                if decision == "reset-before" and not expects_continue:
                    raise _Reset
                if expects_continue:
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await writer.drain()
                    with self._lock:
                        self.stats.continues += 1
                body = await self._read_request_body(reader, headers)
                if decision == "reset-before":
                    raise _Reset
                if decision == "error":
                    writer.write(_slow_down())
                    await writer.drain()
                    continue
                if self.faults.deny_deletes and method == "POST" and "?delete" in request_line:
                    writer.write(_denied_deletes(body))
                    await writer.drain()
                    continue
                latency = self.faults.latency
                if latency:
                    await asyncio.sleep(latency)
                upstream, response = await self._forward(upstream, request_line, headers, body, method)
                with self._lock:
                    self.stats.forwarded += 1
                if decision == "reset-after":
                    raise _Reset
                writer.write(response)
                await writer.drain()
                if (_header(headers, "Connection") or "").lower() == "close":
                    return
        except _Reset:
            reset = True
        except (_ProtocolError, OSError, asyncio.IncompleteReadError):
            pass  # the client, the server or the proxy's stop closed the connection
        finally:
            self._handlers.discard(task)
            self._transports.discard(writer.transport)
            if upstream is not None:
                self._transports.discard(upstream[1].transport)
                upstream[1].transport.abort()
            if reset:
                _linger_close(writer)
            else:
                writer.close()

    async def _hold(self) -> None:
        """A black hole: never answer; the connection ends when the client gives up or the proxy stops."""
        assert self._stopping is not None
        await self._stopping.wait()
        raise ConnectionAbortedError("the proxy is stopping")

    async def _read_request_body(self, reader: asyncio.StreamReader, headers: list[tuple[str, str]]) -> bytes:
        if _is_chunked(headers):
            with self._lock:
                self.stats.chunked += 1
            _, payload = await _read_chunked(reader)
            return payload
        length = _header(headers, "Content-Length")
        return await reader.readexactly(int(length)) if length else b""

    async def _forward(
        self,
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None,
        request_line: str,
        headers: list[tuple[str, str]],
        body: bytes,
        method: str,
    ) -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None, bytes]:
        """Send one request upstream; return the connection to reuse (or None) and the response for the client."""
        dropped = {"expect", "transfer-encoding", "content-length"}
        lines = [request_line] + [f"{k}: {v}" for k, v in headers if k.lower() not in dropped]
        if body or method in ("PUT", "POST") or _header(headers, "Content-Length") is not None:
            lines.append(f"Content-Length: {len(body)}")
        message = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        # A kept-alive upstream connection may have been closed by the server meanwhile: one fresh retry.
        for fresh in (upstream is None, True):
            if upstream is None:
                upstream = await asyncio.open_connection(*self.upstream, limit=_MAX_HEAD)
                self._transports.add(upstream[1].transport)
            try:
                upstream[1].write(message)
                await upstream[1].drain()
                response, keep = await self._read_response(upstream[0], method)
            except (ConnectionError, asyncio.IncompleteReadError, _ProtocolError):
                self._transports.discard(upstream[1].transport)
                upstream[1].transport.abort()
                upstream = None
                if fresh:
                    raise
                continue
            if not keep:
                self._transports.discard(upstream[1].transport)
                upstream[1].transport.abort()
                upstream = None
            return upstream, response
        raise AssertionError("unreachable")

    async def _read_response(self, reader: asyncio.StreamReader, method: str) -> tuple[bytes, bool]:
        """One response re-framed for the client, and whether the upstream connection may be reused.

        Connection headers are hop-by-hop: the server's ``Connection: close`` ends the upstream connection only,
        and the body goes to the client with a ``Content-Length`` whatever framing the server used, so the
        client's connection stays open (interim 1xx responses are dropped: the proxy sent its own).
        """
        while True:
            head = await _read_head(reader)
            if head is None:
                raise _ProtocolError("the server closed the connection without answering")
            status_line, headers = _parse_head(head)
            parts = status_line.split(" ", 2)
            version, status = parts[0], int(parts[1])
            if not 100 <= status < 200:
                break
        connection = (_header(headers, "Connection") or "").lower()
        keep = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        hop_by_hop = {"connection", "keep-alive", "transfer-encoding"}
        body: bytes | None
        if method == "HEAD" or status in _NO_BODY_STATUSES:
            body = None  # keep the server's Content-Length: it describes the object, not this message
        else:
            hop_by_hop.add("content-length")
            if _is_chunked(headers):
                _, body = await _read_chunked(reader)
            elif (length := _header(headers, "Content-Length")) is not None:
                body = await reader.readexactly(int(length))
            else:
                body, keep = await reader.read(), False  # framed by the end of the connection
        lines = [f"HTTP/1.1 {status} {parts[2] if len(parts) > 2 else ''}".rstrip()]
        lines += [f"{k}: {v}" for k, v in headers if k.lower() not in hop_by_hop]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        lines.append("Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""), keep


def _denied_deletes(request: bytes) -> bytes:
    """S3's answer to a DeleteObjects request that a bucket policy denies: 200, one error per key."""
    keys = re.findall(rb"<Key>(.*?)</Key>", request)
    errors = "".join(
        f"<Error><Key>{key.decode()}</Key><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
        for key in keys
    )
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<DeleteResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">{errors}</DeleteResult>'
    ).encode()
    head = (
        "HTTP/1.1 200 OK\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: keep-alive\r\n\r\n"
    ).encode()
    return head + body


def _slow_down() -> bytes:
    request_id = uuid.uuid4().hex[:16].upper()
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
        f"<RequestId>{request_id}</RequestId><HostId>fault-proxy</HostId></Error>"
    ).encode()
    head = (
        "HTTP/1.1 503 Slow Down\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"x-amz-request-id: {request_id}\r\n"
        "Connection: keep-alive\r\n\r\n"
    ).encode()
    return head + body
