"""The zarr array and the csv/jsonl tables: through Trainer.predict, to S3, across two DDP ranks, and their edges."""

from __future__ import annotations

import csv
import errno
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lighter_sink import (
    ConfigurationError,
    IdentifierError,
    MissingDependencyError,
    PredictionError,
    PredictionSink,
    Sink,
    WriteError,
    remaining,
)
from lighter_sink._demo import DemoModel, SyntheticImages
from lighter_sink._lighter_csv import batch_rows, pack_lines
from lighter_sink._verify import verify
from lighter_sink.formats import CsvFormat, CsvTextFormat, JsonlFormat, _table, available_formats
from lighter_sink.lighter import CsvWriter
from tests import _faulty
from tests._proxy import FaultProxy
from tests.conftest import S3Server
from tests.conftest import quiet_trainer as _trainer

JOB = Path(__file__).with_name("_job.py")


def _expected(n: int, size: int) -> torch.Tensor:
    data = SyntheticImages(n, size=size)
    with torch.no_grad():
        return DemoModel().eval()(torch.stack([data[i] for i in range(n)]))


def _summary(images: torch.Tensor) -> torch.Tensor:
    return torch.stack([images.mean(dim=(1, 2)), images.amax(dim=(1, 2))], dim=1)


class _Summarising(DemoModel):
    def predict_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return _summary(self(batch))


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _manifest(url: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (url / "_manifest.jsonl").read_text().splitlines()]


def test_zarr_csv_and_jsonl_are_registered() -> None:
    assert {"zarr", "csv", "jsonl"} <= set(available_formats())


# ---------------------------------------------------------------------- zarr


def test_zarr_through_trainer_predict(tmp_path: Path) -> None:
    out = tmp_path / "preds"
    sink = PredictionSink(out, format="zarr")
    _trainer(sink).predict(
        DemoModel(), DataLoader(SyntheticImages(500, size=16), batch_size=32), return_predictions=False
    )
    array = zarr.open_array(str(out), mode="r")
    assert array.shape == (500, 16, 16)
    assert array.chunks == (1, 16, 16)
    np.testing.assert_allclose(array[:], _expected(500, 16).numpy(), rtol=1e-5, atol=1e-6)
    records = _manifest(out)
    assert [r["id"] for r in records] == list(range(500))
    assert records[17] == {**records[17], "path": "c/17/0/0", "nbytes": 16 * 16 * 4, "shape": [16, 16]}
    assert json.loads((out / "_SUCCESS").read_text())["count"] == 500
    assert verify(str(out)).ok


@pytest.mark.s3
def test_zarr_to_s3(s3_server: S3Server, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/run/preds"
    sink = PredictionSink(url, format="zarr", storage_options=s3_server.storage_options)
    _trainer(sink).predict(
        DemoModel(), DataLoader(SyntheticImages(500, size=16), batch_size=50), return_predictions=False
    )
    array = zarr.open_array(url, mode="r", storage_options=s3_server.storage_options)
    assert array.shape == (500, 16, 16)
    np.testing.assert_allclose(array[:], _expected(500, 16).numpy(), rtol=1e-5, atol=1e-6)
    success = s3_server.client().get_object(Bucket=s3_bucket, Key="run/preds/_SUCCESS")["Body"].read()
    assert json.loads(success)["count"] == 500
    result = verify(url, s3_server.storage_options)
    assert result.ok, result.problems[:3]


def test_zarr_stores_rows_equal_to_the_fill_value(tmp_path: Path) -> None:
    with Sink(tmp_path, format="zarr", num_samples=3) as sink:
        sink.put_batch([0, 1, 2], torch.zeros(3, 2, dtype=torch.int32))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["0", "1", "2"]  # no row left implicit


def test_zarr_scalar_predictions_make_a_vector(tmp_path: Path) -> None:
    values = torch.arange(10, dtype=torch.float64) / 3
    with Sink(tmp_path, format="zarr", num_samples=10) as sink:
        sink.put_batch(range(10), values)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path), mode="r")[:], values.numpy())
    assert _manifest(tmp_path)[3]["path"] == "c/3"


@pytest.mark.parametrize("identifier", ["10", "case-1", "007", "1\u00b2", "\u0663"])
def test_zarr_refuses_ids_that_are_not_rows(tmp_path: Path, identifier: str) -> None:
    with pytest.raises(WriteError) as info, Sink(tmp_path, format="zarr", num_samples=10) as sink:
        sink.put(identifier, torch.ones(2))
    assert isinstance(info.value.__cause__, IdentifierError)
    assert repr(identifier) in str(info.value)
    assert "[0, 10)" in str(info.value)


def test_zarr_names_the_id_and_both_shapes_of_a_mismatch(tmp_path: Path) -> None:
    with pytest.raises(WriteError) as info, Sink(tmp_path, format="zarr", num_samples=4) as sink:
        sink.put_batch([0, 1], torch.ones(2, 3))
        sink.flush()
        sink.put(2, torch.ones(4, dtype=torch.float64))
    assert isinstance(info.value.__cause__, PredictionError)
    message = str(info.value)
    assert "'2'" in message
    assert "(4,)" in message and "float64" in message
    assert "(3,)" in message and "float32" in message


def test_zarr_needs_the_number_of_samples(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="num_samples"):
        Sink(tmp_path, format="zarr")


def test_zarr_overwrite_replaces_a_stale_array(tmp_path: Path) -> None:
    with Sink(tmp_path, format="zarr", num_samples=8) as sink:
        sink.put_batch(range(8), torch.full((8, 2), 7, dtype=torch.int64))
    with Sink(tmp_path, format="zarr", num_samples=6) as sink:
        sink.put_batch(range(3), torch.ones(3, 2, 2))
    array = zarr.open_array(str(tmp_path), mode="r")
    assert (array.shape, array.dtype) == ((6, 2, 2), np.dtype("float32"))
    np.testing.assert_array_equal(array[:3], np.ones((3, 2, 2)))
    np.testing.assert_array_equal(array[3:], np.zeros((3, 2, 2)))  # never written in this run: the fill value
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["0", "1", "2"]  # stale rows removed
    assert verify(str(tmp_path)).ok


def test_zarr_resume_refuses_an_incompatible_array(tmp_path: Path) -> None:
    with Sink(tmp_path, format="zarr", num_samples=4) as sink:
        sink.put_batch(range(2), torch.ones(2, 3))
    with (
        pytest.raises(WriteError, match="mode='overwrite'"),
        Sink(tmp_path, format="zarr", num_samples=4, mode="resume") as sink,
    ):
        sink.put_batch(range(2, 4), torch.ones(2, 5))


class _Preempted(Callback):
    """Stops predict after ``batches`` batches, once what they put is stored and recorded (as a long run's parts are)."""

    def __init__(self, sink: PredictionSink, batches: int) -> None:
        self.sink = sink
        self.batches = batches

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.batches - 1:
            assert self.sink.sink is not None
            self.sink.sink.flush()
            raise RuntimeError("preempted")


class _Counting(DemoModel):
    def __init__(self) -> None:
        super().__init__()
        self.computed = 0

    def predict_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        self.computed += len(batch)
        return super().predict_step(batch, batch_idx, dataloader_idx)


def test_zarr_resume_with_remaining_completes_the_array(tmp_path: Path) -> None:
    # The README's recipe: a job stopped after 50 of 100 rows, then remaining() + mode="resume".
    url = str(tmp_path / "preds")
    dataset = SyntheticImages(100, size=8)
    first = PredictionSink(url, format="zarr")
    with pytest.raises(RuntimeError, match="preempted"):
        _trainer(first, _Preempted(first, batches=5)).predict(
            DemoModel(), DataLoader(dataset, batch_size=10), return_predictions=False
        )
    assert not (tmp_path / "preds" / "_SUCCESS").exists()

    todo = remaining(url, dataset, format="zarr")
    assert len(todo) == 50
    model = _Counting()
    sink = PredictionSink(url, format="zarr", mode="resume")
    _trainer(sink).predict(model, DataLoader(todo, batch_size=10), return_predictions=False)
    assert model.computed == 50
    array = zarr.open_array(url, mode="r")
    assert array.shape == (100, 8, 8)
    np.testing.assert_allclose(array[:], _expected(100, 8).numpy(), rtol=1e-5, atol=1e-6)
    assert (tmp_path / "preds" / "_SUCCESS").exists()
    assert verify(url).ok


def test_verify_reads_zarr_rows_back(tmp_path: Path) -> None:
    with Sink(tmp_path, format="zarr", num_samples=6) as sink:
        sink.put_batch(range(6), torch.arange(36, dtype=torch.float32).reshape(6, 6))
    (tmp_path / "c" / "4" / "0").write_bytes((tmp_path / "c" / "1" / "0").read_bytes())  # a row in the wrong place
    (tmp_path / "c" / "2" / "0").unlink()
    problems = {(p.id, p.kind) for p in verify(str(tmp_path)).problems}
    assert problems == {("2", "missing"), ("4", "checksum")}


def test_zarr_overwrite_replaces_a_stale_array_of_more_dimensions(tmp_path: Path) -> None:
    # the stale chunks c/i/0/0 put directories where this run's chunks c/i/0 go
    with Sink(tmp_path, format="zarr", num_samples=4) as sink:
        sink.put_batch(range(4), torch.ones(4, 2, 3))
    with Sink(tmp_path, format="zarr", num_samples=4) as sink:
        sink.put_batch(range(2), torch.full((2, 5), 3.0))
    array = zarr.open_array(str(tmp_path), mode="r")
    assert array.shape == (4, 5)
    np.testing.assert_array_equal(array[:2], np.full((2, 5), 3.0))
    assert sorted(str(p.relative_to(tmp_path / "c")) for p in (tmp_path / "c").rglob("*") if p.is_file()) == [
        "0/0",
        "1/0",
    ]
    assert verify(str(tmp_path)).ok


def test_zarr_chunk_writes_go_through_the_sinks_store_and_are_retried_one_by_one() -> None:
    # The first three chunk writes fail with a connection reset: each is retried alone, and counted.
    plan = _faulty.Plan(
        fail=ConnectionResetError(errno.ECONNRESET, "reset"), fail_first=3, fail_when=lambda path: "/c/" in path
    )
    url = "faulty://zarr-retried"
    values = torch.arange(40 * 3, dtype=torch.float32).reshape(40, 3)
    with Sink(url, format="zarr", num_samples=40, storage_options=_faulty.options(plan), retries=3) as sink:
        sink.put_batch(range(40), values)
    assert plan.failures == 3
    assert sink.stats.retries == 3
    assert sink.stats.failed == 0
    result = verify(url, _faulty.options(plan))
    assert result.ok and result.checked == 40, result.problems[:3]
    stored = zarr.open_array(url, mode="r", storage_options=_faulty.options(plan))
    np.testing.assert_array_equal(stored[:], values.numpy())


@pytest.mark.s3
@pytest.mark.parametrize("backend", ["fsspec", "obstore"])
def test_zarr_rows_reach_s3_through_a_faulty_network(fault_proxy: FaultProxy, s3_bucket: str, backend: str) -> None:
    # One in five PUTs answered 503 SlowDown while 150 rows are written: every chunk is retried on its own, so all
    # arrive (a row write of 64 chunks retried as a whole would almost never get through).
    url = f"s3://{s3_bucket}/zarr-faulty"
    options = fault_proxy.storage_options
    values = torch.arange(150 * 4, dtype=torch.float32).reshape(150, 4)
    with Sink(url, format="zarr", num_samples=150, storage_options=options, backend=backend, retries=10) as sink:  # type: ignore[arg-type]
        sink.flush()  # the lease is taken
        fault_proxy.configure(error_rate=0.2)
        sink.put_batch(range(150), values)
        sink.flush()
        fault_proxy.configure(error_rate=0.0)
    assert fault_proxy.stats.errors > 0  # the faults really happened
    assert sink.stats.failed == 0
    if backend == "fsspec":  # (obstore retries inside its own client, uncounted)
        assert sink.stats.retries == fault_proxy.stats.errors
    result = verify(url, options)
    assert result.ok and result.checked == 150, result.problems[:3]
    np.testing.assert_array_equal(zarr.open_array(url, mode="r", storage_options=options)[:], values.numpy())


def test_zarr_names_the_extra_when_zarr_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "zarr", None)  # None in sys.modules makes the import fail
    with (
        pytest.raises(MissingDependencyError, match=r"pip install 'lighter-sink\[zarr\]'") as info,
        Sink(tmp_path, format="zarr", num_samples=2) as sink,
    ):
        sink.put(0, torch.ones(2))
    assert isinstance(info.value, ImportError) and isinstance(info.value, ConfigurationError)
    assert info.value.name == "zarr"


# ---------------------------------------------------------------------- tables


def test_csv_through_trainer_predict(tmp_path: Path) -> None:
    sink = PredictionSink(tmp_path, format="csv")
    _trainer(sink).predict(
        _Summarising(), DataLoader(SyntheticImages(300, size=8), batch_size=32), return_predictions=False
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_SUCCESS", "_manifest.jsonl", "predictions.csv"]
    rows = _csv_rows(tmp_path / "predictions.csv")
    assert [int(r["id"]) for r in rows] == list(range(300))  # one row per id, sorted
    stored = np.array([[float(r["value_0"]), float(r["value_1"])] for r in rows], dtype=np.float32)
    np.testing.assert_allclose(stored, _summary(_expected(300, 8)).numpy(), rtol=1e-5, atol=1e-6)
    records = _manifest(tmp_path)
    assert {r["path"] for r in records} == {"predictions.csv"}
    lines = (tmp_path / "predictions.csv").read_bytes().splitlines(keepends=True)
    assert records[5]["nbytes"] == len(lines[6])
    assert verify(str(tmp_path)).ok


def test_float32_values_read_back_exactly(tmp_path: Path) -> None:
    values = torch.tensor([0.3, 1 / 3, 1e-10, 123456789.0, float("nan"), float("inf")], dtype=torch.float32)
    with Sink(tmp_path, format="csv") as sink:
        sink.put_batch(range(6), values)
    rows = _csv_rows(tmp_path / "predictions.csv")
    assert rows[0] == {"id": "0", "value": "0.3"}
    np.testing.assert_array_equal(np.array([r["value"] for r in rows], dtype=np.float32), values.numpy())


def test_jsonl_rows_are_json_objects(tmp_path: Path) -> None:
    with Sink(tmp_path, format="jsonl") as sink:
        sink.put_batch(["b", "a", 3], torch.tensor([[1, 2], [3, 4], [5, 6]]))
        sink.put("c", torch.tensor([float("nan"), 1.5]).double())
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [3, "a", "b", "c"]  # counters first, as numbers
    assert json.loads(lines[1]) == {"id": "a", "value_0": 3.0, "value_1": 4.0}
    assert np.isnan(json.loads(lines[3])["value_0"])
    assert verify(str(tmp_path)).ok


def test_ids_that_json_escapes_survive_the_merge(tmp_path: Path) -> None:
    ids = ["plain", "naïve", 'say "hi"', "dataloader_0/7", "日本"]  # (ids hold no backslash or control character)
    with Sink(tmp_path, format="jsonl") as sink:
        sink.put_batch(ids, torch.arange(len(ids), dtype=torch.float32).unsqueeze(1))
    lines = (tmp_path / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert {json.loads(line)["id"]: json.loads(line)["value_0"] for line in lines} == {
        identifier: float(index) for index, identifier in enumerate(ids)
    }
    assert verify(str(tmp_path)).ok


@pytest.mark.parametrize("fmt", [CsvFormat(columns=["p", "q"]), JsonlFormat(columns=["p", "q"])])
def test_named_columns_and_list_cells(tmp_path: Path, fmt: Any) -> None:
    with Sink(tmp_path, format=fmt) as sink:
        sink.put_batch([0, 1], torch.tensor([[[0.25, 0.75], [1.0, 0.0]], [[0.5, 0.5], [0.0, 1.0]]]))
    if fmt.name == "csv":
        rows = _csv_rows(tmp_path / "predictions.csv")
        assert rows[0] == {"id": "0", "p": "[0.25, 0.75]", "q": "[1.0, 0.0]"}
    else:
        lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
        assert json.loads(lines[1]) == {"id": 1, "p": [0.5, 0.5], "q": [0.0, 1.0]}


def test_table_arguments_and_shapes_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="other than 'id'"):
        CsvFormat(columns=["id", "x"])
    with pytest.raises(ConfigurationError, match="plain file name"):
        CsvFormat(filename="sub/table.csv")
    with pytest.raises(PredictionError, match=r"scalar or vector.*zarr"):
        CsvFormat().check(torch.ones(2, 2))
    with pytest.raises(PredictionError, match="2 columns"):
        CsvFormat(columns=["a", "b"]).check(torch.ones(3))


def test_a_big_table_is_merged_in_several_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_table, "_PART_ROWS", 16)
    monkeypatch.setattr(_table, "_FAN_IN", 3)
    values = torch.randn(400)
    order = torch.randperm(400, generator=torch.Generator().manual_seed(0))
    with Sink(tmp_path, format="csv", concurrency=4) as sink:
        for start in range(0, 400, 9):
            chosen = order[start : start + 9]
            sink.put_batch(chosen.tolist(), values[chosen])
    rows = _csv_rows(tmp_path / "predictions.csv")
    assert [int(r["id"]) for r in rows] == list(range(400))
    np.testing.assert_array_equal(np.array([r["value"] for r in rows], dtype=np.float32), values.numpy())
    assert not (tmp_path / "_table_parts").exists()


def test_stale_parts_of_an_interrupted_run_are_left_out(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), Sink(tmp_path, format="csv") as sink:
        sink.put_batch(range(10), torch.full((10,), 9.0))
        sink.flush()
        raise RuntimeError("killed")
    with Sink(tmp_path, format="csv") as sink:  # overwrite: a new run with fewer, different rows
        sink.put_batch(range(4), torch.ones(4))
    rows = _csv_rows(tmp_path / "predictions.csv")
    assert rows == [{"id": str(i), "value": "1.0"} for i in range(4)]
    assert verify(str(tmp_path)).ok


def test_resume_keeps_the_rows_of_the_committed_table(tmp_path: Path) -> None:
    with Sink(tmp_path, format="jsonl") as sink:
        sink.put_batch(range(0, 10, 2), torch.arange(0, 10, 2))
    with Sink(tmp_path, format="jsonl", mode="resume") as sink:
        sink.put_batch(range(10), torch.arange(10))
        assert sink.stats.skipped == 5
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"id": i, "value": i} for i in range(10)]
    assert verify(str(tmp_path)).ok


def test_verify_parses_table_rows(tmp_path: Path) -> None:
    with Sink(tmp_path, format="csv") as sink:
        sink.put_batch(range(5), torch.arange(5))
    table = tmp_path / "predictions.csv"
    table.write_text(table.read_text().replace("3,3\n", "3,8\n").replace("4,4\n", "") + "9,9\n")
    problems = {(p.id, p.kind) for p in verify(str(tmp_path)).problems}
    assert problems == {("3", "checksum"), ("4", "missing"), ("9", "mismatch")}


@pytest.mark.parametrize("fmt", ["zarr", "csv", "jsonl"])
def test_verify_checks_the_rows_of_an_uncommitted_run(tmp_path: Path, fmt: str) -> None:
    with pytest.raises(RuntimeError), Sink(tmp_path, format=fmt, num_samples=20) as sink:
        sink.put_batch(range(12), torch.arange(12.0))
        sink.flush()
        raise RuntimeError("killed")
    result = verify(str(tmp_path))
    assert result.records == result.checked == 12
    assert [p.kind for p in result.problems] == ["incomplete"]  # rows found where the run left them


class _Outputs(DemoModel):
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        images, labels = batch
        scores = self(images).mean(dim=(1, 2))
        return {"id": [f"case-{int(i):03d}" for i in labels], "pred": scores, "target": labels, "extra": "ignored"}


class _Labelled(SyntheticImages):
    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        return super().__getitem__(index), index


def test_csv_writer_is_lighters_drop_in(tmp_path: Path) -> None:
    path = tmp_path / "out" / "scores.csv"
    writer = CsvWriter(path, keys=["id", "pred", "target"])
    assert writer.path == str(path)
    _trainer(writer).predict(_Outputs(), DataLoader(_Labelled(40, size=8), batch_size=16), return_predictions=False)
    rows = _csv_rows(path)
    assert list(rows[0]) == ["id", "pred", "target"]
    assert [r["id"] for r in rows] == [f"case-{i:03d}" for i in range(40)]
    assert [float(r["target"]) for r in rows] == list(range(40))
    expected = _expected(40, 8).mean(dim=(1, 2)).numpy()
    np.testing.assert_allclose(np.array([r["pred"] for r in rows], dtype=np.float32), expected, rtol=1e-5, atol=1e-6)
    # a named table keeps its control objects apart: a FileWriter may write to the same directory
    assert (path.parent / "_scores.csv" / "_SUCCESS").exists()
    assert not (path.parent / "_SUCCESS").exists()


def test_a_file_writer_and_a_csv_writer_share_a_directory_as_in_lighter_configs(tmp_path: Path) -> None:
    """Lighter's usual layout: a FileWriter on out/ and a CsvWriter on out/scores.csv in one trainer."""
    from lighter_sink.lighter import FileWriter

    out = tmp_path / "out"
    files = FileWriter(out, value_key="pred", writer_fn="tensor", name_key="id")
    table = CsvWriter(out / "scores.csv", keys=["id", "pred", "target"])
    _trainer(files, table).predict(
        _Outputs(), DataLoader(_Labelled(40, size=8), batch_size=16), return_predictions=False
    )
    assert len(list(out.glob("case-*.pt"))) == 40
    assert len(_csv_rows(out / "scores.csv")) == 40
    assert json.loads((out / "_SUCCESS").read_text())["count"] == 40
    assert json.loads((out / "_scores.csv" / "_SUCCESS").read_text())["count"] == 40
    result = verify(str(out))
    assert result.ok, result.problems
    assert result.records == 80


def test_csv_writer_explains_missing_keys_and_lengths(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="at least one output, each once"):
        CsvWriter(tmp_path / "p.csv", keys=["pred", "pred"])
    writer = CsvWriter(tmp_path / "p.csv", keys=["pred", "nope"])
    with pytest.raises(PredictionError, match=r"\['nope'\] are not in"):
        _trainer(writer).predict(_Outputs(), DataLoader(_Labelled(4, size=8), batch_size=2), return_predictions=False)
    writer = CsvWriter(tmp_path / "p.csv", keys=["pred", "id2"])

    class Named(_Outputs):
        def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
            return {**super().predict_step(batch, batch_idx), "id2": ["a", "b", "c"]}

    with pytest.raises(PredictionError, match="expected 2, but found 3 for key 'id2'"):
        _trainer(writer).predict(Named(), DataLoader(_Labelled(4, size=8), batch_size=2), return_predictions=False)


@pytest.mark.s3
def test_csv_writer_to_s3(s3_server: S3Server, s3_bucket: str) -> None:
    writer = CsvWriter(
        f"s3://{s3_bucket}/run/table.csv", keys=["pred", "target"], storage_options=s3_server.storage_options
    )
    _trainer(writer).predict(_Outputs(), DataLoader(_Labelled(30, size=8), batch_size=8), return_predictions=False)
    client = s3_server.client()
    text = client.get_object(Bucket=s3_bucket, Key="run/table.csv")["Body"].read().decode()
    rows = list(csv.DictReader(text.splitlines()))
    assert list(rows[0]) == ["pred", "target"]  # Lighter's columns: the keys, no more
    assert [r["target"] for r in rows] == [str(i) for i in range(30)]
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="run/")["Contents"]
    assert not [o["Key"] for o in listed if "_table_parts" in o["Key"]]
    assert verify(f"s3://{s3_bucket}/run", s3_server.storage_options).ok


# ---------------------------------------------------------------------- two DDP ranks


def _run_job(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(JOB), url, "--devices", "2", *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.mark.slow
def test_two_ranks_write_one_table(tmp_path: Path) -> None:
    out = tmp_path / "table"
    result = _run_job(str(out), "--n", "301", "--format", "csv", "--summarise")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _csv_rows(out / "predictions.csv")
    assert [int(r["id"]) for r in rows] == list(range(301))
    stored = np.array([[float(r["value_0"]), float(r["value_1"])] for r in rows], dtype=np.float32)
    np.testing.assert_allclose(stored, _summary(_expected(301, 8)).numpy(), rtol=1e-5, atol=1e-6)
    assert json.loads((out / "_SUCCESS").read_text())["world_size"] == 2
    assert not (out / "_table_parts").exists()
    assert verify(str(out)).ok


@pytest.mark.slow
def test_two_ranks_write_one_zarr_array(tmp_path: Path) -> None:
    out = tmp_path / "array"
    result = _run_job(str(out), "--n", "301", "--format", "zarr")
    assert result.returncode == 0, result.stderr[-3000:]
    array = zarr.open_array(str(out), mode="r")
    assert array.shape == (301, 8, 8)
    np.testing.assert_allclose(array[:], _expected(301, 8).numpy(), rtol=1e-5, atol=1e-6)
    assert json.loads((out / "_SUCCESS").read_text())["count"] == 301
    assert verify(str(out)).ok


# ---------------------------------------------------------------------- Lighter's CsvWriter table: no id column


class _Scored(torch.utils.data.Dataset[int]):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> int:
        return index


class _NamedScores(DemoModel):
    """Names with a comma, a quote or a line break, and three identical rows (3, 7 and 25): CSV's hard cases."""

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        names = ["same" if i in (3, 7, 25) else f'case {i},\n"{i % 3}"' for i in batch.tolist()]
        scores = torch.where(torch.isin(batch, torch.tensor([3, 7, 25])), 1.0, batch / 7)
        return {"name": names, "score": scores.float()}


def _predict_table(url: Path, dataset: Any, **options: Any) -> CsvWriter:
    writer = CsvWriter(url / "scores.csv", keys=["name", "score"], **options)
    _trainer(writer).predict(_NamedScores(), DataLoader(dataset, batch_size=6), return_predictions=False)
    return writer


def test_csv_writer_resume_keeps_the_rows_of_the_committed_table(tmp_path: Path) -> None:
    _predict_table(tmp_path / "whole", _Scored())
    half = torch.utils.data.Subset(_Scored(), range(20))
    writer = _predict_table(tmp_path / "resumed", half)
    todo = remaining(str(tmp_path / "resumed"), _Scored(), format=writer.format)
    assert list(todo.indices) == list(range(20, 40))
    _predict_table(tmp_path / "resumed", todo, mode="resume")
    whole = (tmp_path / "whole" / "scores.csv").read_bytes()
    assert (tmp_path / "resumed" / "scores.csv").read_bytes() == whole
    assert whole.count(b"same,1.0\n") == 3 and b'"case 1,\n""1"""' in whole
    result = verify(str(tmp_path / "resumed"))
    assert result.ok and result.records == 40, result.problems


def test_verify_finds_a_changed_and_a_lost_row_of_a_csv_writer_table(tmp_path: Path) -> None:
    _predict_table(tmp_path, range(10))
    table = tmp_path / "scores.csv"
    assert verify(str(tmp_path)).ok
    text = table.read_text()
    rows = _csv_rows(table)
    table.write_text(text.replace(f",{rows[4]['score']}\n", ",0.5\n"))
    assert [(p.id, p.kind) for p in verify(str(tmp_path)).problems] == [("4", "size")]  # its line is shorter
    table.write_text(text.replace("same,1.0\n", ""))
    kinds = {p.kind for p in verify(str(tmp_path)).problems}
    assert "invalid" in kinds and not verify(str(tmp_path)).ok


def test_a_resumed_csv_text_table_keeps_the_rows_a_killed_run_stored(tmp_path: Path) -> None:
    """Rows whose cells hold line breaks go through the parts of a killed run, then into the resumed run's table."""
    names = ["a", "b\nc", 'd"', "e\r\nf", "g"]
    lines, _ = batch_rows({"name": names, "score": torch.arange(5) / 2}, ["name", "score"])
    table = CsvTextFormat(columns=["name", "score"], filename="t.csv")
    with pytest.raises(RuntimeError), Sink(tmp_path, format=table) as sink:
        sink.put_batch(range(3), pack_lines(lines[:3]))
        sink.flush()
        raise RuntimeError("killed")
    with Sink(tmp_path, format=table, mode="resume") as sink:
        sink.put_batch(range(5), pack_lines(lines))
        assert sink.stats.skipped == 3
    text = (tmp_path / "t.csv").read_bytes().decode()  # ("\r\n" inside a cell stays)
    assert list(csv.reader(io.StringIO(text))) == [["name", "score"], *([n, str(i / 2)] for i, n in enumerate(names))]
    assert text == "name,score\n" + "".join(lines)
    result = verify(str(tmp_path))
    assert result.ok and result.records == 5, result.problems
