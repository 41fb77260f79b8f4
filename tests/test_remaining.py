"""``remaining(url, dataset)`` learns the format and key template from the url, as the README uses it.

Each killed run is a real process (tests/_killed_run.py) that dies with ``os._exit`` after its puts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lighter_sink import ConfigurationError, Sink, remaining
from lighter_sink._layout import ControlKeys
from lighter_sink._verify import verify
from lighter_sink.formats import CsvFormat
from tests._killed_run import run_killed


def _todo(url: Path, n: int, **kwargs: str) -> list[int]:
    return list(remaining(str(url), list(range(n)), **kwargs).indices)  # type: ignore[arg-type]


def test_a_complete_pt_output_has_nothing_left(tmp_path: Path) -> None:
    with Sink(tmp_path, format="pt") as sink:
        sink.put_batch(range(40), torch.ones(40, 2))
    assert _todo(tmp_path, 40) == []
    assert _todo(tmp_path, 45) == [40, 41, 42, 43, 44]


def test_a_killed_pt_run_is_resumed_exactly_where_it_stopped(tmp_path: Path) -> None:
    run_killed(tmp_path, range(10), "--format", "pt")  # no manifest part: its objects are adopted from their bytes
    stored = [i for i in range(10) if (tmp_path / f"{i}.pt").exists()]
    assert len(stored) >= 9
    todo = _todo(tmp_path, 20)
    assert todo == [i for i in range(20) if i not in stored]
    with Sink(tmp_path, format="pt", mode="resume") as sink:
        sink.put_batch(todo, torch.full((len(todo), 2, 2), 1.0))
    assert sink.stats.skipped == 0  # remaining() left out exactly what resume keeps
    assert sink.summary is not None and sink.summary["count"] == 20
    assert verify(str(tmp_path)).ok


@pytest.mark.parametrize("flush", [False, True], ids=["before-its-first-part", "after-a-part"])
def test_a_killed_zarr_run_is_resumed_exactly_where_it_stopped(tmp_path: Path, flush: bool) -> None:
    """A zarr row is kept only once a manifest part records it: remaining() counts the same way as resume."""
    run_killed(tmp_path, range(6), "--format", "zarr", "--num-samples", "10", *(["--flush"] if flush else []))
    todo = _todo(tmp_path, 10)
    assert todo == (list(range(6, 10)) if flush else list(range(10)))
    with Sink(tmp_path, format="zarr", num_samples=10, mode="resume") as sink:
        sink.put_batch(todo, torch.full((len(todo), 2, 2), 1.0))
    assert sink.stats.skipped == 0
    assert sink.summary is not None and sink.summary["count"] == 10
    assert verify(str(tmp_path)).ok


def test_the_key_template_is_learned_too(tmp_path: Path) -> None:
    run_killed(tmp_path, range(8), "--key", "{id:04d}")
    stored = [i for i in range(8) if (tmp_path / f"{i:04d}.npy").exists()]
    assert len(stored) >= 7
    assert _todo(tmp_path, 8) == [i for i in range(8) if i not in stored]


def test_an_explicit_format_or_key_must_agree_with_the_output(tmp_path: Path) -> None:
    with Sink(tmp_path, format="pt", key="{id:04d}") as sink:
        sink.put_batch(range(4), torch.ones(4, 2))
    assert _todo(tmp_path, 5, format="pt", key="{id:04d}") == [4]
    with pytest.raises(ConfigurationError, match=r"was written with format='pt', not 'npy'"):
        _todo(tmp_path, 5, format="npy")
    with pytest.raises(ConfigurationError, match=r"was written with key='\{id:04d\}', not '\{id\}'"):
        _todo(tmp_path, 5, key="{id}")


def test_a_url_holding_two_outputs_needs_the_format(tmp_path: Path) -> None:
    """Lighter's FileWriter and CsvWriter in one directory: which output's samples remain must be said."""
    scores = CsvFormat(filename="scores.csv")
    with Sink(tmp_path, format="pt") as sink:
        sink.put_batch(range(3), torch.ones(3, 2))
    with Sink(tmp_path, format=scores) as sink:
        sink.put_batch([0, 4], torch.ones(2))
    with pytest.raises(ConfigurationError, match=r"holds 2 outputs.*'scores.csv'.*pass format="):
        _todo(tmp_path, 5)
    assert _todo(tmp_path, 5, format="pt") == [3, 4]
    assert _todo(tmp_path, 5, format=scores) == [1, 2, 3]  # type: ignore[arg-type]


def test_an_output_that_does_not_say_how_it_was_written_needs_the_format(tmp_path: Path) -> None:
    """A run killed by an earlier version recorded neither format nor key: refuse rather than guess."""
    run_killed(tmp_path, range(5), "--format", "pt", "--flush")
    (tmp_path / ControlKeys().description).unlink()
    with pytest.raises(ConfigurationError, match=r"nothing at .* says how its output was written: pass format="):
        _todo(tmp_path, 6)
    assert _todo(tmp_path, 6, format="pt") == [5]


def test_nothing_written_yet_leaves_every_sample(tmp_path: Path) -> None:
    assert _todo(tmp_path / "new", 3) == [0, 1, 2]
    (tmp_path / "README.txt").write_text("not an output")
    assert _todo(tmp_path, 3) == [0, 1, 2]
