"""Tar members are named by id whatever the id: long, non-ASCII, with spaces or slashes; tarfile reads them back."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch

from lighter_sink import Sink

NAMES = [
    "0",
    "sample 1",
    "x" * 96,  # the member name is exactly 100 bytes, the most a plain header holds
    "y" * 97,  # one more: a pax record
    "patient/scan-7",
    "énorme",
    "日本語",
    "a" * 300,
]


def test_tar_members_are_named_by_id_and_read_back_by_tarfile(tmp_path: Path) -> None:
    url = tmp_path / "out"
    values = {name: torch.full((3,), float(i)) for i, name in enumerate(NAMES)}
    with Sink(str(url), format="tar") as sink:
        for name, value in values.items():
            sink.put(name, value)
    (shard,) = (url / "shards").iterdir()
    with tarfile.open(shard) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}  # type: ignore[union-attr]
    assert sorted(members) == sorted(f"{name}.npy" for name in NAMES)
    for name, value in values.items():
        assert np.array_equal(np.load(io.BytesIO(members[f"{name}.npy"])), value.numpy())
    # each record's range is its member's data, byte for byte
    data = shard.read_bytes()
    for line in (url / "_manifest.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert data[record["offset"] : record["offset"] + record["nbytes"]] == members[f"{record['id']}.npy"]


def test_members_small_and_large_and_of_odd_sizes_read_back_whole(tmp_path: Path) -> None:
    """Small members are copied into the shard's buffers, large ones passed on as views: both read back exactly."""
    url = tmp_path / "out"
    values = {
        "tiny": torch.arange(3, dtype=torch.uint8),  # a member far below a tar block
        "odd": torch.arange(70_001, dtype=torch.uint8),  # over the copy threshold, not a multiple of 512
        "large": torch.randn(2**18 + 3),  # about 1 MiB
        "after": torch.arange(5, dtype=torch.int16),
    }
    with Sink(str(url), format="tar", concurrency=1) as sink:
        for name, value in values.items():
            sink.put(name, value)
        sink.put_batch(["b0", "b1"], torch.randn(2, 40_000))  # rows of a batch as views, 160 kB each
    (shard,) = (url / "shards").iterdir()
    data = shard.read_bytes()
    with tarfile.open(shard) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}  # type: ignore[union-attr]
    assert sorted(members) == sorted(f"{name}.npy" for name in [*values, "b0", "b1"])
    for name, value in values.items():
        assert np.array_equal(np.load(io.BytesIO(members[f"{name}.npy"])), value.numpy())
    for line in (url / "_manifest.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert data[record["offset"] : record["offset"] + record["nbytes"]] == members[f"{record['id']}.npy"]
