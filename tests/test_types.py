"""Records as columns (a shard's): the same records, the same manifest lines, a few bytes each."""

from __future__ import annotations

import tracemalloc

import pytest
import torch

from lighter_sink._manifest import id_order
from lighter_sink._types import Record, RecordColumns, encode_records, encode_sorted
from lighter_sink.formats import ParquetFormat, TarFormat

AWKWARD = ['say "hi", ok', 'x,"path":"y"', "back\\slash", "ünï/cødé", "007", "\udcff", "a" * 300]


def _records(path: str) -> list[Record]:
    numbers = (5000, 12, 7, 0, 2**40, 10**30)
    records = [
        Record(str(i), path, 100 + n, f"{i * 0x01010101 % 2**32:08x}", (2, 3) if n % 3 else (), "float32", 512 * n)
        for n, i in enumerate(numbers)
    ]
    records += [
        Record(i, path, 7, "ffffffff", (4,), "uint8" if n % 2 else 'a "dtype"', n) for n, i in enumerate(AWKWARD)
    ]
    records.append(Record("no-offset", path, 0, "00000000", (0,), "bool"))
    return records


def _columns(records: list[Record]) -> RecordColumns:
    columns = RecordColumns()
    for start in range(0, len(records), 5):  # (in several pieces, as a packer adds its batches)
        part = records[start : start + 5]
        columns.extend(
            [r.id for r in part],
            [r.offset for r in part],
            [r.nbytes for r in part],
            [int(r.crc32, 16) for r in part],
            [(r.shape, r.dtype) for r in part],
        )
    return columns


def test_record_columns_are_the_records_they_were_given() -> None:
    records = _records("shards/run-r00000-000000.tar")
    columns = _columns(records).at(records[0].path)
    assert len(columns) == len(records)
    assert list(columns) == records
    assert [columns[i] for i in range(-len(records), 0)] == records
    assert columns[2:9:3] == records[2:9:3]
    assert columns.ids() == [r.id for r in records]
    assert columns.total_bytes() == sum(r.nbytes for r in records)
    assert [columns.line(i, r.id) for i, r in enumerate(records)] == [r.to_json() for r in records]
    with pytest.raises(IndexError):
        columns[len(records)]
    assert list(RecordColumns().at("x")) == [] and not RecordColumns()


def test_record_columns_need_one_value_of_each_per_id() -> None:
    with pytest.raises(ValueError, match="one offset, size, checksum and kind per id"):
        RecordColumns().extend(["a", "b"], [0, 1], [1], [0, 0], [((), "x")] * 2)


def test_encode_sorted_writes_the_lines_of_the_records_sorted_by_id() -> None:
    """Columns and lists together, more lines than one buffer takes: the bytes of the records sorted stably."""
    shard = _records("shards/a.tar")
    other = _records("shards/b.tar")[:4]  # (ids the shard has too: a stable sort keeps the shard's first)
    many = [Record(str(i), f"{i}.npy", i, "0000abcd", (4,), "float32") for i in range(20_000, 0, -1)]
    chunks = [_columns(shard).at("shards/a.tar"), other, many]
    expected = encode_records(sorted([*shard, *other, *many], key=lambda r: id_order(r.id)))
    buffers = encode_sorted(chunks)
    assert len(buffers) > 1
    assert b"".join(buffers) == expected
    assert encode_sorted([]) == []


@pytest.mark.parametrize("fmt", [TarFormat(), ParquetFormat()])
def test_a_packer_holds_its_members_in_a_few_bytes_each(fmt: TarFormat | ParquetFormat) -> None:
    """A shard's place of each prediction is kept until the shard is stored: hundreds of thousands of them. As
    objects they took about 200 bytes each; as columns, the id's characters and a few numbers."""
    batch = torch.arange(1024 * 4, dtype=torch.float32).reshape(1024, 4)
    warm = fmt.open_packer()  # (what a first shard imports and caches is not the members')
    warm.add(["0"], fmt.prepare(["0"], batch[:1]))
    warm.finish()
    packer = fmt.open_packer(warm)
    tracemalloc.start()
    try:
        for start in range(0, 100 * 1024, 1024):
            ids = [str(i) for i in range(start, start + 1024)]
            packer.add(ids, fmt.prepare(ids, batch))
        packer.finish()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    count = len(packer.members)
    assert count == 100 * 1024
    assert held < count * 64, held / count
