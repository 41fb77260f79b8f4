"""A null GCS endpoint: takes uploads and throws the bytes away, to measure the client side alone.

fake-gcs-server has no XML API (fsouza/fake-gcs-server#331): object_store, and so obstore, uploads with an XML
API ``PUT /{bucket}/{object}``, which it refuses ("invalid uploadType"). This answers just the two uploads the
GCS clients make: obstore's XML ``PUT`` (200 with an ETag and a generation) and gcsfs's JSON API
``POST /upload/storage/v1/b/{bucket}/o`` (media or multipart; 200 with the object's resource). Nothing is kept.

Usage: python -m benchmarks.null_gcs [--host 127.0.0.1] [--port 0]
Prints "Running on http://HOST:PORT" once the socket listens.
"""

from __future__ import annotations

import itertools
import json
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from benchmarks._runner import serve

_CHUNK = 1 << 20
_NAME = re.compile(rb'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # (headers and body in two writes: no delayed-ACK wait)
    server: _NullServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _body(self, keep: int = 0) -> tuple[int, bytes]:
        """The body's size, and its first ``keep`` bytes (the multipart metadata)."""
        size = 0
        head = b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                length = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if length == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                data = self.rfile.read(length)
                size += len(data)
                if len(head) < keep:
                    head += data[: keep - len(head)]
                self.rfile.readline()
            return size, head
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining:
            data = self.rfile.read(min(_CHUNK, remaining))
            if not data:
                break
            remaining -= len(data)
            size += len(data)
            if len(head) < keep:
                head += data[: keep - len(head)]
        return size, head

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_PUT(self) -> None:  # the XML API: obstore
        self._body()
        generation = str(next(self.server.generations))
        self._reply(200, headers={"ETag": f'"{generation}"', "x-goog-generation": generation})

    def do_POST(self) -> None:  # the JSON API upload: gcsfs
        parts = urlsplit(self.path)
        match = re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o", parts.path)
        if match is None:
            self._body()
            self._reply(404, b'{"error":{"code":404,"message":"not found"}}')
            return
        size, head = self._body(keep=4096)
        name = parse_qs(parts.query).get("name", [""])[0]
        if not name:
            found = _NAME.search(head)
            name = json.loads(b'"' + found.group(1) + b'"') if found else ""
        generation = str(next(self.server.generations))
        resource = {
            "kind": "storage#object",
            "bucket": unquote(match.group(1)),
            "name": name,
            "size": str(size),
            "generation": generation,
            "metageneration": "1",
            "contentType": "application/octet-stream",
        }
        self._reply(200, json.dumps(resource).encode(), {"Content-Type": "application/json"})


class _NullServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.generations = itertools.count(1)  # (next() on a count is atomic under the interpreter lock)


def main() -> None:
    serve(_NullServer, __doc__)


if __name__ == "__main__":
    main()
