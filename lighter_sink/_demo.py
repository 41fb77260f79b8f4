"""The model and data behind ``lighter-sink demo``: small, deterministic, CPU-only."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import Dataset

__all__ = ["DemoModel", "SyntheticImages"]


class SyntheticImages(Dataset[torch.Tensor]):
    """``length`` single-channel images whose pixels depend only on the index (reproducible anywhere)."""

    def __init__(self, length: int, size: int = 64, seed: int = 0) -> None:
        self.length = length
        self.size = size
        self.seed = seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.length:
            raise IndexError(index)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.rand(1, self.size, self.size, generator=generator)


class DemoModel(pl.LightningModule):
    """A small convolutional denoiser: image in, image of the same size out."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out.squeeze(1)

    def predict_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self.forward(batch)
