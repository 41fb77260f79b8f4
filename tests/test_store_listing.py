"""``Store.iter_list``: the url listed a page at a time, and resume, overwrite and remaining() over such listings
of more objects than one S3 listing request returns (moto's server, 1,000 keys a page)."""

from __future__ import annotations

import io
import json
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from lighter_sink import DestinationError, Sink, remaining
from lighter_sink._store import open_store
from tests.conftest import S3Server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _pages(url: str, page_size: int, prefix: str = "", begins: str = "", **options: object) -> list[list[str]]:
    store = await open_store(url, options, backend=str(options.pop("backend", "fsspec")))  # type: ignore[arg-type]
    try:
        return [page async for page in store.iter_list(prefix, page_size=page_size, begins=begins)]
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_local_listing_comes_in_pages_of_every_folder(tmp_path: Path) -> None:
    names = [f"{i}.npy" for i in range(23)] + [f"sub/{i}.npy" for i in range(5)] + ["sub/deep/x.npy"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub" / ".lsink.killed.1.tmp").write_bytes(b"partial")  # an unfinished write: no object
    pages = await _pages(str(tmp_path), 4)
    assert all(1 <= len(page) <= 4 for page in pages) and len(pages) == 8  # (29 keys)
    assert sorted(key for page in pages for key in page) == sorted(names)
    assert [key for page in await _pages(str(tmp_path), 100, "sub") for key in page] != []
    assert sorted(k for page in await _pages(str(tmp_path), 2, "sub") for k in page) == sorted(names[23:])
    assert await _pages(str(tmp_path / "nothing-here"), 10) == []
    with pytest.raises(ValueError, match="page_size"):
        await _pages(str(tmp_path), 0)
    # names that begin so, in the folder listed: a file, a folder walked whole, nothing deeper that merely matches
    for name in ["_SUCCESS", "_parts/g/0.jsonl", "_parts/g/_x.jsonl", "sub/_hidden.npy", "^caret.npy", "a_b.npy"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert sorted(k for page in await _pages(str(tmp_path), 2, begins="_") for k in page) == [
        "_SUCCESS",
        "_parts/g/0.jsonl",
        "_parts/g/_x.jsonl",
    ]
    assert [k for page in await _pages(str(tmp_path), 10, "sub", begins="_") for k in page] == ["sub/_hidden.npy"]
    with pytest.raises(ValueError, match="without '/'"):
        await _pages(str(tmp_path), 10, begins="_parts/")


@pytest.mark.s3
@pytest.mark.anyio
@pytest.mark.parametrize("backend", ["fsspec", "obstore"])
async def test_s3_listing_comes_in_pages(s3_server: S3Server, s3_bucket: str, backend: str) -> None:
    client = s3_server.client()
    names = [f"{i}.npy" for i in range(10)] + ["a/b/c.npy", "_parts/g/r/0.jsonl"]
    for name in names:
        client.put_object(Bucket=s3_bucket, Key=f"run/{name}", Body=b"x")
    client.put_object(Bucket=s3_bucket, Key="run-other/0.npy", Body=b"x")  # (beside the url, not below it)
    options = {**s3_server.storage_options, "backend": backend}
    pages = await _pages(f"s3://{s3_bucket}/run", 3, **options)
    assert [len(page) for page in pages] == [3, 3, 3, 3]
    assert sorted(key for page in pages for key in page) == sorted(names)
    assert [k for page in await _pages(f"s3://{s3_bucket}/run", 1000, "_parts", **options) for k in page] == [
        "_parts/g/r/0.jsonl"
    ]
    whole = [k for page in await _pages(f"s3://{s3_bucket}", 5, **options) for k in page]
    assert sorted(whole) == sorted([f"run/{name}" for name in names] + ["run-other/0.npy"])
    # names that begin so: a folder's keys and a file's, whether other names sort before them or after
    for name in ["_SUCCESS", "^caret.npy", "a_b.npy", "a/_deep.npy"]:
        client.put_object(Bucket=s3_bucket, Key=f"run/{name}", Body=b"x")
    control = [k for page in await _pages(f"s3://{s3_bucket}/run", 1, begins="_", **options) for k in page]
    assert sorted(control) == ["_SUCCESS", "_parts/g/r/0.jsonl"]
    assert [k for page in await _pages(f"s3://{s3_bucket}/run", 9, "a", begins="_", **options) for k in page] == [
        "a/_deep.npy"
    ]
    top = [k for page in await _pages(f"s3://{s3_bucket}", 3, begins="run-", **options) for k in page]
    assert top == ["run-other/0.npy"]


def _npy(value: float) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.full((2,), value, dtype=np.float32))
    return buffer.getvalue()


@pytest.mark.s3
@pytest.mark.parametrize("backend", ["fsspec", "obstore"])
def test_resume_overwrite_and_remaining_list_thousands_of_objects_in_pages(
    s3_server: S3Server, s3_bucket: str, backend: str
) -> None:
    """A committed output of 1,200 predictions, and 1,300 objects a killed run stored without recording them:
    three listing pages of moto's 1,000 keys, each checked against the recorded set."""
    url = f"s3://{s3_bucket}/run"
    options = s3_server.storage_options
    with Sink(url, storage_options=options, backend=backend) as sink:  # type: ignore[arg-type]
        sink.put_batch(range(1200), torch.ones(1200, 2))
    client = s3_server.client()
    body = _npy(2.0)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=s3_bucket, Key=f"run/{i}.npy", Body=body), range(1200, 2500)))

    assert list(remaining(url, list(range(2600)), storage_options=options).indices) == list(range(2500, 2600))
    with pytest.raises(DestinationError, match="already holds objects"):
        Sink(url, storage_options=options, backend=backend, mode="error").open()  # type: ignore[arg-type]

    with Sink(url, storage_options=options, backend=backend, mode="resume") as sink:  # type: ignore[arg-type]
        sink.put_batch(range(2600), torch.full((2600, 2), 3.0))
    assert sink.stats.skipped == 2500 and sink.stats.items == 100
    manifest = client.get_object(Bucket=s3_bucket, Key="run/_manifest.jsonl")["Body"].read().decode().splitlines()
    assert [json.loads(line)["id"] for line in manifest] == list(range(2600))
    adopted = np.load(io.BytesIO(client.get_object(Bucket=s3_bucket, Key="run/1300.npy")["Body"].read()))
    assert adopted.tolist() == [2.0, 2.0]  # (kept: the killed run's object, adopted; not written again)

    with Sink(url, storage_options=options, backend=backend, mode="overwrite") as sink:  # type: ignore[arg-type]
        sink.put_batch(range(5), torch.zeros(5, 2))
    assert s3_server.keys(s3_bucket, "run/") == sorted(
        [f"run/{i}.npy" for i in range(5)] + ["run/_SUCCESS", "run/_manifest.jsonl"]
    )


def _recorded_listings(s3_server: S3Server) -> list[str]:
    """The ``prefix`` of each ListObjectsV2 request moto recorded since the recording started."""
    with urllib.request.urlopen(f"{s3_server.endpoint}/moto-api/recorder/download-recording") as response:
        requests = [json.loads(line) for line in response.read().decode().splitlines() if line.strip()]
    prefixes = []
    for request in requests:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(request["url"]).query, keep_blank_values=True)
        if request["method"] == "GET" and query.get("list-type") == ["2"]:
            prefixes.append(query.get("prefix", [""])[0])
    return prefixes


def _recorder(s3_server: S3Server, action: str) -> None:
    request = urllib.request.Request(f"{s3_server.endpoint}/moto-api/recorder/{action}", method="POST")
    urllib.request.urlopen(request).close()


@pytest.mark.s3
@pytest.mark.parametrize("backend", ["fsspec", "obstore"])
def test_remaining_walks_a_url_of_per_object_predictions_once(
    s3_server: S3Server, s3_bucket: str, backend: str
) -> None:
    """Finding the url's outputs reads only the keys that begin with ``_`` (every control object's); the one walk
    of the whole url is the search for objects a killed run stored without recording them (moto's recorder counts
    the real listing requests)."""
    url = f"s3://{s3_bucket}/run"
    options = s3_server.storage_options
    with Sink(url, storage_options=options, backend=backend) as sink:  # type: ignore[arg-type]
        sink.put_batch(range(2100), torch.ones(2100, 2))
    _recorder(s3_server, "reset-recording")
    _recorder(s3_server, "start-recording")
    try:
        left = remaining(url, list(range(2200)), storage_options=options)
    finally:
        _recorder(s3_server, "stop-recording")
    assert list(left.indices) == list(range(2100, 2200))
    prefixes = _recorded_listings(s3_server)
    walks = [p for p in prefixes if p == "run/"]
    assert len(walks) == 3, repr(prefixes)  # (2,100 objects and the control objects: three pages of 1,000)
    assert all(p == "run/" or p.startswith("run/_") for p in prefixes), prefixes


@pytest.mark.anyio
async def test_a_store_that_lists_whole_keeps_only_the_names_that_begin_so() -> None:
    url = f"memory://begins-{uuid.uuid4().hex[:8]}"
    store = await open_store(url, {})
    try:
        for name in ["_SUCCESS", "_parts/g/0.jsonl", "0.npy", "a_b.npy", "sub/_x.npy"]:
            await store.put(name, [b"x"])
        pages = [page async for page in store.iter_list(page_size=1, begins="_")]
        assert sorted(k for page in pages for k in page) == ["_SUCCESS", "_parts/g/0.jsonl"]
        assert [k async for page in store.iter_list("sub", begins="_") for k in page] == ["sub/_x.npy"]
    finally:
        await store.aclose()
