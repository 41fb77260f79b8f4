"""Reading shards back as their users do (tarfile, pyarrow), and the predictions the shard tests put."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from lighter_sink import Sink

WIDTH = 16


def values(ids: Iterable[int]) -> np.ndarray[Any, Any]:
    """Prediction ``i`` is ``16 * i + [0, 1, ..., 15]``: exact in float32 for every id used here."""
    base = np.fromiter(ids, dtype=np.int64)
    return (base[:, None] * WIDTH + np.arange(WIDTH)).astype(np.float32)


def put_all(sink: Sink, n: int, batch: int) -> None:
    for start in range(0, n, batch):
        ids = range(start, min(start + batch, n))
        sink.put_batch(ids, torch.from_numpy(values(ids)))


def tar_members(data: bytes) -> Iterator[tuple[str, str, bytes]]:
    """``(name without extension, extension, bytes)`` of each member, as ``tarfile`` reads them."""
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for member in archive:
            body = archive.extractfile(member)
            assert body is not None
            stem, _, extension = member.name.rpartition(".")
            yield stem, extension, body.read()


def parquet_rows(data: bytes) -> tuple[list[Any], np.ndarray[Any, Any]]:
    table = pq.read_table(io.BytesIO(data))
    flat = table.column("value").combine_chunks().flatten().to_numpy()
    return table.column("id").to_pylist(), flat.reshape(table.num_rows, -1)


def read_shards(fmt: str, shards: Iterable[bytes]) -> dict[int, np.ndarray[Any, Any]]:
    """Every prediction of the shards by id; an id seen twice fails."""
    found: dict[int, np.ndarray[Any, Any]] = {}
    for data in shards:
        if fmt == "tar":
            rows = [(int(stem), np.load(io.BytesIO(body))) for stem, extension, body in tar_members(data)]
        else:
            ids, array = parquet_rows(data)
            rows = list(zip(ids, array, strict=True))
        for identifier, value in rows:
            assert identifier not in found, f"id {identifier} stored twice"
            found[identifier] = value
    return found


def manifest(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "_manifest.jsonl").read_text().splitlines()]


def shard_files(out: Path) -> list[Path]:
    return sorted(p for p in (out / "shards").iterdir() if p.suffix in (".tar", ".parquet"))
