"""NumPy ``.npy`` files, readable with ``numpy.load``."""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lighter_sink.formats._base import EncodedItem, Format, require_numpy_dtype

__all__ = ["NpyFormat"]


@functools.lru_cache(maxsize=256)
def _header(shape: tuple[int, ...], dtype: np.dtype[Any]) -> tuple[bytes, str]:
    """The header ``np.save`` writes (version 1.0, or 2.0 when the shape does not fit), and the dtype's name.

    Cached: predictions of one run share a few shapes, and building a header costs more than writing a small file.
    """
    fields = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    out = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(out, fields)
    except ValueError:
        out = io.BytesIO()
        np.lib.format.write_array_header_2_0(out, fields)
    return out.getvalue(), str(dtype)


class NpyFormat(Format):
    """One ``.npy`` object per prediction.

    The header is built once per batch and the sample's memory is passed on as a view, so encoding copies no
    tensor data.
    """

    name = "npy"
    extension = ".npy"

    def check(self, value: torch.Tensor) -> None:
        super().check(value)
        require_numpy_dtype(
            value,
            "format 'npy' cannot store dtype {dtype}: numpy has no such type; "
            "cast the prediction (for example .float()) or use format='pt'",
        )

    def encode_rows(self, batch: torch.Tensor) -> list[EncodedItem]:
        # One numpy conversion and one header for the whole batch; each row is a view of the batch's memory.
        array = batch.numpy(force=False)
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        count = array.shape[0]
        row_shape = array.shape[1:]
        if count == 0 or array.size == 0 or not row_shape:
            return self.encode_batch(batch.unbind(0))
        header, dtype = _header(row_shape, array.dtype)
        flat = memoryview(array.reshape(-1).view(np.uint8).data)
        step = flat.nbytes // count
        size = len(header) + step
        return [EncodedItem((header, flat[i * step : (i + 1) * step]), row_shape, dtype, size) for i in range(count)]

    def encode(self, value: torch.Tensor) -> EncodedItem:
        return self.encode_batch([value])[0]

    def encode_batch(self, values: Sequence[torch.Tensor]) -> list[EncodedItem]:
        out: list[EncodedItem] = []
        for value in values:
            array = value.numpy(force=False)
            if not array.flags.c_contiguous:
                array = array.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
            header, dtype = _header(array.shape, array.dtype)
            # a flat byte view of the sample's memory: no copy (0-d and empty arrays are tiny, bytes will do)
            data = array.reshape(-1).view(np.uint8).data if array.size and array.ndim else array.tobytes()
            out.append(EncodedItem((header, data), array.shape, dtype))
        return out

    def describe(self, data: bytes) -> tuple[tuple[int, ...], str]:
        stream = io.BytesIO(data)
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _fortran, dtype = read(stream)
        return tuple(shape), str(dtype)
