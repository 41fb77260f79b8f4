"""Local temporary names: bounded whatever the object's name, and swept only within their own namespace."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lighter_sink import Sink
from lighter_sink._store import open_store

_NAME_MAX = 255  # bytes in one file name on ext4, xfs, tmpfs, NFS


def test_an_object_whose_name_is_near_the_filesystem_limit_is_stored(tmp_path: Path) -> None:
    identifier = "p" * 241  # "ppp...p.npy": a legal 245-byte name
    assert len(f"{identifier}.npy".encode()) == 245
    nested = "dir/" + "é" * 120  # a nested key whose last segment is 244 bytes of UTF-8 (+ .npy)
    with Sink(tmp_path) as sink:
        sink.put(identifier, torch.arange(3))
        sink.put(nested, torch.arange(2))
    np.testing.assert_array_equal(np.load(tmp_path / f"{identifier}.npy"), np.arange(3))
    np.testing.assert_array_equal(np.load(tmp_path / f"{nested}.npy"), np.arange(2))
    paths = [json.loads(line)["path"] for line in (tmp_path / "_manifest.jsonl").read_text().splitlines()]
    assert sorted(paths) == sorted([f"{identifier}.npy", f"{nested}.npy"])
    assert json.loads((tmp_path / "_SUCCESS").read_text())["count"] == 2
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_a_table_with_a_long_file_name_is_committed(tmp_path: Path) -> None:
    from lighter_sink.formats import CsvFormat

    filename = "t" * 247 + ".csv"  # 251 bytes: the table's own temporary file must not add to its name
    with Sink(tmp_path, format=CsvFormat(filename=filename)) as sink:
        sink.put_batch(range(3), torch.arange(3.0))
    assert (tmp_path / filename).read_text().splitlines() == ["id,value", "0,0.0", "1,1.0", "2,2.0"]


@pytest.mark.anyio
async def test_temporary_names_are_bounded_and_live_in_the_stores_namespace(tmp_path: Path) -> None:
    store = await open_store(str(tmp_path), temp_prefix=".lsink.", run="run-b")
    try:
        temp = store.temp_path("x" * 250)
        assert os.path.dirname(temp) == str(tmp_path)
        name = os.path.basename(temp)
        assert name.startswith(".lsink.run-b.") and name.endswith(".tmp")
        assert len(name.encode()) < 64 < _NAME_MAX
        assert store.temp_path("a/b/c.npy").startswith(str(tmp_path / "a" / "b") + os.sep)
        assert store.temp_path("k") != store.temp_path("k")  # a fresh name each time
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_a_sweep_removes_stale_temporaries_of_its_prefix_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    stale = [tmp_path / ".lsink.run-a.1.tmp", tmp_path / "sub" / ".lsink.run-a.7.tmp"]  # a killed run's
    own = tmp_path / ".lsink.run-b.3.tmp"  # this run's, in flight
    others = [
        tmp_path / ".other.run-a.1.tmp",  # another output's namespace in the same directory
        tmp_path / "notes.tmp",  # objects whose names merely look temporary
        tmp_path / ".lsink.run-a.1.npy",
        tmp_path / "sub" / "0.npy",
    ]
    for path in [*stale, own, *others]:
        path.write_bytes(b"x")
    store = await open_store(str(tmp_path), temp_prefix=".lsink.", run="run-b")
    try:
        # temporaries of the prefix are not objects, whichever run wrote them
        assert await store.list() == [".lsink.run-a.1.npy", ".other.run-a.1.tmp", "notes.tmp", "sub/0.npy"]
        assert await store.remove_incomplete() == 2
    finally:
        await store.aclose()
    assert [p for p in stale if p.exists()] == []
    assert own.exists()
    assert all(p.exists() for p in others)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
