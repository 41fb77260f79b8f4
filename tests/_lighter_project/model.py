"""The model of the Lighter config: its ``predict_step`` returns every kind of value Lighter's writers take."""

from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

# Text cells as CSV needs them quoted or as pandas reads them: Lighter writes "NA" and "None" as empty cells.
LABELS = ["plain", "with,comma", 'say "hi"', "NA", "007", "", "None", "naïve", "multi\nline", " lead", "true", "1e3"]
SAMPLES = 40


class Cases(Dataset[dict[str, Any]]):
    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(index)
        return {
            "index": index,
            "name": f"case_{index:03d}",
            "image": torch.rand(3, 6, 5, generator=generator) * 1.2 - 0.1,  # a little outside [0, 1]: clipped
            "volume": torch.rand(1, 3, 4, 5, generator=generator),
        }


class Model(pl.LightningModule):
    def predict_dataloader(self) -> DataLoader[dict[str, Any]]:
        return DataLoader(Cases(), batch_size=16)  # 16, 16, 8: the last batch is smaller

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        index = batch["index"]
        score = batch["image"][:, 0, 0, 0]  # float32 values, many of whose repr needs 17 digits
        # NaN (an empty cell in Lighter's CSV), infinity, negative zero, and float32 extremes
        extremes = torch.tensor([float("nan"), float("inf"), -0.0, 1e-20, 3e38])
        special = torch.where(index % 6 < 5, extremes[(index % 6).clamp(max=4)], score)
        return {
            "pred": batch["image"][:, :, :2, :2] * 2,
            "image": batch["image"],
            "volume": batch["volume"],
            "name": batch["name"],
            "score": score,
            "label": [LABELS[i % len(LABELS)] for i in index.tolist()],
            "special": special,
            "double": score.double() * 1e16,
            "half": score.half(),
            "bf16": score.bfloat16(),
            "count": index * 1_000_000_007,
            "u8": index.to(torch.uint8),
            "flag": index % 2 == 0,
            "vec": torch.stack([score, score * 2], dim=1),
            "ivec": torch.stack([index, -index, index], dim=1),
            "pyfloat": [i / 3 for i in index.tolist()],
            "pyint": index.tolist(),
            "const": 0.25,
            "run": "run-a",
            "ragged": [[1, 2][: i % 3] for i in index.tolist()],
        }


def write_npy(path: Path, value: torch.Tensor, *, suffix: str = ".npy") -> None:
    """A writer function of the user's, as Lighter's FileWriter takes one."""
    np.save(path.with_suffix(suffix), value.numpy())
