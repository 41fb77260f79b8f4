"""The manifest keeps each id's type: numbers as JSON numbers, text as JSON strings.

A reader joins the manifest on the dataset index (``pandas.read_json(..., lines=True)``, or ``json.loads`` per
line): an int id must come back an int. Outputs written before ids kept their type (every id a string) are still
read, verified and resumed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from lighter_sink import PredictionSink, Sink, remaining
from lighter_sink._demo import DemoModel, SyntheticImages
from lighter_sink._verify import verify
from tests._killed_run import run_killed
from tests.conftest import quiet_trainer


def _ids(out: Path, manifest: str = "_manifest.jsonl") -> list[Any]:
    return [json.loads(line)["id"] for line in (out / manifest).read_text().splitlines()]


def _old_style(path: Path) -> None:
    """Rewrite a manifest or part as versions before this one wrote it: every id a JSON string."""
    lines = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        record["id"] = str(record["id"])
        lines.append(json.dumps(record, separators=(",", ":")))
    path.write_text("".join(line + "\n" for line in lines))


def test_counter_ids_are_numbers_in_the_manifest(tmp_path: Path) -> None:
    sink = PredictionSink(tmp_path / "out")
    loader = DataLoader(SyntheticImages(12, size=8), batch_size=5)
    quiet_trainer(sink).predict(DemoModel(), loader, return_predictions=False)
    ids = _ids(tmp_path / "out")
    assert ids == list(range(12))
    assert all(type(i) is int for i in ids)


@pytest.mark.parametrize("fmt", ["npy", "csv", "zarr"])
def test_a_users_int_ids_are_numbers_and_text_ids_stay_text(tmp_path: Path, fmt: str) -> None:
    with Sink(tmp_path / "ints", format=fmt, num_samples=20) as sink:
        sink.put_batch([3, 11, 0], torch.ones(3, 2))
        sink.put(7, torch.ones(2))
    ids = _ids(tmp_path / "ints")
    assert ids == [0, 3, 7, 11]
    assert all(type(i) is int for i in ids)
    assert verify(str(tmp_path / "ints")).ok

    if fmt == "zarr":
        return  # (zarr stores ids 0..N-1 only)
    text = ["b", "007", "a/1", "٣", "x y"]
    with Sink(tmp_path / "text", format=fmt) as sink:
        sink.put_batch(text, torch.ones(5, 2))
    ids = _ids(tmp_path / "text")
    assert ids == ["007", "a/1", "b", "x y", "٣"]
    assert all(type(i) is str for i in ids)
    assert verify(str(tmp_path / "text")).ok


def test_a_mixed_run_writes_numbers_for_number_ids_only(tmp_path: Path) -> None:
    """``"10"`` is the id of the number 10 (the int 10 and the string "10" are one id); ``"010"`` is text."""
    with Sink(tmp_path) as sink:
        sink.put_batch([5, "10", "010", "case-1"], torch.ones(4, 1))
    assert _ids(tmp_path) == [5, 10, "010", "case-1"]
    assert verify(str(tmp_path)).ok


def test_an_output_written_with_string_ids_still_verifies(tmp_path: Path) -> None:
    with Sink(tmp_path) as sink:
        sink.put_batch([0, 1, 2, "a"], torch.ones(4, 1))
    _old_style(tmp_path / "_manifest.jsonl")
    assert _ids(tmp_path) == ["0", "1", "2", "a"]
    result = verify(str(tmp_path))
    assert result.ok, result.problems
    assert result.checked == 4


@pytest.mark.parametrize("old_style", [True, False], ids=["string-ids", "typed-ids"])
def test_resume_reads_parts_of_either_kind_and_commits_typed_ids(tmp_path: Path, old_style: bool) -> None:
    out = tmp_path / "out"
    run_killed(out, [str(i) for i in range(6)], "--flush")
    parts = sorted(out.glob("_parts/*/*/*.jsonl"))
    assert parts
    if old_style:
        for part in parts:
            _old_style(part)
    assert list(remaining(str(out), list(range(10)), format="npy").indices) == [6, 7, 8, 9]  # type: ignore[arg-type]
    with Sink(out, mode="resume") as sink:
        sink.put_batch(range(10), torch.full((10, 2, 2), 1.0))
    assert sink.stats.skipped == 6
    ids = _ids(out)
    assert ids == list(range(10))
    assert all(type(i) is int for i in ids)
    assert verify(str(out)).ok


def test_resuming_a_committed_output_with_string_ids_commits_typed_ids(tmp_path: Path) -> None:
    with Sink(tmp_path) as sink:
        sink.put_batch([0, 1, "a"], torch.ones(3, 1))
    _old_style(tmp_path / "_manifest.jsonl")
    with Sink(tmp_path, mode="resume") as sink:
        sink.put_batch([0, 1, 2, "a", "b"], torch.ones(5, 1))
    assert sink.stats.skipped == 3
    assert _ids(tmp_path) == [0, 1, 2, "a", "b"]
    assert verify(str(tmp_path)).ok
