"""Lightning quickstart: Trainer.predict writes every prediction to a local directory through PredictionSink.

    python examples/lightning_local.py [OUTPUT_DIR]      # default: ./predictions-lightning

Each prediction lands as OUTPUT_DIR/{index}.npy (the dataset index), beside _manifest.jsonl and _SUCCESS.
Check it afterwards with `lighter-sink verify OUTPUT_DIR`.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lighter_sink import PredictionSink


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def predict_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (features,) = batch
        return self.net(features).softmax(dim=-1)  # dim 0 = samples: one object per sample


def main() -> None:
    output = sys.argv[1] if len(sys.argv) > 1 else "./predictions-lightning"
    torch.manual_seed(0)
    dataset = TensorDataset(torch.randn(256, 16))
    sink = PredictionSink(output, format="npy")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=[sink],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    # return_predictions=False: the sink stores them; Lightning need not keep them in memory.
    trainer.predict(Classifier(), DataLoader(dataset, batch_size=32), return_predictions=False)

    assert sink.sink is not None
    print(f"wrote {sink.sink.stats.items} predictions to {output}")
    # Readers need no lighter-sink: plain numpy reads the objects.
    first = np.load(f"{output}/0.npy")
    print(f"prediction 0: shape {first.shape}, class probabilities sum to {first.sum():.3f}")


if __name__ == "__main__":
    main()
