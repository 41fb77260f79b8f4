"""What a run is: the workload, the variant and where it writes. Light to import (no torch), and picklable."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

VARIANTS = ("compute", "ceiling", "lighter", "lightning", "sink", "sink-nocopy")
WRITERS = ("lighter", "lightning", "sink")
_UNITS = {"B": 1, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}
# The conv model's output per sample: 64 channels of 64 x 64 float32 = 1 MiB.
CONV_CHANNELS = 64
CONV_SIDE = 64


@dataclass(frozen=True)
class Workload:
    """The same work for every variant: ``items`` predictions of ``item_bytes``, ``batch`` per step.

    ``model="sleep"``: each predict_step builds a fresh output and sleeps until ``step_s`` has passed since it
    started, as the host does while an accelerator computes. ``model="conv"``: a small conv net on the CPU.
    """

    label: str
    item_bytes: int
    items: int
    batch: int
    step_s: float = 0.0
    model: str = "sleep"

    @property
    def elements(self) -> int:
        return max(1, self.item_bytes // 4)

    @property
    def batches(self) -> int:
        return -(-self.items // self.batch)

    @property
    def npy_bytes(self) -> int:
        """Bytes of one stored ``.npy`` object."""
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(self.item_shape, dtype=np.float32))
        return buffer.getbuffer().nbytes

    @property
    def item_shape(self) -> tuple[int, ...]:
        if self.model == "conv":
            return (CONV_CHANNELS, CONV_SIDE, CONV_SIDE)
        return (self.elements,)

    def describe(self) -> str:
        what = "conv net on CPU" if self.model == "conv" else f"{self.step_s * 1e3:g} ms/batch simulated"
        return f"{self.items} x {human_bytes(self.item_bytes)}, batch {self.batch}, {what}"


@dataclass(frozen=True)
class RunSpec:
    variant: str
    storage: str
    url: str
    workload: Workload
    storage_options: dict[str, Any] | None = None
    concurrency: int = 16
    backend: str = "fsspec"  # the sink's S3 backend
    max_queue_bytes: int | None = None
    rss_every: int = 0  # sample the RSS every this many batches (0: never)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("storage_options")  # endpoints and dummy keys: not worth keeping, never printed
        return data


def parse_size(text: str) -> int:
    """``"4KiB"`` -> 4096; plain numbers are bytes."""
    text = text.strip()
    number = text.rstrip("BbKkMmGgIi")
    unit = text[len(number) :].upper() or "B"
    if unit not in _UNITS:
        raise ValueError(f"unknown size unit in {text!r}; use one of {', '.join(_UNITS)}")
    return int(float(number) * _UNITS[unit])


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


def parse_workload(text: str) -> Workload:
    """``SIZE[:ITEMS[:BATCH[:STEP_MS]]]``, e.g. ``1MiB:128:8:60``; ``conv[:ITEMS[:BATCH]]`` for the conv net."""
    parts = text.split(":")
    if parts[0].lower() == "conv":
        items = int(parts[1]) if len(parts) > 1 else 128
        batch = int(parts[2]) if len(parts) > 2 else 8
        return Workload("conv 1MiB", CONV_CHANNELS * CONV_SIDE * CONV_SIDE * 4, items, batch, 0.0, "conv")
    size = parse_size(parts[0])
    items = int(parts[1]) if len(parts) > 1 else 128
    batch = int(parts[2]) if len(parts) > 2 else 8
    step = float(parts[3]) / 1e3 if len(parts) > 3 else 0.05
    return Workload(parts[0], size, items, batch, step)
