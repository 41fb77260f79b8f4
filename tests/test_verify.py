"""verify asks the output's format how its records are checked (Format.open_check), instead of knowing formats."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lighter_sink import Sink
from lighter_sink._types import ObjectStore, Record
from lighter_sink._verify import Problem, verify
from lighter_sink.formats import CheckContext, CsvFormat, NpyFormat, RecordCheck, register_format


class _Scores(CsvFormat):
    """A user's table format, registered under its own name: verify knows it only through the registry."""

    name = "scores_table"


def test_verify_reads_the_rows_of_a_registered_table_format_even_a_single_row(tmp_path: Path) -> None:
    register_format("scores_table", _Scores(), replace=True)
    with Sink(tmp_path, format="scores_table") as sink:
        sink.put(0, torch.tensor([0.5, 0.25]))
    assert json.loads((tmp_path / "_SUCCESS").read_text())["format"] == "scores_table"
    result = verify(str(tmp_path))
    assert result.ok, result.problems  # the row is read from the table, not compared with the whole file
    table = tmp_path / "predictions.csv"
    table.write_text(table.read_text().replace("0.25", "0.75"))
    assert [(p.kind, p.id) for p in verify(str(tmp_path)).problems] == [("checksum", "0")]


class _FiniteNpy(NpyFormat):
    """A user's format that also checks what its objects hold: verify asks it."""

    name = "finite_npy"

    async def open_check(self, store: ObjectStore, records: Sequence[Record], context: CheckContext) -> RecordCheck:
        return _Finite(store)


class _Finite(RecordCheck):
    def __init__(self, store: ObjectStore) -> None:
        super().__init__()
        self._store = store

    def covers(self, record: Record) -> bool:
        return record.path.endswith(".npy")

    async def check(self, record: Record) -> tuple[Problem | None, int]:
        data = await self._store.get(record.path)
        if not np.isfinite(np.load(io.BytesIO(data))).all():
            return Problem("invalid", record.path, record.id, "holds values that are not finite"), len(data)
        return None, len(data)


def test_verify_asks_the_format_named_by_the_marker(tmp_path: Path) -> None:
    register_format("finite_npy", _FiniteNpy(), replace=True)
    with Sink(tmp_path, format="finite_npy") as sink:
        sink.put_batch(range(3), torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3.0, 4.0]]))
    result = verify(str(tmp_path))
    assert result.checked == 3
    assert [(p.kind, p.path, p.id) for p in result.problems] == [("invalid", "1.npy", "1")]
