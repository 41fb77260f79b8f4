import base64
import errno
import gc
import io
import json
import os
import warnings
import zlib
from pathlib import Path
from typing import Any

import anyio.to_thread
import numpy as np
import pytest
import torch
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from lighter_sink import ConfigurationError, DestinationError, Sink, WriteError
from lighter_sink._store import RetryPolicy, is_transient, open_store
from tests import _faulty
from tests.conftest import S3Server


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )


@pytest.mark.parametrize(
    "error",
    [
        _client_error("SlowDown", 503),
        _client_error("InternalError", 500),
        _client_error("RequestTimeout", 400),
        _client_error("Whatever", 502),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
        ConnectionResetError(errno.ECONNRESET, "reset"),
        TimeoutError(),
        OSError(errno.ETIMEDOUT, "timed out"),
    ],
)
def test_transient_errors(error: BaseException) -> None:
    assert is_transient(error)


def test_transient_through_a_translated_cause() -> None:
    # s3fs turns a 503 SlowDown into OSError(EBUSY) raised from the ClientError
    translated = OSError(errno.EBUSY, "Please reduce your request rate")
    translated.__cause__ = _client_error("SlowDown", 503)
    assert is_transient(translated)


@pytest.mark.parametrize(
    "error",
    [
        _client_error("NoSuchBucket", 404),
        _client_error("AccessDenied", 403),
        PermissionError(errno.EACCES, "denied"),
        FileNotFoundError(),
        OSError(errno.ENOSPC, "no space left"),
        ValueError("bad"),
    ],
)
def test_permanent_errors(error: BaseException) -> None:
    assert not is_transient(error)


def test_retry_policy_validates_and_backs_off_within_bounds() -> None:
    policy = RetryPolicy(attempts=4, base_delay=0.5, max_delay=1.0)
    assert all(0 <= policy.delay(a) <= min(1.0, 0.5 * 2 ** (a - 1)) for a in range(1, 10) for _ in range(20))
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)


@pytest.mark.anyio
async def test_retries_transient_failures_then_succeeds() -> None:
    plan = _faulty.Plan(fail=ConnectionResetError(errno.ECONNRESET, "reset"), fail_first=2)
    store = await open_store("faulty://r", _faulty.options(plan), retry=RetryPolicy(attempts=3, base_delay=0.001))
    await store.put("a.bin", [b"he", b"llo"])
    assert _faulty.read(plan, "/r/a.bin") == b"hello"
    assert store.retries == 2
    assert plan.writes == 3


@pytest.mark.anyio
async def test_gives_up_after_the_attempts() -> None:
    plan = _faulty.Plan(fail=ConnectionResetError(errno.ECONNRESET, "reset"))
    store = await open_store("faulty://r", _faulty.options(plan), retry=RetryPolicy(attempts=3, base_delay=0.001))
    with pytest.raises(ConnectionResetError):
        await store.put("a.bin", [b"x"])
    assert plan.writes == 3


@pytest.mark.anyio
async def test_permanent_failure_is_not_retried() -> None:
    plan = _faulty.Plan(fail=PermissionError(errno.EACCES, "denied"))
    store = await open_store("faulty://r", _faulty.options(plan), retry=RetryPolicy(attempts=5, base_delay=0.001))
    results = await store.put_many([("a", [b"x"]), ("b", [b"y"])])
    assert all(isinstance(r, PermissionError) for r in results)
    assert plan.writes == 2
    assert store.retries == 0


@pytest.mark.anyio
async def test_local_store_writes_atomically_and_lists(tmp_path: os.PathLike[str]) -> None:
    store = await open_store(str(tmp_path))
    assert store.is_local
    results = await store.put_many([("a/1.npy", [b"one"]), ("b.npy", [memoryview(b"two"), b"!"])])
    assert results == [None, None]
    assert await store.get("b.npy") == b"two!"
    assert await store.list() == ["a/1.npy", "b.npy"]
    # a leftover temporary file from a killed writer is not an object
    with open(os.path.join(tmp_path, "a", ".lsink.killed-run.1.tmp"), "wb") as f:
        f.write(b"partial")
    assert await store.list("a") == ["a/1.npy"]
    await store.delete(["a/1.npy", "missing"])
    assert await store.list("a") == []
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


@pytest.mark.anyio
async def test_local_write_failure_leaves_no_partial_object(tmp_path: os.PathLike[str]) -> None:
    store = await open_store(str(tmp_path), retry=RetryPolicy(attempts=1))
    (results,) = await store.put_many([("x.npy", [object()])])  # type: ignore[list-item]
    assert isinstance(results, TypeError)
    assert os.listdir(tmp_path) == []


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.s3
@pytest.mark.parametrize("backend", ["fsspec", "obstore"])
def test_s3_backends_round_trip(s3_server: S3Server, s3_bucket: str, backend: str) -> None:
    url = f"s3://{s3_bucket}/run"
    with Sink(url, storage_options=s3_server.storage_options, backend=backend, upload_checksums=False) as sink:  # type: ignore[arg-type]
        sink.put_batch(range(20), torch.arange(40.0).reshape(20, 2))
    client = s3_server.client()
    body = client.get_object(Bucket=s3_bucket, Key="run/7.npy")["Body"].read()
    np.testing.assert_array_equal(np.load(io.BytesIO(body)), [14.0, 15.0])
    manifest = client.get_object(Bucket=s3_bucket, Key="run/_manifest.jsonl")["Body"].read().decode()
    assert len(manifest.splitlines()) == 20
    assert "_SUCCESS" in {o["Key"].rsplit("/", 1)[-1] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]}


@pytest.mark.s3
def test_obstore_backend_resumes_and_reports_missing_buckets(s3_server: S3Server, s3_bucket: str) -> None:
    options = s3_server.storage_options
    with Sink(f"s3://{s3_bucket}/r", storage_options=options, backend="obstore") as sink:
        sink.put_batch(range(3), torch.ones(3, 2))
    with Sink(f"s3://{s3_bucket}/r", storage_options=options, backend="obstore", mode="resume") as sink:
        sink.put_batch(range(5), torch.ones(5, 2))
    assert sink.stats.skipped == 3
    # obstore's listing of a missing bucket fails: the url is refused before anything runs
    with pytest.raises((DestinationError, WriteError), match="no-such-bucket"):  # noqa: SIM117
        with Sink("s3://no-such-bucket-obstore/r", storage_options=options, backend="obstore", retries=1) as sink:
            sink.put(0, torch.ones(1))


@pytest.fixture
def aws_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An AWS SDK profile in credential and config files of its own; no AWS_* credentials in the environment."""
    credentials = tmp_path / "credentials"
    credentials.write_text("[sinktest]\naws_access_key_id = profile-key\naws_secret_access_key = profile-secret\n")
    config = tmp_path / "config"
    config.write_text("[profile sinktest]\nregion = eu-west-3\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_REGION",
    ):
        monkeypatch.delenv(name, raising=False)
    return "sinktest"


def test_obstore_backend_reads_aws_sdk_profiles(aws_profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from lighter_sink._store import RetryPolicy
    from lighter_sink._store._obstore import open_obstore

    endpoint = {"endpoint_url": "http://127.0.0.1:9"}
    store = open_obstore("s3://b/p", {**endpoint, "profile": aws_profile}, RetryPolicy(), True)
    credentials = store._store.credential_provider()  # type: ignore[attr-defined]
    assert (credentials["access_key_id"], credentials["secret_access_key"]) == ("profile-key", "profile-secret")
    assert store._store.config["region"] == "eu-west-3"  # type: ignore[attr-defined]
    monkeypatch.setenv("AWS_PROFILE", aws_profile)  # the SDK's default profile, as botocore reads it
    store = open_obstore("s3://b/p", endpoint, RetryPolicy(), True)
    assert store._store.credential_provider()["access_key_id"] == "profile-key"  # type: ignore[attr-defined]
    # credentials given outright are used as they are
    store = open_obstore("s3://b/p", {**endpoint, "key": "k", "secret": "s"}, RetryPolicy(), True)
    assert store._store.credential_provider is None  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="either a profile or credentials"):
        open_obstore("s3://b/p", {**endpoint, "profile": aws_profile, "key": "k"}, RetryPolicy(), True)
    with pytest.raises(ConfigurationError, match="no-such-profile"):
        open_obstore("s3://b/p", {**endpoint, "profile": "no-such-profile"}, RetryPolicy(), True)


@pytest.mark.s3
def test_obstore_backend_writes_with_a_profile(s3_server: S3Server, s3_bucket: str, aws_profile: str) -> None:
    options = {"endpoint_url": s3_server.storage_options["endpoint_url"], "profile": aws_profile}
    with Sink(f"s3://{s3_bucket}/profile", storage_options=options, backend="obstore") as sink:
        sink.put_batch(range(3), torch.ones(3, 2))
    assert sink.summary is not None and sink.summary["count"] == 3


def test_obstore_backend_refuses_other_urls_and_unknown_options() -> None:
    with pytest.raises(ConfigurationError, match="s3:// urls"), Sink("memory://x", backend="obstore"):
        pass
    with pytest.raises(ConfigurationError, match="backend must be one of"):
        Sink("memory://x", backend="rust")  # type: ignore[arg-type]


@pytest.mark.s3
def test_s3_uploads_carry_the_manifest_crc32_as_their_checksum(s3_server: S3Server, s3_bucket: str) -> None:
    """The CRC-32 the sink computes for the manifest is the upload checksum the server verifies and keeps."""
    url = f"s3://{s3_bucket}/crc"
    values = torch.randn(6, 70_000)  # above the size from which bodies are copied outside the GIL
    with Sink(url, storage_options=s3_server.storage_options) as sink:
        sink.put_batch(range(6), values)
    client = s3_server.client()
    manifest = [
        json.loads(line) for line in client.get_object(Bucket=s3_bucket, Key="crc/_manifest.jsonl")["Body"].iter_lines()
    ]
    assert len(manifest) == 6
    for entry in manifest:
        head = client.head_object(Bucket=s3_bucket, Key=f"crc/{entry['path']}", ChecksumMode="ENABLED")
        assert base64.b64decode(head["ChecksumCRC32"]) == int(entry["crc32"], 16).to_bytes(4, "big")
        body = client.get_object(Bucket=s3_bucket, Key=f"crc/{entry['path']}")["Body"].read()
        np.testing.assert_array_equal(np.load(io.BytesIO(body)), values[int(entry["id"])].numpy())


@pytest.mark.s3
@pytest.mark.anyio
async def test_s3_upload_checksum_is_the_callers_not_recomputed(s3_server: S3Server, s3_bucket: str) -> None:
    """A given CRC-32 goes out as it is: botocore, seeing the header, computes none of its own."""
    store = await open_store(f"s3://{s3_bucket}/sent", s3_server.storage_options, retry=RetryPolicy(attempts=1))
    wrong = zlib.crc32(b"payload") ^ 1
    try:
        refused: BaseException | None = None
        try:
            await store.put("x.bin", [b"payload"], crc32=wrong)
        except Exception as exc:  # a server that verifies checksums (S3, MinIO) refuses the body
            refused = exc
        if refused is not None:
            assert "checksum" in str(refused).lower() or "digest" in str(refused).lower()
            assert await store.list() == []
        else:  # moto keeps what it was sent: the wrong value proves it was ours
            head = s3_server.client().head_object(Bucket=s3_bucket, Key="sent/x.bin", ChecksumMode="ENABLED")
            assert base64.b64decode(head["ChecksumCRC32"]) == wrong.to_bytes(4, "big")
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    ("options", "signed"),
    [
        ({}, False),  # AWS's own endpoints: TLS
        ({"endpoint_url": "https://minio.example:9000"}, False),
        ({"endpoint_url": "http://127.0.0.1:9000"}, True),  # plain http keeps the signed payload hash
        ({"client_kwargs": {"use_ssl": False}}, True),
    ],
)
def test_a_provided_checksum_spares_the_payload_hash_over_tls(options: dict[str, Any], signed: bool) -> None:
    """With the sink's CRC-32 as the checksum header, botocore hashes no body for the signature over TLS."""
    import botocore.session
    from botocore.config import Config

    from lighter_sink._store import s3_options

    config = s3_options(options, 16, RetryPolicy(), upload_checksums=True)["config_kwargs"]
    client_kwargs = options.get("client_kwargs", {})
    client = botocore.session.get_session().create_client(
        "s3",
        region_name="us-east-1",
        aws_access_key_id="k",
        aws_secret_access_key="s",
        endpoint_url=options.get("endpoint_url"),
        use_ssl=client_kwargs.get("use_ssl", True),
        config=Config(**config),
    )
    sent: dict[str, Any] = {}

    class Captured(Exception):
        pass

    def capture(request: Any, **_: Any) -> None:
        sent.update(request.headers)
        raise Captured  # the signed request is all this test needs: nothing goes on the wire

    client.meta.events.register("before-send.s3.PutObject", capture)
    body = b"x" * 100_000
    crc = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
    with pytest.raises(Captured):
        client.put_object(Bucket="b", Key="k", Body=body, ChecksumAlgorithm="CRC32", ChecksumCRC32=crc)
    headers = {k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in sent.items()}
    assert headers["x-amz-checksum-crc32"] == crc
    assert (headers["x-amz-content-sha256"] != "UNSIGNED-PAYLOAD") is signed


@pytest.mark.anyio
@pytest.mark.parametrize(
    "where",
    [
        "local",
        "faulty",  # a synchronous fsspec filesystem, driven from threads
        pytest.param("s3-fsspec", marks=pytest.mark.s3),
        pytest.param("s3-obstore", marks=pytest.mark.s3),
    ],
)
async def test_every_store_says_truthfully_whether_it_writes_many(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A store that declares ``supports_write_many`` writes a batch from a worker thread; the others refuse."""
    url, options, backend = str(tmp_path), {}, "fsspec"
    if where == "faulty":
        url, options = "faulty://flags", _faulty.options(_faulty.Plan())
    elif where.startswith("s3"):
        server: S3Server = request.getfixturevalue("s3_server")
        url, options = f"s3://{request.getfixturevalue('s3_bucket')}/flags", server.storage_options
        backend = where.removeprefix("s3-")
        if backend == "obstore":
            pytest.importorskip("obstore")
    store = await open_store(url, options, backend=backend)
    items = [("w/a.bin", [b"one"]), ("w/b.bin", [b"tw", memoryview(b"o")])]
    try:
        assert store.is_local == (where == "local")
        if store.supports_write_many:
            assert await anyio.to_thread.run_sync(store.write_many, items) == [None, None]
            assert [await store.get(key) for key, _ in items] == [b"one", b"two"]
        else:
            with pytest.raises(NotImplementedError, match="put_many"):
                store.write_many(items)
            assert await store.list("w") == []
            assert await store.put_many(items) == [None, None]
    finally:
        await store.aclose()
    assert (where == "local") == store.supports_write_many  # the one store that has it today


@pytest.mark.anyio
async def test_bad_store_settings_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="attempts must be >= 1, got 0"):
        RetryPolicy(attempts=0)
    with pytest.raises(ConfigurationError, match="timeout must be > 0 or None, got 0"):
        RetryPolicy(timeout=0)
    with pytest.raises(ConfigurationError, match="temp_prefix must be 1 to 64 bytes without path separators"):
        await open_store(str(tmp_path), temp_prefix="a/b")


@pytest.mark.s3
@pytest.mark.anyio
@pytest.mark.parametrize("cache_regions", [False, True])
async def test_an_s3_store_closes_its_clients(
    s3_server: S3Server, s3_bucket: str, cache_regions: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After ``aclose`` nothing of s3fs's clients (one per bucket region with ``cache_regions``) is left open for
    aiohttp to warn about at garbage collection."""
    options = s3_server.storage_options
    if cache_regions:  # (s3fs caches regions only without an endpoint option: botocore's variable gives it)
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        options = {"key": options["key"], "secret": options["secret"], "cache_regions": True}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = await open_store(f"s3://{s3_bucket}/closing", options)
        await store.put("a.bin", [b"x"])
        assert await store.list() == ["a.bin"]
        await store.aclose()
        del store
        gc.collect()
    assert [str(w.message) for w in caught if "nclosed" in str(w.message)] == []
