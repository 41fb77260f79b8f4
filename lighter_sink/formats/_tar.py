"""WebDataset tar shards: each prediction is a member ``{id}.npy`` (``.pt`` for dtypes numpy has no type for).

``webdataset.WebDataset(urls)``, ``tarfile`` and ``tar -x`` read the shards as they are. A member's header is
Python's own (``tarfile.TarInfo.tobuf``, POSIX pax, so that long and non-ASCII names survive); its data is the
prediction's ``.npy`` (or ``torch.save``) bytes, padded to the tar block of 512 bytes. The record of a prediction
points at the member's data, so one ranged read of ``nbytes`` bytes from ``offset`` is a whole ``.npy`` file.

WebDataset groups members into samples by the name up to the first dot: an id holding a dot (``"scan.nii"``)
keeps its member name ``scan.nii.npy``, which WebDataset reads as the sample ``scan`` with the field ``nii.npy``.
"""

from __future__ import annotations

import functools
import tarfile
import time
from collections.abc import Sequence
from typing import Literal

import torch

from lighter_sink._checksum import crc32
from lighter_sink._errors import ConfigurationError, PredictionError
from lighter_sink._types import Buffer
from lighter_sink.formats._base import NON_NUMPY_DTYPES, EncodedItem
from lighter_sink.formats._npy import NpyFormat
from lighter_sink.formats._shards import Packer, ShardFormat
from lighter_sink.formats._torch import TorchFormat

__all__ = ["TarFormat"]

_BLOCK = tarfile.BLOCKSIZE
_ZEROS = bytes(_BLOCK)
_COPY_BELOW = 64 * 2**10  # members smaller than this are copied into the shard's buffers
_NPY = NpyFormat()
_PT = TorchFormat()

# (the encoded items, the member extension and the CRC-32 of each)
_Prepared = tuple[list[EncodedItem], list[str], list[int]]


class TarFormat(ShardFormat):
    """WebDataset-compatible tar shards (see the module docstring).

    Args:
        member: ``"npy"`` (the default: ``numpy.load`` reads each member; tensors of dtypes numpy has no type for,
            such as bfloat16, become ``.pt`` members) or ``"pt"`` (every member is a ``torch.save`` file).

    Raises:
        ConfigurationError: ``member`` is neither.
    """

    name = "tar"
    shard_extension = ".tar"

    def __init__(self, *, member: Literal["npy", "pt"] = "npy") -> None:
        if member not in ("npy", "pt"):
            raise ConfigurationError(f"member must be 'npy' or 'pt', got {member!r}")
        self.member = member

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} member={self.member!r}>"

    def check(self, value: torch.Tensor) -> None:
        super().check(value)
        if value.is_quantized:
            raise PredictionError(f"format 'tar' stores plain tensors, got a quantized one ({value.dtype})")

    def prepare(self, ids: Sequence[str], samples: torch.Tensor | Sequence[torch.Tensor]) -> _Prepared:
        items: list[EncodedItem] = []
        extensions: list[str] = []
        if isinstance(samples, torch.Tensor):
            if self.member == "npy" and samples.dtype not in NON_NUMPY_DTYPES:
                items = _NPY.encode_rows(samples)  # one conversion and one header for the batch
                return items, [_NPY.extension] * len(items), _crcs(items)
            samples = samples.unbind(0)
        if self.member == "pt" or any(s.dtype in NON_NUMPY_DTYPES for s in samples):
            for sample in samples:
                fmt = _PT if self.member == "pt" or sample.dtype in NON_NUMPY_DTYPES else _NPY
                items.append(fmt.encode(sample))
                extensions.append(fmt.extension)
        else:
            items = _NPY.encode_batch(samples)
            extensions = [_NPY.extension] * len(items)
        return items, extensions, _crcs(items)

    def open_packer(self, previous: Packer | None = None) -> Packer:
        return _TarPacker()


def _crcs(items: Sequence[EncodedItem]) -> list[int]:
    crcs = []
    for item in items:
        crc = 0
        for buffer in item.buffers:
            crc = crc32(buffer, crc)
        crcs.append(crc)
    return crcs


@functools.lru_cache(maxsize=64)
def _template(size: int, mtime: int) -> bytes:
    """tarfile's header of a member of ``size`` bytes, named ``"x"``: the others differ in name and checksum only."""
    return _header_of("x", size, mtime)


def _header_of(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _header(name: str, size: int, mtime: int) -> bytes:
    """The header ``tarfile`` writes for the member (the same bytes), several times faster for usual names.

    tarfile builds each header field by field (about 25 us); members of one shard mostly share their size, so
    their headers are tarfile's own for that size with the name and the checksum put in. Names that need more than
    the plain 100-byte field (long or non-ASCII ones: pax records) are tarfile's own work.
    """
    raw = name.encode("ascii", "surrogateescape") if name.isascii() else b""
    template = _template(size, mtime)
    if not raw or len(raw) > 100 or b"\0" in raw or len(template) != _BLOCK:  # (sizes of 8 GiB: a pax record)
        return _header_of(name, size, mtime)
    header = bytearray(template)
    header[0:100] = raw.ljust(100, b"\0")
    header[148:156] = b"        "  # the checksum is computed over its own field as spaces (POSIX)
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


class _TarPacker(Packer):
    def __init__(self) -> None:
        super().__init__()
        self._mtime = int(time.time())

    def add(self, ids: Sequence[str], encoded: _Prepared) -> list[Buffer]:
        items, extensions, crcs = encoded
        # Small members are copied into one buffer (a store write costs more than copying a few KiB); large ones
        # are passed on as views of the prediction's memory, between buffers of headers.
        out: list[Buffer] = []
        small = bytearray()
        position = self.size
        offsets: list[int] = []
        for identifier, item, extension in zip(ids, items, extensions, strict=True):
            header = _header(identifier + extension, item.nbytes, self._mtime)
            small += header
            position += len(header)
            offsets.append(position)
            if item.nbytes < _COPY_BELOW:
                for buffer in item.buffers:
                    small += buffer
            else:
                out.append(small)
                out.extend(item.buffers)
                small = bytearray()
            padding = -item.nbytes % _BLOCK
            small += _ZEROS[:padding]
            position += item.nbytes + padding
        if small:
            out.append(small)
        self.members.extend(
            ids, offsets, [item.nbytes for item in items], crcs, [(item.shape, item.dtype) for item in items]
        )
        self.size = position
        return out

    def finish(self) -> list[Buffer]:
        end = bytes(2 * _BLOCK)  # the end-of-archive marker: two zero blocks
        self.size += len(end)
        return [end]
