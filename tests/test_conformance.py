"""What every format must do, as one reusable class (zarr's ``StoreTests`` pattern).

A format joins by subclassing :class:`FormatConformance` and saying how to make valid predictions, how its
natural reader (numpy, torch, Pillow, zarr, csv, json) reads them back, and which predictions it refuses.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from lighter_sink import PredictionError, Sink, WriteError
from lighter_sink._verify import verify


class _Abort(Exception):
    pass


def _prediction_error(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was caused by, a PredictionError (bad input found on a worker surfaces chained)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, PredictionError):
            return True
        seen = seen.__cause__
    return False


def _manifest(url: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (url / "_manifest.jsonl").read_text().splitlines()]


class FormatConformance:
    """The tests; subclasses set ``format`` and implement the hooks below."""

    format: ClassVar[str]
    #: predictions per test run
    n: ClassVar[int] = 24

    # ------------------------------------------------------------------ hooks

    def values(self, n: int) -> torch.Tensor:
        """A batch of ``n`` valid predictions."""
        return torch.randn(n, 3, 4, generator=torch.Generator().manual_seed(n))

    def read(self, url: Path, n: int) -> dict[int, Any]:
        """What the natural reader gets for each stored id."""
        raise NotImplementedError

    def assert_same(self, stored: Any, value: torch.Tensor) -> None:
        np.testing.assert_array_equal(stored, value.numpy())

    def assert_whole(self, url: Path) -> None:
        """Every object under a final name reads completely (after a failed run)."""
        raise NotImplementedError

    bad_dtype: ClassVar[torch.Tensor | None] = None
    bad_shape: ClassVar[list[torch.Tensor] | None] = None  # predictions put in this order; the last is refused

    def sink(self, url: Path, **kwargs: Any) -> Sink:
        return Sink(url, format=self.format, **kwargs)

    # ------------------------------------------------------------------ tests

    def test_round_trip_through_the_natural_reader(self, tmp_path: Path) -> None:
        values = self.values(self.n)
        with self.sink(tmp_path) as sink:
            for start in range(0, self.n, 5):
                sink.put_batch(range(start, min(start + 5, self.n)), values[start : start + 5])
        stored = self.read(tmp_path, self.n)
        assert sorted(stored) == list(range(self.n))
        for i in range(self.n):
            self.assert_same(stored[i], values[i])
        assert [r["id"] for r in _manifest(tmp_path)] == list(range(self.n))
        assert json.loads((tmp_path / "_SUCCESS").read_text())["count"] == self.n
        result = verify(str(tmp_path))
        assert result.ok, result.problems[:3]
        assert result.checked == self.n

    def test_a_failed_run_leaves_only_whole_objects_and_no_marker(self, tmp_path: Path) -> None:
        values = self.values(self.n)
        with pytest.raises(_Abort), self.sink(tmp_path) as sink:
            sink.put_batch(range(self.n // 2), values[: self.n // 2])
            sink.flush()
            sink.put_batch(range(self.n // 2, self.n), values[self.n // 2 :])
            raise _Abort  # while the second half may still be in flight
        assert not (tmp_path / "_SUCCESS").exists()
        assert not list(tmp_path.rglob("*.tmp"))
        self.assert_whole(tmp_path)

    def test_a_prediction_of_a_dtype_it_cannot_store_is_refused(self, tmp_path: Path) -> None:
        if self.bad_dtype is None:
            pytest.skip(f"format {self.format!r} stores every dtype")
        with pytest.raises((PredictionError, WriteError)) as info, self.sink(tmp_path) as sink:
            sink.put(0, self.bad_dtype)
        assert _prediction_error(info.value)
        assert not (tmp_path / "_SUCCESS").exists()

    def test_a_prediction_of_a_shape_it_cannot_store_is_refused(self, tmp_path: Path) -> None:
        if self.bad_shape is None:
            pytest.skip(f"format {self.format!r} stores every shape")
        with pytest.raises((PredictionError, WriteError)) as info, self.sink(tmp_path) as sink:
            for i, value in enumerate(self.bad_shape):
                sink.put(i, value)
                if i < len(self.bad_shape) - 1:
                    sink.flush()  # the good ones are stored before the bad one comes
        assert _prediction_error(info.value)
        if isinstance(info.value, WriteError):  # found on a worker: the error names the refused id
            assert info.value.ids == [str(len(self.bad_shape) - 1)]
        assert not (tmp_path / "_SUCCESS").exists()

    def test_a_prediction_that_is_not_a_tensor_is_refused_on_the_callers_thread(self, tmp_path: Path) -> None:
        with self.sink(tmp_path) as sink:
            with pytest.raises(PredictionError, match="must be a torch.Tensor"):
                sink.put(0, "not a tensor")
            with pytest.raises(PredictionError):
                sink.put_batch([0, 1], ["a", "b"])
            sink.put_batch(range(2), self.values(2))  # the sink is still usable
        assert json.loads((tmp_path / "_SUCCESS").read_text())["count"] == 2

    def test_resume_skips_stored_ids_and_completes_the_manifest(self, tmp_path: Path) -> None:
        values = self.values(self.n)
        done = self.n // 3
        with pytest.raises(_Abort), self.sink(tmp_path) as sink:
            sink.put_batch(range(done), values[:done])
            sink.flush()
            raise _Abort  # killed after these were stored and recorded
        with self.sink(tmp_path, mode="resume") as sink:
            for start in range(0, self.n, 4):
                sink.put_batch(range(start, min(start + 4, self.n)), values[start : start + 4])
            assert sink.stats.skipped == done
        assert [r["id"] for r in _manifest(tmp_path)] == list(range(self.n))
        stored = self.read(tmp_path, self.n)
        assert sorted(stored) == list(range(self.n))
        for i in range(self.n):
            self.assert_same(stored[i], values[i])
        assert verify(str(tmp_path)).ok


# ---------------------------------------------------------------------- one object per prediction


class _PerItem(FormatConformance):
    extension: ClassVar[str]

    def load(self, path: Path) -> Any:
        raise NotImplementedError

    def read(self, url: Path, n: int) -> dict[int, Any]:
        return {int(p.stem): self.load(p) for p in url.glob(f"*{self.extension}")}

    def assert_whole(self, url: Path) -> None:
        for path in url.glob(f"*{self.extension}"):
            self.load(path)


class TestNpy(_PerItem):
    format = "npy"
    extension = ".npy"
    bad_dtype = torch.ones(2, dtype=torch.bfloat16)

    def load(self, path: Path) -> Any:
        return np.load(path)


class TestPt(_PerItem):
    format = "pt"
    extension = ".pt"

    def load(self, path: Path) -> Any:
        return torch.load(path)

    def assert_same(self, stored: Any, value: torch.Tensor) -> None:
        assert torch.equal(stored, value)


class TestPng(_PerItem):
    format = "png"
    extension = ".png"
    bad_dtype = torch.ones(4, 4, dtype=torch.int64)
    bad_shape: ClassVar[list[torch.Tensor] | None] = [
        torch.ones(4, 4, dtype=torch.uint8),
        torch.ones(16, dtype=torch.uint8),
    ]

    def values(self, n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))

    def load(self, path: Path) -> Any:
        with Image.open(path) as image:
            return np.asarray(image)


class TestTxt(_PerItem):
    format = "txt"
    extension = ".txt"

    def load(self, path: Path) -> Any:
        return path.read_text()

    def assert_same(self, stored: Any, value: torch.Tensor) -> None:
        assert stored == str(value)


# ---------------------------------------------------------------------- rows of one array or table


class TestZarr(FormatConformance):
    format = "zarr"
    bad_dtype = torch.ones(3, 4, dtype=torch.bfloat16)
    bad_shape: ClassVar[list[torch.Tensor] | None] = [torch.ones(3, 4), torch.ones(4, 3)]

    def sink(self, url: Path, **kwargs: Any) -> Sink:
        return Sink(url, format="zarr", num_samples=self.n, **kwargs)

    def read(self, url: Path, n: int) -> dict[int, Any]:
        import zarr

        array = zarr.open_array(str(url), mode="r")
        assert array.shape == (n, 3, 4)
        recorded = {int(r["id"]) for r in _manifest(url)}
        return {i: array[i] for i in recorded}

    def assert_whole(self, url: Path) -> None:
        import zarr

        if not (url / "zarr.json").exists():
            return
        array = zarr.open_array(str(url), mode="r")
        array[:]  # every stored chunk decodes
        assert not list(url.rglob("*.partial"))


class _Table(FormatConformance):
    suffix: ClassVar[str]
    bad_dtype = torch.ones(2, dtype=torch.complex64)
    bad_shape: ClassVar[list[torch.Tensor] | None] = [torch.ones(2), torch.ones(3)]

    def values(self, n: int) -> torch.Tensor:
        return torch.randn(n, 2, generator=torch.Generator().manual_seed(n))

    def rows(self, url: Path) -> list[dict[str, Any]]:
        raise NotImplementedError

    def read(self, url: Path, n: int) -> dict[int, Any]:
        rows = self.rows(url)
        ids = [int(r["id"]) for r in rows]
        assert ids == sorted(ids), "rows are sorted by id"
        assert len(set(ids)) == len(ids), "one row per id"
        return {int(r["id"]): np.array([float(r["value_0"]), float(r["value_1"])], dtype=np.float32) for r in rows}

    def assert_whole(self, url: Path) -> None:
        assert not (url / f"predictions{self.suffix}").exists()  # the table appears at commit only
        for part in (url / "_table_parts").rglob("*.part"):
            header, *lines = part.read_bytes().splitlines()
            assert json.loads(header)["columns"] == ["value_0", "value_1"]
            for line in lines:
                identifier, _, row = line.partition(b"\t")
                json.loads(identifier)
                assert row


class TestCsv(_Table):
    format = "csv"
    suffix = ".csv"

    def rows(self, url: Path) -> list[dict[str, Any]]:
        with (url / "predictions.csv").open(newline="") as f:
            reader = csv.DictReader(f)
            assert reader.fieldnames == ["id", "value_0", "value_1"]
            return list(reader)


class TestJsonl(_Table):
    format = "jsonl"
    suffix = ".jsonl"

    def rows(self, url: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in io.StringIO((url / "predictions.jsonl").read_text())]
