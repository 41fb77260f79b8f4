import json
import os
import uuid

import pytest

from lighter_sink._errors import CommitError
from lighter_sink._layout import ControlKeys
from lighter_sink._manifest import (
    MANIFEST,
    id_order,
    object_lines,
    read_records,
    recorded_ids,
    recorded_sets,
    sorted_ids,
)
from lighter_sink._merge import merge_parts
from lighter_sink._store import open_store
from lighter_sink._types import Record, encode_records
from tests.conftest import S3Server

KEYS = ControlKeys()


def part_key(rank: int, run: str, sequence: int) -> str:
    return KEYS.part("g", run, rank, sequence)


def _record(identifier: str, nbytes: int, crc: str = "0000abcd") -> Record:
    return Record(identifier, f"{identifier}.npy", nbytes, crc, (2, 3), "float32")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_merge_sorts_ids_and_sums_sizes(tmp_path: os.PathLike[str]) -> None:
    store = await open_store(str(tmp_path))
    awkward = ['say "hi", ok', 'x,"path":"y"', "back\\slash", "ünï/cødé", "10", "b", "a"]
    first = [_record(i, n) for n, i in enumerate(awkward, start=1)]
    await store.put(part_key(0, "t", 1), [encode_records(first)])
    await store.put(part_key(1, "t", 2), [encode_records([_record("9", 100, "ffffffff")])])
    count, nbytes = await merge_parts(store, KEYS, "g")
    lines = (await store.get(MANIFEST)).decode().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert ids == [9, 10, "a", "b", "back\\slash", 'say "hi", ok', 'x,"path":"y"', "ünï/cødé"]
    assert count == 8
    assert nbytes == sum(n for n, _ in enumerate(awkward, start=1)) + 100
    assert Record.from_json(lines[0]) == _record("9", 100, "ffffffff")
    assert all(Record.from_json(line).to_json() == line for line in lines)  # lines pass through unchanged
    assert await store.list("_parts") == []


@pytest.mark.anyio
async def test_an_id_recorded_twice_fails_the_merge(tmp_path: os.PathLike[str]) -> None:
    """Two ranks recorded one id: which prediction is right cannot be known; listing one would hide the other."""
    store = await open_store(str(tmp_path))
    await store.put(part_key(0, "r0", 1), [encode_records([_record("9", 1), _record("10", 2)])])
    await store.put(part_key(1, "r1", 1), [encode_records([_record("9", 100, "ffffffff")])])
    with pytest.raises(CommitError, match="'9' was recorded twice"):
        await merge_parts(store, KEYS, "g")
    assert not await store.exists(MANIFEST)


@pytest.mark.anyio
async def test_merge_reads_lines_in_another_layout(tmp_path: os.PathLike[str]) -> None:
    """A manifest line written by something else than Record.to_json (key order, spaces) still merges."""
    store = await open_store(str(tmp_path))
    foreign = json.dumps({"path": "3.npy", "id": "3", "crc32": "00000001", "nbytes": 7, "shape": [], "dtype": "u1"})
    spaced = '{"id": "4","path":"4.npy","nbytes": 1,"crc32":"00000002","shape":[],"dtype":"u1"}'
    await store.put(MANIFEST, [foreign.encode() + b"\n" + spaced.encode() + b"\n"])
    await store.put(part_key(0, "t", 1), [encode_records([_record("1", 5)])])
    assert await merge_parts(store, KEYS, "g") == (3, 13)
    assert [json.loads(line)["id"] for line in (await store.get(MANIFEST)).decode().splitlines()] == [1, 3, 4]


def test_sorted_ids_is_the_id_order() -> None:
    ids = ["10", "b", "2", "a/1", "0", "007", "a", "100", "_x", "9"]
    assert sorted_ids(ids) == sorted(ids, key=id_order)
    # "007" is text: a number's id has no leading zero, else "007" and "7" would be one id
    assert sorted_ids(ids) == ["0", "2", "9", "10", "100", "007", "_x", "a", "a/1", "b"]


@pytest.mark.anyio
async def test_merge_writes_number_ids_as_numbers_whichever_kind_it_read(tmp_path: os.PathLike[str]) -> None:
    """A manifest written before ids kept their type (``"id":"3"``) merges with typed parts into typed lines."""
    store = await open_store(str(tmp_path))
    old = [
        '{"id":"3","path":"3.npy","nbytes":1,"crc32":"00000001","shape":[],"dtype":"u1"}',
        '{"id":"03","path":"03.npy","nbytes":1,"crc32":"00000001","shape":[],"dtype":"u1"}',
        json.dumps({"path": "4.npy", "id": "4", "crc32": "00000002", "nbytes": 1, "shape": [], "dtype": "u1"}),
    ]
    await store.put(MANIFEST, ["".join(line + "\n" for line in old).encode()])
    await store.put(part_key(0, "t", 1), [encode_records([_record("1", 5), _record("x", 2)])])
    assert await merge_parts(store, KEYS, "g") == (5, 10)
    lines = (await store.get(MANIFEST)).decode().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [1, 3, 4, "03", "x"]
    assert (
        lines[0]
        == _record("1", 5).to_json()
        == '{"id":1,"path":"1.npy","nbytes":5,"crc32":"0000abcd","shape":[2,3],"dtype":"float32"}'
    )
    assert lines[1] == '{"id":3,"path":"3.npy","nbytes":1,"crc32":"00000001","shape":[],"dtype":"u1"}'
    assert [Record.from_json(line).id for line in lines] == ["1", "3", "4", "03", "x"]  # ids are text inside


def test_a_record_keeps_its_ids_type_in_json() -> None:
    assert json.loads(_record("12", 1).to_json())["id"] == 12
    for text in ("012", "a", "1.5", "-1", "٣", 'say "hi"'):
        assert json.loads(_record(text, 1).to_json())["id"] == text
    assert Record.from_json(_record("12", 1).to_json()) == _record("12", 1)
    with pytest.raises(ValueError, match="id"):
        Record.from_json('{"id":1.5,"path":"a","nbytes":1,"crc32":"00000001","shape":[],"dtype":"u1"}')


@pytest.mark.anyio
@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 64])
async def test_object_lines_reads_every_line_in_bounded_chunks(
    tmp_path: os.PathLike[str], s3_server: S3Server, size: int
) -> None:
    """Chunks of 8 bytes: lines longer than a chunk, objects ending exactly at a chunk's end, blank lines."""
    lines = [("x" * (n % 13)) + str(n) for n in range(size)]
    body = "".join(line + ("\n\n" if n % 5 == 0 else "\n") for n, line in enumerate(lines)).encode()
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)
    options = {"endpoint_url": s3_server.endpoint, "key": "testing", "secret": "testing"}
    for url, backend in [(str(tmp_path), "fsspec"), (f"s3://{bucket}/m", "fsspec"), (f"s3://{bucket}/o", "obstore")]:
        store = await open_store(url, options if "://" in url else {}, backend=backend)
        try:
            await store.put("m.jsonl", [body])
            read = [line async for chunk in object_lines(store, "m.jsonl", chunk_bytes=8) for line in chunk]
            assert read == lines, url
            for length in (max(1, len(body)), 2 * len(body) + 1):  # (an object exactly one chunk long, and a short one)
                whole = [line async for chunk in object_lines(store, "m.jsonl", chunk_bytes=length) for line in chunk]
                assert whole == lines, url
            with pytest.raises(FileNotFoundError):
                _ = [chunk async for chunk in object_lines(store, "absent.jsonl")]
        finally:
            await store.aclose()


@pytest.mark.anyio
async def test_recorded_ids_streams_what_read_records_reads(tmp_path: os.PathLike[str]) -> None:
    store = await open_store(str(tmp_path))
    awkward = ['say "hi", ok', 'x,"path":"y"', "back\\slash", "ünï/cødé", "10", "007", "b"]
    manifest = [Record(i, f'dir "{n}"/{i}.npy', 1, "0", (1,), "float32") for n, i in enumerate(awkward)]
    await store.put(MANIFEST, [encode_records(manifest)])
    # a part of another layout (fields reordered) and an older one (a number's id as a string)
    older = '{"id":"12","path":"12.npy","nbytes":1,"crc32":"0","shape":[1],"dtype":"float32"}\n'
    reordered = '{"path":"13.npy","id":13,"nbytes":1,"crc32":"0","shape":[1],"dtype":"float32"}\n'
    await store.put(part_key(0, "t", 1), [(older + reordered).encode()])
    await store.put(part_key(0, "t", 2), [encode_records([_record(str(i), 1) for i in range(100, 400)])])
    expected = {r.id: r.path for r in (await read_records(store, KEYS, "g")).values()}
    streamed = [chunk async for chunk in recorded_ids(store, KEYS, "g", chunk_bytes=64)]
    assert len(streamed) > 10  # (a chunk of a few lines at a time)
    assert dict(pair for ids, paths in streamed for pair in zip(ids, paths, strict=True)) == expected
    paths, ids = await recorded_sets(store, KEYS, "g", suffix=".npy", ids=True)
    assert ids.contains([*expected, "11", "99", "400"]).tolist() == [True] * len(expected) + [False] * 3
    # each path less the extension; one without it is no key's object
    assert paths.contains(["100", "399", "12", "13", "400", f'dir "0"/{awkward[0]}']).tolist() == [
        True, True, True, True, False, True
    ]  # fmt: skip
    assert not paths.contains([f'dir "0"/{awkward[0]}.npy'])[0]
    await store.delete([MANIFEST])  # no manifest merged yet: the parts alone
    assert sum(len(ids) for ids, _ in [c async for c in recorded_ids(store, KEYS, "g")]) == 302
