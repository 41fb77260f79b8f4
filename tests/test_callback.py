import io
import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lighter_sink import DestinationError, FormatNotFoundError, PredictionError, PredictionSink, WriteError
from lighter_sink._demo import DemoModel, SyntheticImages
from tests import _faulty
from tests.conftest import S3Server
from tests.conftest import quiet_trainer as _trainer


def _expected(n: int, size: int = 64) -> torch.Tensor:
    data = SyntheticImages(n, size=size)
    with torch.no_grad():
        return DemoModel().eval()(torch.stack([data[i] for i in range(n)]))


def _check_manifest(records: list[dict[str, Any]], n: int) -> None:
    ids = [r["id"] for r in records]
    assert ids == list(range(n))  # complete, unique, sorted
    assert all(r["shape"] == [64, 64] and r["dtype"] == "float32" for r in records)


def test_predict_to_a_local_directory(tmp_path: Path) -> None:
    n = 1000
    sink = PredictionSink(tmp_path / "preds")
    loader = DataLoader(SyntheticImages(n), batch_size=32)
    result = _trainer(sink).predict(DemoModel(), loader, return_predictions=False)
    assert result is None
    expected = _expected(n)
    out = tmp_path / "preds"
    for i in range(n):
        np.testing.assert_allclose(np.load(out / f"{i}.npy"), expected[i].numpy(), rtol=1e-5, atol=1e-6)
    _check_manifest([json.loads(line) for line in (out / "_manifest.jsonl").read_text().splitlines()], n)
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["count"] == n
    assert success["bytes"] == sum(f.stat().st_size for f in out.glob("*.npy"))
    assert sink.sink is not None
    assert sink.sink.stats.items == n


@pytest.mark.s3
def test_predict_to_s3(s3_server: S3Server, s3_bucket: str) -> None:
    n = 1000
    sink = PredictionSink(f"s3://{s3_bucket}/run-1/preds", storage_options=s3_server.storage_options)
    _trainer(sink).predict(DemoModel(), DataLoader(SyntheticImages(n), batch_size=50), return_predictions=False)
    client = s3_server.client()
    expected = _expected(n)
    for i in range(n):
        body = client.get_object(Bucket=s3_bucket, Key=f"run-1/preds/{i}.npy")["Body"].read()
        np.testing.assert_allclose(np.load(io.BytesIO(body)), expected[i].numpy(), rtol=1e-5, atol=1e-6)
    manifest = client.get_object(Bucket=s3_bucket, Key="run-1/preds/_manifest.jsonl")["Body"].read()
    _check_manifest([json.loads(line) for line in manifest.decode().splitlines()], n)
    success = json.loads(client.get_object(Bucket=s3_bucket, Key="run-1/preds/_SUCCESS")["Body"].read())
    assert success["count"] == n


@pytest.mark.s3
def test_a_missing_bucket_fails_fast_and_clearly(s3_server: S3Server) -> None:
    sink = PredictionSink("s3://no-such-bucket-here/x", storage_options=s3_server.storage_options, retries=2)
    started = time.monotonic()
    with pytest.raises(DestinationError, match="s3://no-such-bucket-here/x"):  # (its lease, the first write)
        _trainer(sink).predict(DemoModel(), DataLoader(SyntheticImages(40), batch_size=8), return_predictions=False)
    assert time.monotonic() - started < 60


def test_a_store_that_fails_every_write_stops_predict_without_success() -> None:
    plan = _faulty.Plan(fail=PermissionError(13, "read-only bucket"))
    sink = PredictionSink("faulty://broken/run", storage_options=_faulty.options(plan), retries=2, timeout=5)
    started = time.monotonic()
    with pytest.raises(WriteError) as info:
        _trainer(sink).predict(DemoModel(), DataLoader(SyntheticImages(64), batch_size=8), return_predictions=False)
    assert time.monotonic() - started < 60
    assert "faulty://broken/run" in str(info.value)
    assert "read-only bucket" in str(info.value)
    assert not any(path.endswith("_SUCCESS") for path in plan.files)


class _Exploding(DemoModel):
    def predict_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        if batch_idx == 3:
            raise RuntimeError("the model blew up")
        return super().predict_step(batch, batch_idx, dataloader_idx)


def test_a_model_error_propagates_unchanged(tmp_path: Path) -> None:
    (tmp_path / "_SUCCESS").write_text("{}")  # from an older run
    sink = PredictionSink(tmp_path)
    with pytest.raises(RuntimeError, match="the model blew up"):
        _trainer(sink).predict(_Exploding(), DataLoader(SyntheticImages(64), batch_size=8), return_predictions=False)
    assert not (tmp_path / "_SUCCESS").exists()
    assert sink.sink is not None
    assert sink.sink.state.value == "aborted"


class _DictModel(DemoModel):
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return {"logits": self(batch["image"]).mean(dim=(1, 2)), "name": batch["name"], "other": 1}


class _Named(SyntheticImages):
    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        return {"image": super().__getitem__(index), "name": f"case-{index:03d}"}


def test_dict_outputs_with_value_key_and_string_ids(tmp_path: Path) -> None:
    sink = PredictionSink(tmp_path, format="pt", value_key="logits", id_key="name")
    _trainer(sink).predict(_DictModel(), DataLoader(_Named(20, size=8), batch_size=6), return_predictions=False)
    names = sorted(p.stem for p in tmp_path.glob("*.pt"))
    assert names == [f"case-{i:03d}" for i in range(20)]
    assert torch.load(tmp_path / "case-007.pt").shape == ()


def test_missing_value_key_is_explained(tmp_path: Path) -> None:
    sink = PredictionSink(tmp_path)
    with pytest.raises(PredictionError, match=r"value_key=\.\.\."):
        _trainer(sink).predict(_DictModel(), DataLoader(_Named(4, size=8), batch_size=2), return_predictions=False)
    sink = PredictionSink(tmp_path, value_key="nope")
    with pytest.raises(PredictionError, match="'nope' is not in"):
        _trainer(sink).predict(_DictModel(), DataLoader(_Named(4, size=8), batch_size=2), return_predictions=False)
    assert not (tmp_path / "_SUCCESS").exists()


class _Strings(DemoModel):
    def predict_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> Any:
        return ["not", "a", "tensor"]


def test_non_tensor_outputs_are_refused(tmp_path: Path) -> None:
    sink = PredictionSink(tmp_path)
    with pytest.raises(PredictionError, match="must be a torch.Tensor"):
        _trainer(sink).predict(
            _Strings(), DataLoader(SyntheticImages(3, size=8), batch_size=3), return_predictions=False
        )
    assert not (tmp_path / "_SUCCESS").exists()


def test_unknown_format_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(FormatNotFoundError, match="known: .*npy.*pt"):
        PredictionSink(tmp_path, format="parquet-ish")


def test_lightning_does_not_hoard_predictions(tmp_path: Path) -> None:
    sink = PredictionSink(tmp_path)
    trainer = _trainer(sink)
    # return_predictions left at its default (True): the callback still keeps host memory flat
    trainer.predict(DemoModel(), DataLoader(SyntheticImages(40, size=8), batch_size=4))
    assert sum(len(kept) for kept in trainer.predict_loop._predictions) <= 1
    assert json.loads((tmp_path / "_SUCCESS").read_text())["count"] == 40


def test_the_callback_can_run_predict_twice(tmp_path: Path) -> None:
    sink = PredictionSink(tmp_path)
    trainer = _trainer(sink)
    trainer.predict(DemoModel(), DataLoader(SyntheticImages(10, size=8), batch_size=4), return_predictions=False)
    trainer.predict(DemoModel(), DataLoader(SyntheticImages(12, size=8), batch_size=4), return_predictions=False)
    assert json.loads((tmp_path / "_SUCCESS").read_text())["count"] == 12
    assert sorted(int(p.stem) for p in tmp_path.glob("*.npy")) == list(range(12))


def test_several_dataloaders_get_their_own_namespace(tmp_path: Path) -> None:
    sink = PredictionSink(tmp_path)
    loaders = [
        DataLoader(SyntheticImages(5, size=8), batch_size=2),
        DataLoader(SyntheticImages(3, size=8), batch_size=2),
    ]
    _trainer(sink).predict(DemoModel(), loaders, return_predictions=False)
    assert sorted(p.stem for p in (tmp_path / "dataloader_0").glob("*.npy")) == ["0", "1", "2", "3", "4"]
    assert sorted(p.stem for p in (tmp_path / "dataloader_1").glob("*.npy")) == ["0", "1", "2"]
    ids = [json.loads(line)["id"] for line in (tmp_path / "_manifest.jsonl").read_text().splitlines()]
    assert len(ids) == 8
    assert "dataloader_1/2" in ids


def test_counter_ids_that_give_one_key_are_refused(tmp_path: Path) -> None:
    from lighter_sink import IdentifierError

    sink = PredictionSink(tmp_path, key="{id:1>3}")  # pads with the digit 1: the ids 0 and 10 give '110'
    with pytest.raises(IdentifierError, match="'0' and '10' both give the key '110'"):
        _trainer(sink).predict(
            DemoModel(), DataLoader(SyntheticImages(12, size=8), batch_size=4), return_predictions=False
        )
    assert not (tmp_path / "_SUCCESS").exists()


def test_mode_error_refuses_before_any_compute(tmp_path: Path) -> None:
    (tmp_path / "0.npy").write_bytes(b"from another job")
    computed: list[int] = []

    class Counting(DemoModel):
        def predict_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
            computed.append(batch_idx)
            return super().predict_step(batch, batch_idx, dataloader_idx)

    from lighter_sink import DestinationError

    with pytest.raises(DestinationError, match="mode='error'"):
        _trainer(PredictionSink(tmp_path, mode="error")).predict(
            Counting(), DataLoader(SyntheticImages(4, size=8), batch_size=2), return_predictions=False
        )
    assert computed == []
    assert (tmp_path / "0.npy").read_bytes() == b"from another job"


def test_the_progress_bar_shows_sink_figures(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sink = PredictionSink(tmp_path)
    trainer = pl.Trainer(accelerator="cpu", devices=1, callbacks=[sink], logger=False, enable_model_summary=False)
    with caplog.at_level("INFO", logger="lighter_sink"):
        trainer.predict(DemoModel(), DataLoader(SyntheticImages(16, size=8), batch_size=4), return_predictions=False)
    postfix = str(trainer.progress_bar_callback.predict_progress_bar.postfix)  # type: ignore[union-attr]
    assert "queue=" in postfix
    assert "MB/s=" in postfix
    assert "stall=" in postfix
    assert any("stored 16 predictions" in r.getMessage() for r in caplog.records)
    success = json.loads((tmp_path / "_SUCCESS").read_text())
    assert {"stall_seconds", "queue_high_water_bytes", "mb_per_second"} <= set(success["rank0_stats"])


# ---------------------------------------------------------------------- how outputs split into samples


def _summary(images: torch.Tensor) -> torch.Tensor:
    return torch.stack([images.mean(dim=(1, 2)), images.amax(dim=(1, 2))], dim=1)


class _Returning(DemoModel):
    """Returns what ``make(predictions, batch_idx)`` builds from the model's batched predictions."""

    def __init__(self, make: Any) -> None:
        super().__init__()
        self.make = make

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        images = batch.images if isinstance(batch, _Images) else batch
        return self.make(self(images), batch_idx)


class _Stream(torch.utils.data.IterableDataset[torch.Tensor]):
    """The first ``n`` images of SyntheticImages, as a stream: no sampler, no indices for Lightning to track."""

    def __init__(self, n: int) -> None:
        self.images = SyntheticImages(n, size=8)

    def __iter__(self) -> Any:
        return (self.images[i] for i in range(len(self.images)))


def test_a_tuple_of_outputs_is_refused_not_split_into_samples(tmp_path: Path) -> None:
    # (predictions, indices) for 8 samples: two "samples" of shapes [8, 2] and [8] if taken apart
    model = _Returning(lambda y, i: (_summary(y), torch.arange(8 * i, 8 * i + len(y))))
    sink = PredictionSink(tmp_path)
    with pytest.raises(PredictionError) as info:
        _trainer(sink).predict(model, DataLoader(SyntheticImages(20, size=8), batch_size=8), return_predictions=False)
    message = str(info.value)
    assert "2 predictions" in message and "batch of 8 samples" in message
    assert "(8, 2)" in message and "(8,)" in message
    assert "value_key" in message and "id_key" in message
    assert not (tmp_path / "_SUCCESS").exists()
    assert list(tmp_path.glob("*.npy")) == []


@pytest.mark.parametrize(
    "loader",
    [
        pytest.param(lambda: DataLoader(SyntheticImages(20, size=8), batch_size=8), id="dataset"),
        pytest.param(lambda: DataLoader(_Stream(20), batch_size=8), id="stream"),
    ],
)
@pytest.mark.parametrize(
    ("make", "options", "message"),
    [
        pytest.param(
            lambda y, i: torch.cat([y, y]), {}, r"16 predictions \(a tensor of shape \(16, 8, 8\)\)", id="more"
        ),
        pytest.param(lambda y, i: {"pred": y[:-1]}, {}, r"'pred' entry holds 7 predictions", id="fewer-in-a-dict"),
        pytest.param(
            lambda y, i: {"y": y.flatten(0, 1)}, {"value_key": "y"}, r"'y' entry holds 64 predictions", id="flattened"
        ),
    ],
)
def test_a_batched_tensor_with_another_number_of_rows_is_refused(
    tmp_path: Path, loader: Any, make: Any, options: dict[str, Any], message: str
) -> None:
    sink = PredictionSink(tmp_path, **options)
    with pytest.raises(PredictionError, match=message) as info:
        _trainer(sink).predict(_Returning(make), loader(), return_predictions=False)
    assert "for a batch of 8 samples" in str(info.value)
    assert not (tmp_path / "_SUCCESS").exists()


def test_a_tuple_that_could_be_samples_or_outputs_is_refused(tmp_path: Path) -> None:
    # batches of 2 and two outputs of 2 rows each: per-sample predictions, or two batched outputs?
    model = _Returning(lambda y, i: (y, torch.arange(2 * i, 2 * i + len(y))))
    sink = PredictionSink(tmp_path)
    with pytest.raises(PredictionError, match=r"ambiguous.*value_key") as info:
        _trainer(sink).predict(model, DataLoader(SyntheticImages(6, size=8), batch_size=2), return_predictions=False)
    assert "(2, 8, 8), (2,)" in str(info.value)
    assert not (tmp_path / "_SUCCESS").exists()
    assert list(tmp_path.glob("*.npy")) == []


class _Images:
    """A batch type of the user's own: the sink cannot tell how many samples it holds."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images


class _OwnBatches(torch.utils.data.IterableDataset[_Images]):
    def __iter__(self) -> Any:
        data = SyntheticImages(10, size=8)
        for start in (0, 4, 8):
            yield _Images(torch.stack([data[i] for i in range(start, min(start + 4, 10))]))


def _crops(y: torch.Tensor, batch_idx: int) -> list[torch.Tensor]:
    # variable-size predictions: sample k of the batch keeps 2 rows and 3 + k columns
    return [y[k, :2, : 3 + k] for k in range(len(y))]


@pytest.mark.parametrize(
    "loader",
    [
        pytest.param(lambda: DataLoader(SyntheticImages(10, size=8), batch_size=4), id="dataset"),
        pytest.param(lambda: DataLoader(_OwnBatches(), batch_size=None), id="own-batch-type"),
    ],
)
def test_a_list_of_per_sample_predictions_is_stored_sample_by_sample(tmp_path: Path, loader: Any) -> None:
    # batches of 4, 4 and 2: the last one's two predictions both have 2 rows, like two batched outputs would,
    # but the earlier batches already showed they are per-sample predictions
    sink = PredictionSink(tmp_path)
    _trainer(sink).predict(_Returning(_crops), loader(), return_predictions=False)
    expected = _expected(10, size=8)
    for i in range(10):
        k = i % 4
        np.testing.assert_allclose(np.load(tmp_path / f"{i}.npy"), expected[i, :2, : 3 + k].numpy(), rtol=1e-5)
    assert json.loads((tmp_path / "_SUCCESS").read_text())["count"] == 10
