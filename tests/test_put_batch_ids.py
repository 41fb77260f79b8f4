"""``Sink.put_batch`` takes ids as a user's DataLoader collates them: integer tensors and numpy integers."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lighter_sink import IdentifierError, PredictionError, PredictionSink, Sink
from lighter_sink._demo import DemoModel, SyntheticImages
from lighter_sink._verify import verify
from tests.conftest import quiet_trainer

README = Path(__file__).resolve().parents[1] / "README.md"


def _ids(out: Path) -> list[Any]:
    return [json.loads(line)["id"] for line in (out / "_manifest.jsonl").read_text().splitlines()]


def _readme_snippet(section: str) -> str:
    """The first Python block of a README section, as written."""
    text = README.read_text()
    body = text[text.index(f"\n## {section}\n") :]
    match = re.search(r"```python\n(.*?)```", body, re.DOTALL)
    assert match is not None
    return match.group(1)


def test_the_readme_plain_loop_with_a_tensor_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's loop with the loader a user writes first: ``DataLoader(TensorDataset(ids, x))``."""
    monkeypatch.chdir(tmp_path)  # the snippet writes to ./predictions
    x = torch.rand(50, 3)
    loader = DataLoader(TensorDataset(torch.arange(100, 150), x), batch_size=16)
    model = nn.Linear(3, 2).eval()
    with torch.inference_mode():
        exec(_readme_snippet("Plain PyTorch loops"), {"loader": loader, "model": model})
    out = tmp_path / "predictions"
    assert _ids(out) == list(range(100, 150))
    with torch.inference_mode():
        np.testing.assert_allclose(np.load(out / "117.npy"), model(x[17]).numpy(), rtol=1e-6)
    assert verify(str(out)).ok


@pytest.mark.parametrize(
    "ids",
    [
        pytest.param(torch.tensor([4, 0, 9], dtype=torch.int64), id="int64-tensor"),
        pytest.param(torch.tensor([4, 0, 9], dtype=torch.int32), id="int32-tensor"),
        pytest.param(torch.tensor([4, 0, 9], dtype=torch.uint8), id="uint8-tensor"),
        pytest.param(torch.tensor([5, 4, 0, 9])[1:], id="tensor-view"),
        pytest.param(np.array([4, 0, 9]), id="numpy-int-array"),
        pytest.param(np.array([4, 0, 9], dtype=np.uint16), id="numpy-uint-array"),
        pytest.param([np.int64(4), np.int32(0), np.uint8(9)], id="numpy-scalars"),
        pytest.param((4, 0, 9), id="tuple"),
    ],
)
def test_put_batch_takes_collated_integer_ids(tmp_path: Path, ids: Any) -> None:
    with Sink(tmp_path) as sink:
        sink.put_batch(ids, torch.ones(3, 2))
    assert _ids(tmp_path) == [0, 4, 9]
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == ["0.npy", "4.npy", "9.npy"]


def test_put_takes_a_numpy_integer(tmp_path: Path) -> None:
    with Sink(tmp_path) as sink:
        sink.put(np.int64(12), torch.ones(2))
        sink.put(np.uint32(3), torch.ones(2))
    assert _ids(tmp_path) == [3, 12]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_put_batch_takes_ids_on_the_gpu(tmp_path: Path) -> None:
    with Sink(tmp_path) as sink:
        sink.put_batch(torch.arange(8, device="cuda"), torch.ones(8, 2, device="cuda"))
    assert _ids(tmp_path) == list(range(8))


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (
            torch.tensor([0.0, 1.0]),
            r"ids must hold a 1-d integer tensor or a list, got torch.float32 tensor of shape \(2,\)",
        ),
        (torch.tensor([True, False]), "got torch.bool tensor"),
        (torch.tensor([1j, 2j]), "got torch.complex64 tensor"),
        (torch.tensor([[0, 1]]), r"got torch.int64 tensor of shape \(1, 2\)"),
        (torch.tensor(3), r"got torch.int64 tensor of shape \(\)"),
        (np.array([0.5, 1.5]), r"ids must hold a 1-d integer array or a list, got float64 array of shape \(2,\)"),
        (np.array([True, False]), "got bool array"),
        (np.array([[0, 1]]), r"got int64 array of shape \(1, 2\)"),
        (np.int64(3), r"ids must hold a list of ids \(or an integer tensor\), one per prediction; got int64"),
        ("ab", "one per prediction; got str 'ab'"),
    ],
)
def test_ids_that_are_not_integers_or_not_a_vector_are_refused(tmp_path: Path, ids: Any, message: str) -> None:
    with Sink(tmp_path) as sink:
        with pytest.raises(IdentifierError, match=message):
            sink.put_batch(ids, torch.ones(2, 1))
        sink.put_batch([0, 1], torch.ones(2, 1))  # the sink goes on
    assert _ids(tmp_path) == [0, 1]


def test_a_negative_id_in_a_tensor_is_refused(tmp_path: Path) -> None:
    with Sink(tmp_path) as sink, pytest.raises(IdentifierError, match="identifier must be >= 0, got -1"):
        sink.put_batch(torch.tensor([0, -1]), torch.ones(2, 1))


class _BoolIds(DemoModel):
    def predict_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return {"pred": self(batch), "name": torch.arange(len(batch)) % 2 == 0}


def test_the_callback_refuses_bool_tensor_ids(tmp_path: Path) -> None:
    """``True``/``False`` are not ids: a mask passed by mistake must not be stored as ids 1 and 0."""
    sink = PredictionSink(tmp_path, id_key="name")
    with pytest.raises(PredictionError, match="id_key 'name' must hold a 1-d integer tensor or a list, got torch.bool"):
        quiet_trainer(sink).predict(_BoolIds(), DataLoader(SyntheticImages(4, size=8), batch_size=2))
    assert not (tmp_path / "_SUCCESS").exists()


@pytest.mark.parametrize(
    ("make_id", "template", "again", "message"),
    [
        (int, "{id}", 5, "identifier '5' was already put in this run"),
        (lambda i: f"scan-{i}", "{id}", "scan-5", "identifier 'scan-5' was already put in this run"),
    ],
)
def test_an_id_put_long_before_is_still_refused(
    tmp_path: Path, make_id: Callable[[int], object], template: str, again: object, message: str
) -> None:
    """A run remembers every key it put, not only the latest (a long run keeps its older keys compactly)."""
    with Sink(tmp_path / "preds", format="parquet", key=template) as sink:
        sink.put_batch([make_id(0), make_id(5)], torch.zeros(2, 1))
        for start in range(1000, 201_000, 20_000):
            sink.put_batch([make_id(i) for i in range(start, start + 20_000)], torch.zeros(20_000, 1))
        with pytest.raises(IdentifierError, match=re.escape(message)):
            sink.put(again, torch.zeros(1))
        with pytest.raises(IdentifierError, match=re.escape(message)):
            sink.put_batch([make_id(3), again], torch.zeros(2, 1))
        sink.put(make_id(3), torch.zeros(1))  # (a refused batch stored nothing: its other ids may come again)
    assert (tmp_path / "preds" / "_SUCCESS").exists()


def test_a_key_put_long_before_is_still_refused_to_another_id() -> None:
    """A key template that gives two ids one key: the key of an id put long before is refused to a later id."""
    from lighter_sink._handoff import Handoff
    from lighter_sink._ids import KeyTemplate

    template = KeyTemplate("{id:1>3}")  # pads with the digit 1: the ids 0 and 10 give '110'
    handoff = Handoff("memory://x", 2**20, template)
    handoff.claim(["0"], [template.render("0")])
    for start in range(1000, 201_000, 20_000):
        ids = [str(i) for i in range(start, start + 20_000)]
        keys = [template.render(i) for i in ids]
        handoff.check_unique(ids, keys)
        handoff.claim(ids, keys)
    message = "identifier '10' gives the key '110', which an id put earlier in this run has"
    for batch in (["10"], ["3", "10"]):
        with pytest.raises(IdentifierError, match=re.escape(message)):
            handoff.check_unique(batch, [template.render(i) for i in batch])
