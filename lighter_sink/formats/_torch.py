"""PyTorch ``.pt`` files, readable with ``torch.load``."""

from __future__ import annotations

import io

import torch

from lighter_sink.formats._base import EncodedItem, Format

__all__ = ["TorchFormat"]


class TorchFormat(Format):
    """One ``.pt`` object per prediction, any dtype torch supports (bfloat16 included)."""

    name = "pt"
    extension = ".pt"

    def encode(self, value: torch.Tensor) -> EncodedItem:
        # torch.save writes a view's whole storage; a compact copy keeps a batch row from carrying the batch.
        if value.untyped_storage().nbytes() != value.nbytes or not value.is_contiguous():
            value = value.clone(memory_format=torch.contiguous_format)
        out = io.BytesIO()
        torch.save(value, out)
        return EncodedItem((out.getbuffer(),), tuple(value.shape), str(value.dtype).removeprefix("torch."))

    def describe(self, data: bytes) -> tuple[tuple[int, ...], str]:
        value = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        if not isinstance(value, torch.Tensor):
            raise NotImplementedError("the object does not hold a single tensor")
        return tuple(value.shape), str(value.dtype).removeprefix("torch.")
