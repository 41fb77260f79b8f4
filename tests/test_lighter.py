import importlib
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lighter_sink import ConfigurationError, FormatNotFoundError, PredictionSink
from lighter_sink._verify import verify
from lighter_sink.formats import get_format
from lighter_sink.lighter import CsvWriter, FileWriter
from tests.conftest import quiet_trainer as _trainer

# ---------------------------------------------------------------- Lighter 0.1's writers, as a reference
# What lighter/callbacks/writer/file.py did, synchronously and locally (torchvision's PNG encoder replaced by
# Pillow's; pixels are compared, not bytes).


def _lighter_png(path: Path, chw: torch.Tensor) -> None:
    pixels = (chw.float().clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0)
    array = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    Image.fromarray(np.ascontiguousarray(array.numpy())).save(path.with_suffix(".png"))


def _lighter_image_3d(path: Path, cdhw: torch.Tensor) -> None:
    c, d, h, w = cdhw.shape
    _lighter_png(path, cdhw.reshape(c, d * h, w))


LIGHTER_WRITERS: dict[str, Callable[[Path, torch.Tensor], None]] = {
    "tensor": lambda path, value: torch.save(value.clone(), path.with_suffix(".pt")),
    "image_2d": _lighter_png,
    "image_3d": _lighter_image_3d,
    "text": lambda path, value: path.with_suffix(".txt").write_text(str(value), encoding="utf-8"),
}


def _lighter_file_writer(directory: Path, outputs: list[dict[str, Any]], writer: str, name_key: str | None) -> None:
    """Lighter 0.1's FileWriter on one rank: counter names 0, 1, ... or the name_key entries."""
    directory.mkdir(parents=True)
    counter = 0
    for output in outputs:
        values = list(output["pred"])
        names = list(output[name_key]) if name_key else [counter + i for i in range(len(values))]
        for name, value in zip(names, values, strict=True):
            target = directory / str(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            LIGHTER_WRITERS[writer](target, value)
        counter += len(values)


def _files(directory: Path) -> dict[str, Path]:
    found = {p.relative_to(directory).as_posix(): p for p in directory.rglob("*") if p.is_file()}
    return {k: v for k, v in found.items() if not k.startswith("_")}  # the sink's manifest and marker


def _same_content(ours: Path, theirs: Path) -> None:
    if ours.suffix == ".png":
        with Image.open(ours) as a, Image.open(theirs) as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    elif ours.suffix == ".pt":
        torch.testing.assert_close(torch.load(ours), torch.load(theirs))
    else:
        assert ours.read_bytes() == theirs.read_bytes()


# ---------------------------------------------------------------- a small Lighter-like system


class _Cases(Dataset[dict[str, Any]]):
    def __init__(self, length: int, shape: tuple[int, ...]) -> None:
        self.length = length
        self.shape = shape

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(index)
        # values a little outside [0, 1] so clipping is exercised
        image = torch.rand(self.shape, generator=generator) * 1.2 - 0.1
        return {"input": image, "id": f"case-{index:02d}"}


class _System(pl.LightningModule):
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return {"pred": batch["input"].flip(-1), "name": batch["id"]}


def _predict(callback: pl.Callback, dataset: _Cases) -> list[dict[str, Any]]:
    """Run Trainer.predict with ``callback``; return the outputs Lighter's writer would have received."""
    _trainer(callback).predict(_System(), DataLoader(dataset, batch_size=3), return_predictions=False)
    system = _System()
    return [system.predict_step(batch, i) for i, batch in enumerate(DataLoader(dataset, batch_size=3))]


SHAPES = {"tensor": (2, 3), "image_2d": (1, 6, 5), "image_3d": (1, 3, 4, 5), "text": (2,)}


@pytest.mark.parametrize(("writer", "name_key"), [(w, None) for w in LIGHTER_WRITERS] + [("image_2d", "name")])
def test_file_writer_writes_the_files_lighter_would(tmp_path: Path, writer: str, name_key: str | None) -> None:
    dataset = _Cases(8, SHAPES[writer])
    callback = FileWriter(tmp_path / "ours", value_key="pred", writer_fn=writer, name_key=name_key)
    outputs = _predict(callback, dataset)
    _lighter_file_writer(tmp_path / "theirs", outputs, writer, name_key)

    ours, theirs = _files(tmp_path / "ours"), _files(tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs)
    assert len(ours) == 8
    for name in ours:
        _same_content(ours[name], theirs[name])
    assert json.loads((tmp_path / "ours" / "_SUCCESS").read_text())["count"] == 8


def test_file_writer_with_a_lighter_writer_function_and_nested_names(tmp_path: Path) -> None:
    def write_npy(path: Path, value: torch.Tensor) -> None:
        np.save(path.with_suffix(".npy"), value.numpy())

    class Nested(_System):
        def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
            return {"pred": batch["input"], "name": [f"{n}/pred" for n in batch["id"]]}

    callback = FileWriter(tmp_path, "pred", write_npy, "name", extension=".npy")
    _trainer(callback).predict(Nested(), DataLoader(_Cases(5, (4,)), batch_size=2), return_predictions=False)
    for i in range(5):
        np.testing.assert_array_equal(np.load(tmp_path / f"case-{i:02d}" / "pred.npy"), _Cases(5, (4,))[i]["input"])


def test_file_writer_writes_to_a_url(tmp_path: Path) -> None:
    root = f"/file-writer-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    try:
        callback = FileWriter(f"memory://{root}", value_key="pred", writer_fn="text", name_key="name")
        outputs = _predict(callback, _Cases(4, (2,)))
        assert fs.cat(f"{root}/case-03.txt").decode() == str(outputs[1]["pred"][0])
        assert fs.exists(f"{root}/_SUCCESS")
    finally:
        fs.rm(root, recursive=True)


# ---------------------------------------------------------------- configs


def instantiate(config: Any) -> Any:
    """A minimal stand-in for a config system: build every dict that has a ``_target_``, depth first."""
    if isinstance(config, list):
        return [instantiate(item) for item in config]
    if not isinstance(config, dict):
        return config
    arguments = {key: instantiate(value) for key, value in config.items() if key != "_target_"}
    if "_target_" not in config:
        return arguments
    module_name, _, attribute = config["_target_"].rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)(**arguments)


def test_a_lighter_config_only_changes_its_target(tmp_path: Path) -> None:
    config = {
        "trainer": {
            "callbacks": [
                {
                    "_target_": "lighter_sink.lighter.FileWriter",
                    "directory": str(tmp_path / "predictions"),
                    "value_key": "pred",
                    "writer_fn": "image_3d",
                    "name_key": "name",
                }
            ]
        }
    }
    (callback,) = instantiate(config)["trainer"]["callbacks"]
    assert isinstance(callback, FileWriter)
    assert isinstance(callback, PredictionSink)
    assert callback.directory == str(tmp_path / "predictions")
    assert callback.name_key == "name"
    _predict(callback, _Cases(4, (1, 2, 3, 3)))
    with Image.open(tmp_path / "predictions" / "case-02.png") as image:
        assert image.size == (3, 6)  # (W, D * H)


# ---------------------------------------------------------------- arguments


def test_writer_names_resolve_to_formats(tmp_path: Path) -> None:
    assert FileWriter(tmp_path, "pred", "tensor").format is get_format("pt")
    assert FileWriter(tmp_path, "pred", "image_2d").format is get_format("png")
    assert FileWriter(tmp_path, "pred", "image_3d").format is get_format("png")
    assert FileWriter(tmp_path, "pred", "text").format is get_format("txt")
    assert FileWriter(tmp_path, "pred", "npy").format is get_format("npy")  # a registered format name
    assert FileWriter(tmp_path, "pred", get_format("pt")).format is get_format("pt")
    assert (
        repr(FileWriter(tmp_path, "pred", "text"))
        == f"FileWriter({str(tmp_path)!r}, value_key='pred', writer_fn='text')"
    )


def test_bad_writers_are_explained(tmp_path: Path) -> None:
    with pytest.raises(
        FormatNotFoundError, match=r"'video' is not a Lighter writer \(image_2d, image_3d, tensor, text\)"
    ):
        FileWriter(tmp_path, "pred", "video")
    with pytest.raises(TypeError, match="writer_fn must be a writer name or a callable"):
        FileWriter(tmp_path, "pred", 3)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="pass extension="):
        FileWriter(tmp_path, "pred", lambda path, value: None)


# ---------------------------------------------------------------- CsvWriter

NAN, INF = float("nan"), float("inf")
CSV_KEYS = ["name", "score", "half", "label", "flag", "vec", "pyfloat", "const", "run", "ragged"]
# Two predict_step outputs holding every kind of value Lighter's CsvWriter takes (a list of names, tensors of
# shape (B,) and (B, 2), floats of three precisions, ints, booleans, Python lists and values for every row) ...
CSV_OUTPUTS = [
    {
        "name": ["case_000", "with,comma", 'say "hi"'],
        "score": torch.tensor([0.3, NAN, INF]),
        "half": torch.tensor([0.1, 0.2, 0.3]).half(),
        "label": torch.tensor([1, 2, 3]),
        "flag": torch.tensor([True, False, True]),
        "vec": torch.tensor([[0.25, 0.5], [1.0, 2.0], [3e38, -0.0]]),
        "pyfloat": [0.1, 1 / 3, 2.5],
        "const": 0.5,
        "run": "run-a",
        "ragged": [[1], [], [1, 2]],
    },
    {
        "name": ["NA", "multi\nline"],
        "score": torch.tensor([-0.0, 3e38]),
        "half": torch.tensor([1e-3, 65504.0]).half(),
        "label": torch.tensor([4, 5]),
        "flag": torch.tensor([False, True]),
        "vec": torch.tensor([[0.1, 0.2], [0.3, 0.4]]),
        "pyfloat": [1e-20, 7.0],
        "const": 0.5,
        "run": "run-a",
        "ragged": [[3], []],
    },
]
# ... and the bytes Lighter 0.1.0's own CsvWriter wrote for them (its csv module, then pandas 3.0.6 reading the
# file back and writing it again: "NA" and NaN become empty cells, 17-digit floats may change in the last digit).
LIGHTER_CSV = (
    b"name,score,half,label,flag,vec,pyfloat,const,run,ragged\n"
    b'case_000,0.3000000119209289,0.0999755859375,1,True,"[0.25, 0.5]",0.1,0.5,run-a,[1]\n'
    b'"with,comma",,0.199951171875,2,False,"[1.0, 2.0]",0.3333333333333333,0.5,run-a,[]\n'
    b'"say ""hi""",inf,0.300048828125,3,True,"[3.0000000054977558e+38, -0.0]",2.5,0.5,run-a,"[1, 2]"\n'
    b',-0.0,0.0010004043579101,4,False,"[0.10000000149011612, 0.20000000298023224]",1e-20,0.5,run-a,[3]\n'
    b'"multi\nline",3.000000005497756e+38,65504.0,5,True,"[0.30000001192092896, 0.4000000059604645]",7.0,0.5,run-a,[]\n'
)


class _Replay(pl.LightningModule):
    """Returns the given outputs, one per batch, whatever the batch (None: a batch without outputs)."""

    def __init__(self, outputs: list[dict[str, Any] | None]) -> None:
        super().__init__()
        self.outputs = outputs

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any] | None:
        return self.outputs[batch_idx]


def test_csv_writer_writes_what_lighter_writes_for_every_kind_of_value(tmp_path: Path) -> None:
    writer = CsvWriter(tmp_path / "out" / "values.csv", keys=CSV_KEYS)
    _trainer(writer).predict(_Replay(CSV_OUTPUTS), DataLoader(range(5), batch_size=3), return_predictions=False)
    assert (tmp_path / "out" / "values.csv").read_bytes() == LIGHTER_CSV
    result = verify(str(tmp_path / "out"))
    assert result.ok and result.records == 5, result.problems


def test_csv_writer_writes_a_row_per_batch_when_no_key_holds_a_value_per_sample(tmp_path: Path) -> None:
    # Lighter's rows: one per batch when every key holds a single value (a 0-d tensor, a Python value)
    outputs: list[dict[str, Any] | None] = [{"loss": torch.tensor(i / 4), "epoch": 3} for i in range(12)]
    writer = CsvWriter(tmp_path / "losses.csv", keys=["loss", "epoch"])
    _trainer(writer).predict(_Replay(outputs), DataLoader(range(24), batch_size=2), return_predictions=False)
    assert (tmp_path / "losses.csv").read_text() == "loss,epoch\n" + "".join(f"{i / 4},3\n" for i in range(12))


@pytest.mark.filterwarnings("ignore:predict returned None")
def test_lighter_writers_pass_over_a_batch_without_outputs(tmp_path: Path) -> None:
    outputs: list[dict[str, Any] | None] = [
        {"pred": torch.tensor([[1.0], [2.0]]), "score": torch.tensor([0.5, 0.25])},
        None,
        {},
        {"pred": torch.tensor([[3.0]]), "score": torch.tensor([0.125])},
    ]
    files = FileWriter(tmp_path / "out", value_key="pred", writer_fn="text")
    table = CsvWriter(tmp_path / "out" / "scores.csv", keys=["score"])
    _trainer(files, table).predict(_Replay(outputs), DataLoader(range(7), batch_size=2), return_predictions=False)
    assert sorted(_files(tmp_path / "out")) == ["0.txt", "1.txt", "2.txt", "scores.csv"]
    assert (tmp_path / "out" / "2.txt").read_text() == "tensor([3.])"
    assert (tmp_path / "out" / "scores.csv").read_text() == "score\n0.5\n0.25\n0.125\n"
