"""Parquet shards: columns ``id`` and ``value``, readable by pyarrow, pandas, polars and DuckDB as they are.

``value`` holds one prediction per row: a number for scalar predictions, else a fixed-size list of the prediction's
values in C order (``fixed_size_list<float>[16]`` for predictions of shape ``(16,)``; shape ``(4, 4)`` too, its
shape being in the metadata). The schema's metadata ``lighter_sink`` says the predictions' ``shape`` and ``dtype``
(``json.loads(schema.metadata[b"lighter_sink"])``). ``id`` is an int64 column when the ids are numbers (counter
ids, dataset indices), else a string column.

Row groups of about ``row_group_bytes`` (32 MiB of values by default, never more than the shard) are written with
pyarrow's own ``ParquetWriter``. ``value`` is stored uncompressed and plain, one data page per row group, so a
prediction's values are contiguous in the file: its record's ``offset`` and ``nbytes`` locate them and one ranged
read returns them, as Parquet stores them (8- and 16-bit integers are stored widened to 32 bits, little-endian).
``id`` is compressed (zstd). Each row group's layout is checked against the bytes pyarrow wrote before any
record of it is made, so a record never points at other bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lighter_sink._checksum import crc32
from lighter_sink._errors import ConfigurationError, MissingDependencyError, PredictionError
from lighter_sink._types import Buffer, Record, is_numeric_id
from lighter_sink.formats._base import require_numpy_dtype
from lighter_sink.formats._shards import Packer, ShardFormat

__all__ = ["ParquetFormat"]

DEFAULT_ROW_GROUP_BYTES = 32 * 2**20
METADATA_KEY = b"lighter_sink"
# Parquet's physical types for integers narrower than 32 bits are INT32: such values are stored widened
_WIDENED = {np.dtype(t): np.dtype("<i4") for t in ("i1", "i2", "u1", "u2")}


def _require_pyarrow() -> None:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            "format 'parquet' needs pyarrow: pip install 'lighter-sink[parquet]'", name="pyarrow"
        ) from exc


class ParquetFormat(ShardFormat):
    """Parquet shards of ``id``/``value`` rows (see the module docstring).

    Args:
        row_group_bytes: the values' bytes per row group (readers load a row group's page at once).

    Raises:
        ConfigurationError: ``row_group_bytes`` is not a positive int.
    """

    name = "parquet"
    shard_extension = ".parquet"

    def __init__(self, *, row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES) -> None:
        if type(row_group_bytes) is not int or row_group_bytes < 1:
            raise ConfigurationError(f"row_group_bytes must be a positive int, got {row_group_bytes!r}")
        self.row_group_bytes = row_group_bytes

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} row_group_bytes={self.row_group_bytes}>"

    def require(self) -> None:
        _require_pyarrow()

    def check(self, value: torch.Tensor) -> None:
        super().check(value)
        require_numpy_dtype(
            value,
            "format 'parquet' cannot store dtype {dtype}: Parquet has no such type; cast the prediction (.float())",
        )
        if value.dtype == torch.bool or value.is_complex():
            raise PredictionError(
                f"format 'parquet' stores numbers, got dtype {value.dtype}; cast the prediction (for example "
                ".to(torch.uint8)) or use format='tar'"
            )
        if value.numel() == 0:  # (a kind of sample: the sink checks one sample of each shape)
            raise PredictionError(
                f"format 'parquet' stores predictions of at least one value, got shape {tuple(value.shape)}"
            )

    def prepare(self, ids: Sequence[str], samples: torch.Tensor | Sequence[torch.Tensor]) -> np.ndarray[Any, Any]:
        if isinstance(samples, torch.Tensor):
            values = samples  # (rows are samples)
        elif samples:
            shape = tuple(samples[0].shape)
            if any(tuple(s.shape) != shape or s.dtype != samples[0].dtype for s in samples):
                kinds = ", ".join(sorted({f"{tuple(s.shape)} {s.dtype}" for s in samples}))
                raise PredictionError(f"format 'parquet' stores predictions of one shape and dtype, got {kinds}")
            values = torch.stack(list(samples))
        else:
            return np.empty((0,), dtype=np.float32)
        return np.ascontiguousarray(values.numpy())

    def check_records(self, records: Sequence[Record]) -> None:
        kinds = {(tuple(r.shape), r.dtype) for r in records}
        if len(kinds) > 1:
            shown = ", ".join(f"{list(shape)} {dtype}" for shape, dtype in sorted(kinds)[:4])
            raise PredictionError(
                f"format 'parquet': the ranks' shards hold predictions of {len(kinds)} shapes and dtypes ({shown}); "
                "readers cannot read such shards as one dataset, so the output is not committed"
            )

    def open_packer(self, previous: Packer | None = None) -> Packer:
        packer = _ParquetPacker(self.row_group_bytes)
        if isinstance(previous, _ParquetPacker):
            # a rank's shards share one schema: readers read them together, and a dataset of files whose columns
            # differ in type is refused (pyarrow, polars, DuckDB)
            packer._kind, packer._numeric_ids = previous._kind, previous._numeric_ids
        return packer


class _Collector:
    """The file object pyarrow writes to: it keeps what was written until the packer takes it."""

    closed = False

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.position = 0

    def write(self, data: Any) -> int:
        piece = bytes(data)
        self.pieces.append(piece)
        self.position += len(piece)
        return len(piece)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> list[bytes]:
        pieces, self.pieces = self.pieces, []
        return pieces


class _ParquetPacker(Packer):
    def __init__(self, row_group_bytes: int) -> None:
        super().__init__()
        self._row_group_bytes = row_group_bytes
        self._file = _Collector()
        self._writer: Any = None
        self._kind: tuple[tuple[int, ...], np.dtype[Any]] | None = None
        self._numeric_ids = True
        self._ids: list[str] = []
        self._values: list[np.ndarray[Any, Any]] = []
        self._held = 0

    @property
    def filled(self) -> int:
        return self.size + self._held  # (held rows count towards the shard's size)

    def add(self, ids: Sequence[str], encoded: np.ndarray[Any, Any]) -> list[Buffer]:
        if not len(ids):
            return []
        kind = (tuple(encoded.shape[1:]), encoded.dtype)
        if self._kind is None:
            self._kind = kind
            self._numeric_ids = all(map(is_numeric_id, ids))
        elif kind != self._kind:
            raise PredictionError(
                f"format 'parquet' stores predictions of one shape and dtype in all of a rank's shards (they are "
                f"read together): they hold {self._kind[0]} {self._kind[1]}, got {kind[0]} {kind[1]}"
            )
        if self._numeric_ids and not all(map(is_numeric_id, ids)):
            raise PredictionError(
                f"format 'parquet' stores ids of one type in all of a rank's shards: numbers so far, got text ids "
                f"such as {ids[0]!r}"
            )
        self._ids.extend(ids)
        self._values.append(encoded)
        self._held += encoded.nbytes
        return self._write_row_group() if self._held >= self._row_group_bytes else []

    def finish(self) -> list[Buffer]:
        pieces = self._write_row_group()
        if self._writer is not None:
            self._writer.close()  # the footer
            footer = self._file.take()
            self.size += sum(map(len, footer))
            pieces += footer
        return pieces

    def _write_row_group(self) -> list[Buffer]:
        """Write the held rows as one row group; make their members from where pyarrow put their values."""
        if not self._ids:
            return []
        import pyarrow as pa
        import pyarrow.parquet as pq

        assert self._kind is not None
        shape, dtype = self._kind
        values = np.concatenate(self._values) if len(self._values) > 1 else self._values[0]
        ids, self._ids, self._values, self._held = self._ids, [], [], 0
        count = len(ids)
        width = math.prod(shape)
        flat = pa.array(values.reshape(-1))
        column = flat if not shape else pa.FixedSizeListArray.from_arrays(flat, width)
        id_column = pa.array([int(i) for i in ids], pa.int64()) if self._numeric_ids else pa.array(ids, pa.string())
        table = pa.table({"id": id_column, "value": column})
        if self._writer is None:
            metadata = {METADATA_KEY: json.dumps({"shape": list(shape), "dtype": str(dtype)}).encode()}
            self._writer = pq.ParquetWriter(
                self._file,
                table.schema.with_metadata(metadata),
                compression={"id": "zstd", "value": "none"},
                use_dictionary=["id"],
                write_statistics=["id"],
                # one page per row group: the values are then contiguous, behind the page's header and levels
                data_page_size=1 << 62,
                max_rows_per_page=1 << 62,
            )
        self._writer.write_table(table.replace_schema_metadata(self._writer.schema.metadata), row_group_size=count)
        data = b"".join(self._file.take())
        written = len(data)
        stored = values.astype(_WIDENED[values.dtype]) if values.dtype in _WIDENED else values
        stored = np.ascontiguousarray(stored.astype(stored.dtype.newbyteorder("<"), copy=False).reshape(count, -1))
        region = stored.nbytes
        # the values end what pyarrow wrote for the row group: checked before anything of it is recorded
        if region > written or memoryview(data)[written - region :] != stored.reshape(-1).view(np.uint8).data:
            raise PredictionError(
                "format 'parquet': this pyarrow laid out a row group otherwise than one plain, uncompressed page; "
                f"its predictions cannot be located (pyarrow {pa.__version__})"
            )
        row_bytes = region // count
        start = self.size + written - region
        kind = (tuple(int(n) for n in shape), str(dtype))
        self.members.extend(
            ids,
            range(start, start + count * row_bytes, row_bytes),
            [row_bytes] * count,
            [crc32(row, 0) for row in stored],
            [kind] * count,
        )
        self.size += written
        return [data]
