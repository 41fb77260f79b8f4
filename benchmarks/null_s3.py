"""A null S3 endpoint: accepts PUTs and throws the bytes away, to measure the client side alone.

It answers just enough of S3 for s3fs and the sink: bucket creation and HEAD, PUT object (200 with an ETag),
HEAD/GET object, ListObjectsV2, DELETE and multi-object delete. Prediction bodies are read and dropped; only the
small bookkeeping objects the sink reads back (keys whose last part starts with ``_``, or anything under a
``_``-prefixed folder) keep their bytes, so that a commit can merge its manifest. Everything else is remembered
by name and size only.

Usage: python -m benchmarks.null_s3 [--host 127.0.0.1] [--port 0]
Prints "Running on http://HOST:PORT" once the socket listens.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

from benchmarks._runner import serve

_CHUNK = 1 << 20
_FAKE_ETAG = '"d41d8cd98f00b204e9800998ecf8427e"'
_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"


class _Objects:
    """Names and sizes of every object, and the bytes of the few bookkeeping objects that are read back."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buckets: set[str] = set()
        self.sizes: dict[tuple[str, str], int] = {}
        self.bodies: dict[tuple[str, str], bytes] = {}


def _kept(key: str) -> bool:
    return any(part.startswith("_") for part in key.split("/"))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and 100-continue, as S3 clients expect
    # Headers and body go out in two writes: without TCP_NODELAY the body waits for a delayed ACK (~40 ms).
    disable_nagle_algorithm = True
    server: _NullServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    # ------------------------------------------------------------------ helpers

    def _target(self) -> tuple[str, str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        path = unquote(parts.path).lstrip("/")
        bucket, _, key = path.partition("/")
        return bucket, key, parse_qs(parts.query, keep_blank_values=True)

    def _read_body(self, keep: bool) -> tuple[bytes, int]:
        chunks: list[bytes] = []
        size = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                line = self.rfile.readline()
                length = int(line.split(b";")[0].strip() or b"0", 16)
                if length == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                data = self.rfile.read(length)
                size += len(data)
                if keep:
                    chunks.append(data)
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                data = self.rfile.read(min(_CHUNK, remaining))
                if not data:
                    break
                remaining -= len(data)
                size += len(data)
                if keep:
                    chunks.append(data)
        body = b"".join(chunks)
        # aws-chunked framing ("<hex size>;chunk-signature=...\r\n<data>\r\n...0\r\n"): unwrap what is kept.
        if keep and "aws-chunked" in self.headers.get("Content-Encoding", ""):
            body = _unwrap_aws_chunked(body)
        decoded = self.headers.get("x-amz-decoded-content-length")
        return body, int(decoded) if decoded else size

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if body:
            self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str) -> None:
        body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{code}</Message></Error>'
        self._reply(status, body.encode())

    # ------------------------------------------------------------------ verbs

    def do_PUT(self) -> None:
        bucket, key, _ = self._target()
        store = self.server.objects
        if not key:
            self._read_body(keep=False)
            with store.lock:
                store.buckets.add(bucket)
            self._reply(200, headers={"Location": f"/{bucket}"})
            return
        keep = _kept(key)
        body, size = self._read_body(keep)
        etag = f'"{hashlib.md5(body).hexdigest()}"' if keep else _FAKE_ETAG
        with store.lock:
            store.buckets.add(bucket)
            store.sizes[bucket, key] = size
            if keep:
                store.bodies[bucket, key] = body
            else:
                store.bodies.pop((bucket, key), None)
        self._reply(200, headers={"ETag": etag})

    def do_HEAD(self) -> None:
        bucket, key, _ = self._target()
        store = self.server.objects
        if not key:
            self._reply(200 if bucket in store.buckets else 404)
            return
        with store.lock:
            size = store.sizes.get((bucket, key))
        if size is None:
            self._reply(404)
            return
        self.send_response(200)
        self.send_header("ETag", _FAKE_ETAG)
        self.send_header("Last-Modified", formatdate(self.server.started, usegmt=True))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()

    def do_GET(self) -> None:
        bucket, key, query = self._target()
        store = self.server.objects
        if not bucket:
            names = "".join(f"<Bucket><Name>{escape(b)}</Name></Bucket>" for b in sorted(store.buckets))
            body = f'<ListAllMyBucketsResult xmlns="{_XMLNS}"><Buckets>{names}</Buckets></ListAllMyBucketsResult>'
            self._reply(200, body.encode())
            return
        if not key:
            if bucket not in store.buckets:
                self._error(404, "NoSuchBucket")
                return
            if "location" in query:
                body = f'<LocationConstraint xmlns="{_XMLNS}"></LocationConstraint>'
                self._reply(200, body.encode())
                return
            self._list(bucket, query)
            return
        with store.lock:
            size = store.sizes.get((bucket, key))
            data = store.bodies.get((bucket, key))
        if size is None:
            self._error(404, "NoSuchKey")
            return
        if data is None:
            data = bytes(size)  # the bytes were discarded: answer with as many zeros
        status = 200
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if wanted is not None:  # a ranged read, answered as S3 does (the commit reads manifest parts in chunks)
            start = int(wanted.group(1))
            if start >= len(data):
                self._error(416, "InvalidRange")
                return
            end = min(len(data), int(wanted.group(2)) + 1) if wanted.group(2) else len(data)
            total = len(data)
            data, status = data[start:end], 206
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{total}")
        self.send_header("ETag", _FAKE_ETAG)
        self.send_header("Last-Modified", formatdate(self.server.started, usegmt=True))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _list(self, bucket: str, query: dict[str, list[str]]) -> None:
        prefix = query.get("prefix", [""])[0]
        delimiter = query.get("delimiter", [""])[0]
        store = self.server.objects
        with store.lock:
            found = sorted((k, s) for (b, k), s in store.sizes.items() if b == bucket and k.startswith(prefix))
        contents: list[str] = []
        prefixes: set[str] = set()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(self.server.started))
        for key, size in found:
            if delimiter and delimiter in key[len(prefix) :]:
                rest = key[len(prefix) :]
                prefixes.add(prefix + rest[: rest.index(delimiter) + len(delimiter)])
                continue
            contents.append(
                f"<Contents><Key>{escape(key)}</Key><LastModified>{stamp}</LastModified><ETag>{escape(_FAKE_ETAG)}"
                f"</ETag><Size>{size}</Size><StorageClass>STANDARD</StorageClass></Contents>"
            )
        common = "".join(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in sorted(prefixes))
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="{_XMLNS}"><Name>{escape(bucket)}</Name>'
            f"<Prefix>{escape(prefix)}</Prefix><KeyCount>{len(contents) + len(prefixes)}</KeyCount>"
            f"<MaxKeys>1000000</MaxKeys><Delimiter>{escape(delimiter)}</Delimiter><IsTruncated>false</IsTruncated>"
            f"{''.join(contents)}{common}</ListBucketResult>"
        )
        self._reply(200, body.encode())

    def do_DELETE(self) -> None:
        bucket, key, _ = self._target()
        store = self.server.objects
        with store.lock:
            if key:
                store.sizes.pop((bucket, key), None)
                store.bodies.pop((bucket, key), None)
            else:
                store.buckets.discard(bucket)
        self._reply(204)

    def do_POST(self) -> None:
        bucket, _, query = self._target()
        body, _ = self._read_body(keep=True)
        if "delete" not in query:
            self._error(501, "NotImplemented")
            return
        keys = [unescape_xml(k) for k in re.findall(rb"<Key>(.*?)</Key>", body, re.DOTALL)]
        store = self.server.objects
        with store.lock:
            for key in keys:
                store.sizes.pop((bucket, key), None)
                store.bodies.pop((bucket, key), None)
        deleted = "".join(f"<Deleted><Key>{escape(k)}</Key></Deleted>" for k in keys)
        self._reply(200, f'<DeleteResult xmlns="{_XMLNS}">{deleted}</DeleteResult>'.encode())


def unescape_xml(raw: bytes) -> str:
    text = raw.decode()
    for entity, char in (("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&apos;", "'"), ("&amp;", "&")):
        text = text.replace(entity, char)
    return text


def _unwrap_aws_chunked(body: bytes) -> bytes:
    out: list[bytes] = []
    position = 0
    while position < len(body):
        end = body.index(b"\r\n", position)
        length = int(body[position:end].split(b";")[0], 16)
        if length == 0:
            break
        out.append(body[end + 2 : end + 2 + length])
        position = end + 2 + length + 2
    return b"".join(out)


class _NullServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.objects = _Objects()
        self.started = time.time()


def main() -> None:
    serve(_NullServer, __doc__)


if __name__ == "__main__":
    main()
