"""The commit's streamed merge of the manifest: sorted parts, many passes, duplicates, failures halfway."""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path

import pytest
import torch

from lighter_sink import CommitError, Sink
from lighter_sink._errors import SinkError
from lighter_sink._layout import ControlKeys
from lighter_sink._manifest import MANIFEST, id_order, object_lines
from lighter_sink._merge import MIN_CHUNK, manifest_records, merge_parts, write_manifest
from lighter_sink._store import Store, open_store
from lighter_sink._types import Record, RecordStream, encode_records
from tests import _faulty
from tests.conftest import S3Server

KEYS = ControlKeys()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _record(identifier: str, nbytes: int = 1) -> Record:
    return Record(identifier, f"{identifier}.npy", nbytes, f"{nbytes:08x}", (4,), "float32")


def _ids(count: int, seed: int) -> list[str]:
    """Numeric and text ids, shuffled: counters, text that looks almost numeric, and plain text."""
    ids = [str(i) for i in range(count // 2)]
    ids += [f"0{i}" for i in range(count // 4)] + [f"s-{i:x}" for i in range(count - len(ids) - count // 4)]
    random.Random(seed).shuffle(ids)
    return ids


async def _write_parts(store: Store, ids: list[str], parts: int, seed: int) -> list[str]:
    """``ids`` spread over ``parts`` parts of very different sizes (each sorted by id, as ranks write them),
    interleaved across the ranks; returns the part keys."""
    rng = random.Random(seed)
    weights = [rng.choice([1, 1, 2, 5, 40]) for _ in range(parts)]
    spread: list[list[Record]] = [[] for _ in range(parts)]
    for identifier in ids:
        spread[rng.choices(range(parts), weights)[0]].append(_record(identifier, len(identifier)))
    keys = []
    for index, records in enumerate(spread):
        key = KEYS.part("g", f"run{index % 7}", index, index + 1)
        records.sort(key=lambda r: id_order(r.id))
        await store.put(key, [encode_records(records)])
        keys.append(key)
    return keys


async def _manifest_ids(store: Store) -> list[str]:
    return [Record.from_json(line).id async for chunk in object_lines(store, MANIFEST) for line in chunk]


@pytest.mark.anyio
@pytest.mark.parametrize("fan_in", [2, 5, 1024])
async def test_many_parts_of_different_sizes_merge_in_passes(tmp_path: os.PathLike[str], fan_in: int) -> None:
    store = await open_store(str(tmp_path))
    ids = _ids(6000, seed=fan_in)
    committed = sorted(ids[:500], key=id_order)
    await store.put(MANIFEST, [encode_records(_record(i, len(i)) for i in committed)])
    await _write_parts(store, ids[500:], 200, seed=fan_in)
    count, nbytes = await merge_parts(store, KEYS, "g", fan_in=fan_in, read_ahead=1)
    assert (count, nbytes) == (len(ids), sum(len(i) for i in ids))
    assert await _manifest_ids(store) == sorted(ids, key=id_order)
    assert await store.list(KEYS.parts) == []
    assert await store.list(KEYS.scratch) == []  # the intermediate runs are gone


@pytest.mark.anyio
@pytest.mark.parametrize("backend", ["fsspec", "obstore"])
async def test_a_merge_in_passes_on_s3_streams_the_manifest(s3_server: S3Server, s3_bucket: str, backend: str) -> None:
    """On an object store: the runs and the manifest go through its streamed outputs, the runs are removed."""
    options = {"endpoint_url": s3_server.endpoint, "key": "testing", "secret": "testing"}
    store = await open_store(f"s3://{s3_bucket}/m", options, backend=backend)
    try:
        ids = _ids(4000, seed=5)
        await _write_parts(store, ids, 60, seed=5)
        assert (await merge_parts(store, KEYS, "g", fan_in=8))[0] == len(ids)
        assert await _manifest_ids(store) == sorted(ids, key=id_order)
        assert await store.list(KEYS.parts) == [] and await store.list(KEYS.scratch) == []
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_an_id_on_two_ranks_fails_a_merge_of_many_passes(tmp_path: os.PathLike[str]) -> None:
    store = await open_store(str(tmp_path))
    ids = _ids(3000, seed=1)
    parts = await _write_parts(store, ids, 200, seed=1)
    await store.put(KEYS.part("g", "late", 7, 1), [encode_records([_record(ids[1234], 99)])])
    with pytest.raises(CommitError, match=f"{ids[1234]!r} was recorded twice"):
        await merge_parts(store, KEYS, "g", fan_in=3)
    assert not await store.exists(MANIFEST)
    assert sorted(await store.list(KEYS.parts)) == sorted([*parts, KEYS.part("g", "late", 7, 1)])
    assert await store.list(KEYS.scratch) == []


@pytest.mark.anyio
async def test_parts_out_of_id_order_are_sorted_first(tmp_path: os.PathLike[str]) -> None:
    """A resumed run's record of its orphans, parts of an earlier version: sorted in runs, then merged."""
    store = await open_store(str(tmp_path))
    ids = _ids(900, seed=2)
    await _write_parts(store, ids[:600], 30, seed=2)
    await store.put(KEYS.part("g", "old", 0, 0), [encode_records(_record(i) for i in ids[600:800])])
    await store.put(KEYS.part("g", "old", 0, 1), [encode_records(_record(i) for i in ids[800:])])
    assert (await merge_parts(store, KEYS, "g", fan_in=4))[0] == 900
    assert await _manifest_ids(store) == sorted(ids, key=id_order)


@pytest.mark.anyio
async def test_a_part_that_repeats_a_line_of_the_manifest_is_one_record(tmp_path: os.PathLike[str]) -> None:
    """A commit that wrote the manifest and failed before it removed the parts: its parts repeat its lines."""
    store = await open_store(str(tmp_path))
    await store.put(KEYS.part("g", "r", 0, 1), [encode_records([_record("1"), _record("3")])])
    await store.put(KEYS.part("g", "r", 1, 1), [encode_records([_record("2")])])
    merged = await write_manifest(store, KEYS, "g")
    assert merged.count == 3 and len(merged.parts) == 2
    assert await merge_parts(store, KEYS, "g") == (3, 3)
    assert await _manifest_ids(store) == ["1", "2", "3"]
    # a part that records an id of the manifest differently is a second prediction of it
    await store.put(KEYS.part("g", "r2", 0, 1), [encode_records([_record("2", 5)])])
    with pytest.raises(CommitError, match="'2' was recorded twice"):
        await merge_parts(store, KEYS, "g")


@pytest.mark.anyio
async def test_the_merge_reads_each_source_a_bounded_chunk_at_a_time() -> None:
    """What one pass holds of each source: one chunk of read_ahead / sources bytes (at least MIN_CHUNK)."""
    plan = _faulty.Plan()
    store = await open_store("faulty://bounded", _faulty.options(plan))
    ids = [str(i) for i in range(20_000)]
    await store.put(KEYS.part("g", "r", 0, 1), [encode_records(_record(i) for i in ids[::2])])
    await store.put(KEYS.part("g", "r", 1, 1), [encode_records(_record(i) for i in ids[1::2])])
    assert len(await store.get(KEYS.part("g", "r", 0, 1))) > 20 * MIN_CHUNK
    assert (await merge_parts(store, KEYS, "g", read_ahead=2 * MIN_CHUNK))[0] == len(ids)
    asked = [size for path, size in plan.reads if "/_parts/" in path]
    assert len(asked) > 40 and max(asked) == MIN_CHUNK
    assert await _manifest_ids(store) == ids


@pytest.mark.anyio
async def test_a_failure_halfway_through_the_merge_leaves_everything_for_the_next_one() -> None:
    plan = _faulty.Plan(
        fail=OSError(errno.ENOSPC, "No space left on device"),
        fail_when=lambda path: "/_manifest-merge/" in path,
        fail_first=1,
        control=True,
    )
    store = await open_store("faulty://merge", _faulty.options(plan))
    ids = _ids(2000, seed=3)
    await store.put(MANIFEST, [encode_records(_record(i) for i in sorted(ids[:100], key=id_order))])
    before = await store.get(MANIFEST)
    parts = await _write_parts(store, ids[100:], 40, seed=3)
    with pytest.raises(OSError, match="No space left"):
        await merge_parts(store, KEYS, "g", fan_in=4)
    assert plan.failures == 1
    assert await store.get(MANIFEST) == before
    assert sorted(await store.list(KEYS.parts)) == sorted(parts)
    assert await merge_parts(store, KEYS, "g", fan_in=4) == (2000, 100 + sum(len(i) for i in ids[100:]))
    assert await _manifest_ids(store) == sorted(ids, key=id_order)
    assert await store.list(KEYS.scratch) == []


@pytest.mark.anyio
async def test_manifest_records_stream_the_records_in_id_order(tmp_path: os.PathLike[str]) -> None:
    store = await open_store(str(tmp_path))
    ids = _ids(500, seed=4)
    await _write_parts(store, ids, 9, seed=4)
    await write_manifest(store, KEYS, "g")
    stream = manifest_records(store, KEYS)
    assert [r.id async for r in stream] == sorted(ids, key=id_order)
    assert list(await stream.collect()) == sorted(ids, key=id_order)  # (a second pass reads them again)
    assert [r.id async for r in RecordStream.of([_record("b"), _record("a")])] == ["b", "a"]


def test_a_rank_writes_its_parts_sorted_by_id(tmp_path: Path) -> None:
    sink = Sink(str(tmp_path)).open()
    ids = [*map(str, range(300, 0, -1)), "b", "a", "007"]
    sink.put_batch(ids, torch.zeros(len(ids), 2))
    sink.flush()
    (part,) = list((tmp_path / "_parts").rglob("*.jsonl"))
    written = [Record.from_json(line).id for line in part.read_text().splitlines()]
    assert written == sorted(ids, key=id_order)
    sink.close()
    assert json.loads((tmp_path / "_SUCCESS").read_text())["count"] == len(ids)


def test_a_commit_that_fails_after_the_manifest_is_resumed_whole() -> None:
    """The table fails at commit after the manifest was written: no _SUCCESS; a resume commits every row once."""
    plan = _faulty.Plan(
        fail=OSError(errno.ENOSPC, "No space left on device"),
        fail_when=lambda path: path.endswith("/predictions.csv"),
        fail_first=1,
        control=True,
    )
    ids = list(range(5000))
    sink = Sink("faulty://table", format="csv", storage_options=_faulty.options(plan), retries=1).open()
    sink.put_batch(ids, torch.arange(5000.0))
    with pytest.raises((OSError, SinkError), match="No space left"):
        sink.close()
    assert "/table/_SUCCESS" not in plan.files
    assert "/table/_manifest.jsonl" in plan.files  # written before the table, whose commit failed
    with Sink("faulty://table", format="csv", storage_options=_faulty.options(plan), mode="resume") as resumed:
        resumed.put_batch(ids, torch.arange(5000.0))
    assert json.loads(_faulty.read(plan, "/table/_SUCCESS"))["count"] == 5000
    manifest = _faulty.read(plan, "/table/_manifest.jsonl").decode().splitlines()
    assert [json.loads(line)["id"] for line in manifest] == ids
    rows = _faulty.read(plan, "/table/predictions.csv").decode().splitlines()
    assert rows[0] == "id,value" and [int(r.split(",")[0]) for r in rows[1:]] == ids
    assert not [path for path in plan.files if "/_parts/" in path or "/_table_parts/" in path]
