"""Lighter 0.1.0 itself, through its own command line: one YAML config run with Lighter's writers, then with only
their ``_target_``s swapped to ``lighter_sink.lighter``, and the two outputs compared file by file.

Lighter 0.1.0 pins ``numpy<2`` and pulls pytorch-lightning: it lives in a virtualenv of its own, ``.venv-lighter``
(``make lighter-venv``, which ``make test`` runs first), holding this checkout's lighter-sink too. The project
Lighter runs is ``tests/_lighter_project``: a model whose ``predict_step`` returns a tensor, names, scores and
every other kind of value Lighter's CsvWriter takes, and the config with a ``FileWriter`` for each ``writer_fn``
and two ``CsvWriter``s (one beside the ``FileWriter`` in ``out/``, as Lighter's docs lay them out).

What differs from Lighter's output, and why, is listed in the README's "Lighter configs" section; this test
asserts that nothing else does. (PyPI's torchvision needs a CUDA torch: the venv has none, and the project brings
a stand-in for the one function Lighter calls, ``torchvision.io.write_png``; see its ``__init__.py``.)
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lighter_sink.cli import main

ROOT = Path(__file__).resolve().parent.parent
PROJECT = Path(__file__).resolve().parent / "_lighter_project"
LIGHTER = ROOT / ".venv-lighter" / "bin" / "lighter"

pytestmark = pytest.mark.slow


def _lighter() -> Path:
    if LIGHTER.exists():
        return LIGHTER
    if os.environ.get("CI") == "true":
        pytest.fail(f"{LIGHTER} is missing: CI runs `make test`, whose lighter-venv target makes it")
    pytest.skip(f"Lighter 0.1.0's virtualenv is absent ({LIGHTER}): run `make lighter-venv`")


def _run(where: Path, swap: bool) -> Path:
    """Copy the project to ``where`` and run ``lighter predict config.yaml`` there; return ``where``."""
    shutil.copytree(PROJECT, where, ignore=shutil.ignore_patterns("__pycache__"))
    config = where / "config.yaml"
    if swap:  # the only change a user makes
        config.write_text(config.read_text().replace("lighter.callbacks.", "lighter_sink.lighter."))
    result = subprocess.run(  # (the venv holds this checkout's lighter-sink, installed editable)
        [str(_lighter()), "predict", "config.yaml"],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, f"lighter predict failed ({'ours' if swap else 'Lighter'}):\n{result.stderr[-4000:]}"
    return where


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lighter")
    return _run(root / "theirs", swap=False), _run(root / "ours", swap=True)


def _files(directory: Path) -> dict[str, Path]:
    """The files under ``directory`` by relative path, without the sink's own (``_manifest.jsonl``, ...)."""
    found = {p.relative_to(directory).as_posix(): p for p in directory.rglob("*") if p.is_file()}
    return {name: path for name, path in found.items() if not any(part.startswith("_") for part in name.split("/"))}


def _verify(output: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lighter_sink.cli", "verify", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_same_config_with_only_the_targets_swapped_writes_what_lighter_writes(runs: tuple[Path, Path]) -> None:
    theirs, ours = runs
    files, table = _files(ours / "out"), ours / "out" / "scores.csv"
    assert (
        sorted(files)
        == sorted(_files(theirs / "out"))
        == sorted([f"case_{i:03d}.pt" for i in range(40)] + ["scores.csv"])
    )
    for name, path in files.items():
        if name.endswith(".pt"):
            # The same tensors. Not the same bytes: Lighter's file of a sample holds its whole batch's storage
            # (torch.save of a view) and names its zip folder after the file; ours holds the sample alone.
            mine, lighters = torch.load(path), torch.load(theirs / "out" / name)
            torch.testing.assert_close(mine, lighters, rtol=0, atol=0)
            assert mine.dtype == lighters.dtype and mine.untyped_storage().nbytes() == mine.nbytes
    assert table.read_bytes() == (theirs / "out" / "scores.csv").read_bytes()
    rows = list(csv.reader(io.StringIO(table.read_text())))
    scores = [
        float(torch.rand(3, 6, 5, generator=torch.Generator().manual_seed(i))[0, 0, 0] * 1.2 - 0.1) for i in range(40)
    ]
    assert rows[0] == ["name", "score"]
    assert [name for name, _ in rows[1:]] == [f"case_{i:03d}" for i in range(40)]
    assert [float(text) for _, text in rows[1:]] == pytest.approx(scores, rel=1e-15)
    # Lighter's pandas reads some 17-digit floats one unit off in the last place: so do we, byte for byte
    assert any(text != repr(score) for (_, text), score in zip(rows[1:], scores, strict=True))
    result = _verify(ours / "out")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_writer_fn_writes_what_lighter_writes(runs: tuple[Path, Path]) -> None:
    theirs, ours = runs
    for output in ("images", "volumes", "texts", "arrays"):
        files = _files(ours / output)
        assert sorted(files) == sorted(_files(theirs / output)), output
        assert len(files) == 40
        for name, path in files.items():
            other = theirs / output / name
            if path.suffix == ".png":  # two PNG encoders: the same pixels
                with Image.open(path) as mine, Image.open(other) as lighters:
                    assert mine.mode == lighters.mode and mine.size == lighters.size
                    np.testing.assert_array_equal(np.asarray(mine), np.asarray(lighters))
            else:
                assert path.read_bytes() == other.read_bytes(), f"{output}/{name}"
        assert main(["verify", str(ours / output)]) == 0, output  # (the command's entry point, in this process)


def test_the_csv_writer_writes_every_kind_of_value_as_lighter_does(runs: tuple[Path, Path]) -> None:
    theirs, ours = runs
    mine, lighters = (run / "tables" / "values.csv" for run in (ours, theirs))
    assert mine.read_bytes() == lighters.read_bytes()
    rows = list(csv.reader(io.StringIO(mine.read_bytes().decode())))
    assert len(rows) == 41 and rows[9][1] == "multi\nline"  # (a quoted cell)
    assert [row[3] for row in rows[1:7]] == [
        "",
        "inf",
        "-0.0",
        "9.999999682655224e-21",
        "3.000000005497756e+38",
        rows[6][2],
    ]
    assert main(["verify", str(ours / "tables")]) == 0
