import json
import os

import pytest

from lighter_sink._errors import CommitError
from lighter_sink._layout import ControlKeys
from lighter_sink._manifest import MANIFEST, id_order, merge_parts, sorted_ids
from lighter_sink._store import open_store
from lighter_sink._types import Record, encode_records

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
