"""The model and data behind ``lighter-sink demo``: small, deterministic, CPU-only; and what the demo may replace.

The demo writes to ``./predictions`` unless told otherwise, so it must never destroy what a user keeps there: it
writes into a place that holds nothing, or holds the output of an earlier demo (recognised by :data:`DEMO_MARK`,
which names the run whose ``_SUCCESS`` it wrote); anything else it replaces only when asked to.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import anyio
import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import Dataset

from lighter_sink._errors import DestinationError, PredictionError
from lighter_sink._store import is_local_url, local_path, open_store
from lighter_sink.formats import Format

__all__ = [
    "DEMO_MARK",
    "DemoModel",
    "SyntheticImages",
    "check_destination",
    "demo_model",
    "mark_demo_output",
    "remove_if_empty",
]

#: Written beside a demo's output once it committed: ``{"run": ...}``, the run its ``_SUCCESS`` names.
DEMO_MARK = "_demo.json"
_SCORES = 4


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
    """A small convolutional denoiser: image in, image of the same size out (or, with ``scores``, that many
    scores in [0, 1] per image: the average of each band of the denoised image, for formats of rows)."""

    def __init__(self, channels: int = 8, *, scores: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.scores = scores
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        if self.scores:
            return torch.sigmoid(nn.functional.adaptive_avg_pool1d(out.flatten(1).unsqueeze(1), self.scores)[:, 0])
        return out.squeeze(1)

    def predict_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self.forward(batch)


def demo_model(fmt: Format, size: int) -> tuple[DemoModel, str]:
    """The model whose predictions ``fmt`` can store, and what they are: images, or a few scores per image for a
    format that refuses an image (a table), as the format's own check says."""
    try:
        fmt.check(torch.zeros(size, size))
    except PredictionError:
        return DemoModel(scores=_SCORES), f"{_SCORES} float32 scores of {size}x{size} images"
    return DemoModel(), f"{size}x{size} float32"


def check_destination(url: str, storage_options: dict[str, Any], *, overwrite: bool) -> bool:
    """Refuse a url that holds anything but an earlier demo's finished output, unless ``overwrite``.

    Returns:
        Whether the demo makes the url's directory (a local path that does not exist yet).

    Raises:
        DestinationError: the url holds objects but no finished demo's output, and ``overwrite`` is false.
    """
    made = is_local_url(url) and not os.path.exists(local_path(url))
    if made or overwrite:
        return made

    async def look() -> tuple[list[str], dict[str, Any] | None, dict[str, Any] | None]:
        store = await open_store(url, storage_options)
        try:
            listing = await store.list()
            marker, mark = [_json(await store.get(key)) if key in listing else None for key in ("_SUCCESS", DEMO_MARK)]
            return listing, marker, mark
        finally:
            await store.aclose()

    listing, marker, mark = anyio.run(look, backend="asyncio")
    if not listing or (marker and mark and marker.get("run") == mark.get("run")):
        return False
    example = next((key for key in listing if not key.startswith("_")), listing[0])
    raise DestinationError(
        f"{url} holds {len(listing):,} object{'s' if len(listing) > 1 else ''} (such as {example}) and no finished "
        "demo's output; pass --overwrite to replace an output there (the objects its format would write and an "
        "earlier run's output; other files stay), or --url to write elsewhere"
    )


def _json(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def mark_demo_output(url: str, storage_options: dict[str, Any], run: object) -> None:
    """Say that the output at ``url`` (whose ``_SUCCESS`` names ``run``) is a demo's, which a next demo replaces."""

    async def mark() -> None:
        store = await open_store(url, storage_options)
        try:
            await store.put(DEMO_MARK, [json.dumps({"run": run, "written_by": "lighter-sink demo"}).encode()])
        finally:
            await store.aclose()

    anyio.run(mark, backend="asyncio")


def remove_if_empty(url: str) -> None:
    """Remove the local directory a failed demo made, when no prediction was written into it.

    The failed run's own control objects (``_output.json``, a released lease: names that begin with ``_``) go
    with it: they describe an output that holds nothing. What a failed run stored stays, for a look.
    """
    path = local_path(url)
    with contextlib.suppress(OSError):  # not empty, or already gone
        with os.scandir(path) as scan:
            entries = list(scan)
        if not all(entry.is_file() and entry.name.startswith("_") for entry in entries):
            return
        for entry in entries:
            os.unlink(entry.path)
        os.rmdir(path)
