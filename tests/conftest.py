"""Shared fixtures: a real S3 server (moto over loopback HTTP, in its own process) and small Lightning parts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

# Dummy credentials for the loopback server; set before botocore reads the environment.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
# gcsfs otherwise waits 60 s on a gRPC lookup per operation against an emulator (as gcsfs's own CI sets it).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


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


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port, in its own process; stopped when the session ends."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-u", "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        # Werkzeug announces the listening socket once it is bound: read until then (no polling, no sleeps).
        seen = []
        for raw in process.stdout:
            line = raw.decode(errors="replace")
            seen.append(line)
            if "Running on" in line:
                break
        else:
            raise RuntimeError(f"moto server exited before listening: {''.join(seen)}")
        # Keep draining its output so the pipe never fills and blocks the server.
        drain = subprocess.Popen(["cat"], stdin=process.stdout, stdout=subprocess.DEVNULL)
        process.stdout.close()  # cat holds its own copy
        yield S3Server(f"http://127.0.0.1:{port}", process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    drain.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket; returns its name."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


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
