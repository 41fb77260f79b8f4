"""Tables of scalar and small-vector predictions: one CSV or JSON Lines file, one row per id, sorted by id.

Layout under the url::

    predictions.csv            (or predictions.jsonl) written by rank 0 at commit: readable by csv, pandas, json
    _table_parts/rank-00000/   per-rank sorted runs of rows, written during the run, removed at commit

(A table named otherwise, ``CsvFormat(filename="scores.csv")``, keeps its parts and control objects under
``_scores.csv/``, so that it can share its directory with another output.)

Columns are ``id`` followed by the values: a scalar prediction gives one column ``value``, a vector of ``k``
values gives ``value_0 .. value_{k-1}``. ``columns=[...]`` names them instead: a prediction is then a vector
with one value per column, or a ``(len(columns), w)`` matrix whose rows become list cells (``[0.1, 0.9]``).
Numbers are written in the shortest form that reads back to the same value at the prediction's precision
(``0.3`` for a float32 0.3); JSON Lines write NaN and infinities as ``NaN`` and ``Infinity``, as Python's json
module reads them. Ids that are counters are written as numbers, other ids as strings.

Streaming: each rank keeps at most a few thousand encoded rows in memory; they go to a part object, sorted by
id, every ``4096`` rows and at flush. A row is recorded in the manifest only once its part is stored, so a
killed run never records a row it lost, and rows whose part could not be stored stay pending for the next
attempt (the writer returns their records from the ``write`` or ``flush`` that stored them; the sink records
them). At commit rank 0 merges the sorted parts (an external merge, ``_table_merge.py``: at most 32
objects are read at once, more parts are first merged into intermediate runs), keeps exactly the rows the
manifest vouches for (same id, same CRC-32 of the line: rows of stale parts from an interrupted earlier run are
left out, and a resumed run keeps the previous table's rows, reading that table whole), writes the table and
then removes the parts.
Locally the table is streamed to a temporary file that is renamed into place; on object stores, which have no
append, rank 0 holds the finished table's bytes in memory for its single PUT (a bound: the table's size).

Records: the manifest's ``path`` of a row is the table's file name, and ``nbytes``/``crc32`` are those of the
row's encoded line, its newline included.
"""

from __future__ import annotations

import csv
import io
import json
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Sequence
from typing import ClassVar

import anyio
import anyio.to_thread
import torch

from lighter_sink._errors import ConfigurationError, PredictionError
from lighter_sink._ids import is_numeric_id
from lighter_sink._types import ObjectStore, Problem, Record, RecordStream
from lighter_sink.formats._base import CheckContext, Format, FormatWriter, RecordCheck, WriterContext, record_problem
from lighter_sink.formats._table_merge import Row, TableMerge, order, part_rows

__all__ = ["CsvFormat", "JsonlFormat", "TableFormat"]

PARTS_DIR = "_table_parts"
_PART_ROWS = 4096  # rows per part object and per intermediate run object
_FAN_IN = 32  # objects merged at once: bounds rank 0's memory at commit
_TEXT_DTYPES = {torch.bfloat16: torch.float32, torch.float8_e4m3fn: torch.float32, torch.float8_e5m2: torch.float32}
_JSON_SPECIAL = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity", "True": "true", "False": "false"}

# (column names, cell width): width None means one number per cell, w a list of w numbers per cell
Layout = tuple[tuple[str, ...], int | None]


def _csv_line(cells: Sequence[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(cells)
    return out.getvalue()


class TableFormat(Format):
    """Base of :class:`CsvFormat` and :class:`JsonlFormat`: rows ``id, values...`` in one table at the url.

    Args:
        columns: names of the value columns (see the module docstring); by default ``value`` for scalar
            predictions and ``value_0 .. value_{k-1}`` for vectors of ``k`` values.
        filename: the table's name under the url; ``predictions.csv`` / ``predictions.jsonl`` by default.

    Raises:
        ConfigurationError: a column name is empty, repeated, ``id``, or contains a line break; the file name is
            not a plain name.
    """

    per_item_objects = False
    default_filename: ClassVar[str] = ""
    #: whether each row holds its id (the first column); without it, rows are paired with ids by their order
    ids_in_rows: ClassVar[bool] = True

    def __init__(self, *, columns: Sequence[str] | None = None, filename: str | None = None) -> None:
        if columns is not None:
            if isinstance(columns, str) or not all(isinstance(c, str) for c in columns):
                raise ConfigurationError(f"columns must be a list of names, got {columns!r}")
            names = tuple(columns)
            reserved = "id" if self.ids_in_rows else None
            if not names or len(set(names)) != len(names) or any(not c or c == reserved for c in names):
                other = " other than 'id'" if reserved else ""
                raise ConfigurationError(f"columns must be distinct, non-empty names{other}, got {names!r}")
            if any("\n" in c or "\r" in c for c in names):
                raise ConfigurationError(f"column names cannot contain line breaks, got {names!r}")
            columns = names
        self.columns: tuple[str, ...] | None = columns
        filename = self.default_filename if filename is None else filename
        if not isinstance(filename, str) or not filename or "/" in filename or filename.startswith((".", "_")):
            raise ConfigurationError(
                f"filename must be a plain file name (no '/', not starting with '.' or '_'), got {filename!r}"
            )
        self.filename = filename

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} columns={self.columns!r} filename={self.filename!r}>"

    @property
    def namespace(self) -> str:
        # A table named otherwise than the default usually shares its directory with other outputs (Lighter's
        # CsvWriter beside a FileWriter): its control objects then go under _{filename}/.
        return "" if self.filename == self.default_filename else self.filename

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.filename,)

    def layout(self, shape: tuple[int, ...]) -> Layout:
        """The columns a prediction of ``shape`` fills.

        Raises:
            PredictionError: the shape does not fit the columns (the message says what fits).
        """
        if self.columns is None:
            if len(shape) == 0:
                return ("value",), None
            if len(shape) == 1:
                return tuple(f"value_{i}" for i in range(shape[0])), None
            raise PredictionError(
                f"format {self.name!r} stores scalar or vector predictions (one row of values per id), got shape "
                f"{shape}; name columns=[...] for (columns, width) matrices, or use format='zarr' or 'npy'"
            )
        count = len(self.columns)
        if (len(shape) == 0 and count == 1) or shape == (count,):
            return self.columns, None
        if len(shape) == 2 and shape[0] == count:
            return self.columns, shape[1]
        raise PredictionError(
            f"format {self.name!r} has {count} columns {list(self.columns)}: a prediction must be a vector of {count} "
            f"values or a ({count}, width) matrix, got shape {shape}"
        )

    def check(self, value: torch.Tensor) -> None:
        super().check(value)
        if value.is_complex() or value.is_quantized:
            raise PredictionError(
                f"format {self.name!r} stores real numbers and booleans, got {value.dtype}; take .real or .abs() "
                "first, or use format='npy'"
            )
        self.layout(tuple(value.shape))

    def header(self, columns: Sequence[str]) -> bytes:
        """The table's first bytes before any row (the CSV header line; nothing for JSON Lines)."""
        raise NotImplementedError

    def row_lines(
        self, ids: Sequence[str], samples: Sequence[torch.Tensor], layout: Layout
    ) -> tuple[list[bytes], tuple[int, ...], str]:
        """The lines of a batch's rows, and the shape and dtype their records give."""
        cells, dtype = _cells(samples, layout)
        return self.lines(ids, cells, layout, dtype), tuple(samples[0].shape), dtype

    def split_lines(self, data: bytes) -> list[bytes]:
        """A stored table's lines, each with its newline."""
        return data.splitlines(keepends=True)

    def lines(self, ids: Sequence[str], cells: Sequence[Sequence[str]], layout: Layout, dtype: str) -> list[bytes]:
        """Encode rows; ``cells`` holds each value as text, lists already bracketed."""
        raise NotImplementedError

    def row_id(self, line: bytes) -> str:
        """The id of an encoded row (to read a table back)."""
        raise NotImplementedError

    def columns_of(self, first_lines: Sequence[bytes]) -> tuple[str, ...]:
        """The value columns of a stored table, from its header (CSV) or first row (JSON Lines)."""
        raise NotImplementedError

    def rows_of(self, lines: Sequence[bytes]) -> Sequence[bytes]:
        """The rows among a stored table's lines (those after the header, if it has one)."""
        return lines

    def open_writer(self, context: WriterContext) -> FormatWriter:
        return _TableWriter(self, context)

    async def open_check(
        self, store: ObjectStore, records: Sequence[Record], context: CheckContext
    ) -> RecordCheck | None:
        """Every record is a row of the table at its path, which is parsed and each id's line checksummed.

        Guessed (no marker names the format), a table is a path of this format's extension that several records
        list; its rows are read from the parts of the uncommitted run when the table is absent.
        """
        listed = Counter(r.path for r in records)
        if context.guessed:
            paths = sorted(p for p, n in listed.items() if n > 1 and p.endswith(self.extension))
        else:
            paths = sorted(listed)
        if not paths:
            return None
        check = _TableCheck()
        for path in paths:
            await check.load(self, store, path, {r.id for r in records if r.path == path}, context)
        return check


class CsvFormat(TableFormat):
    """One CSV table with a header line ``id,<columns>``; see :class:`TableFormat` and the module docstring."""

    name = "csv"
    extension = ".csv"
    default_filename = "predictions.csv"

    def header(self, columns: Sequence[str]) -> bytes:
        return _csv_line(["id", *columns]).encode()

    def lines(self, ids: Sequence[str], cells: Sequence[Sequence[str]], layout: Layout, dtype: str) -> list[bytes]:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        lines = []
        for identifier, row in zip(ids, cells, strict=True):
            out.seek(0)
            out.truncate()
            writer.writerow([identifier, *row])
            lines.append(out.getvalue().encode())
        return lines

    def row_id(self, line: bytes) -> str:
        return next(csv.reader([line.decode()]))[0]

    def columns_of(self, first_lines: Sequence[bytes]) -> tuple[str, ...]:
        return tuple(next(csv.reader([first_lines[0].decode()]))[1:]) if first_lines else ()

    def rows_of(self, lines: Sequence[bytes]) -> Sequence[bytes]:
        return lines[1:]  # the header


class JsonlFormat(TableFormat):
    """One JSON Lines table, an object ``{"id": ..., "<column>": ...}`` per line; see :class:`TableFormat`."""

    name = "jsonl"
    extension = ".jsonl"
    default_filename = "predictions.jsonl"

    def header(self, columns: Sequence[str]) -> bytes:
        return b""

    def lines(self, ids: Sequence[str], cells: Sequence[Sequence[str]], layout: Layout, dtype: str) -> list[bytes]:
        keys = [json.dumps(c) + ": " for c in layout[0]]
        special = dtype == "bool" or "float" in dtype  # NaN, infinities and booleans are spelled differently
        lines = []
        for identifier, row in zip(ids, cells, strict=True):
            values = [_json_number(v) for v in row] if special else row
            fields = ", ".join(k + v for k, v in zip(keys, values, strict=True))
            lines.append(f'{{"id": {_json_id(identifier)}, {fields}}}\n'.encode())
        return lines

    def row_id(self, line: bytes) -> str:
        return str(json.loads(line)["id"])

    def columns_of(self, first_lines: Sequence[bytes]) -> tuple[str, ...]:
        return tuple(json.loads(first_lines[0]))[1:] if first_lines else ()


def _json_id(identifier: str) -> str:
    return identifier if is_numeric_id(identifier) else json.dumps(identifier)


def _json_number(text: str) -> str:
    if text.startswith("["):
        return "[" + ", ".join(_JSON_SPECIAL.get(v, v) for v in text[1:-1].split(", ")) + "]"
    return _JSON_SPECIAL.get(text, text)


def _cells(samples: Sequence[torch.Tensor], layout: Layout) -> tuple[list[list[str]], str]:
    """Every value of a batch as text, one list of cells per sample, and the dtype's name."""
    block = torch.stack(list(samples))
    dtype = str(block.dtype).removeprefix("torch.")
    if block.dtype in _TEXT_DTYPES:
        block = block.to(_TEXT_DTYPES[block.dtype])
    # numpy's float-to-text is the shortest repr that reads back to the same value at the array's precision
    text = block.numpy().astype(str)
    count = len(samples)
    columns, width = layout
    if width is None:
        return text.reshape(count, len(columns)).tolist(), dtype
    rows = text.reshape(count, len(columns), width).tolist()
    return [["[" + ", ".join(cell) + "]" for cell in row] for row in rows], dtype


class _TableWriter(FormatWriter):
    def __init__(self, fmt: TableFormat, context: WriterContext) -> None:
        self._format = fmt
        self._context = context
        self._layout: Layout | None = None
        self._pending: list[tuple[Row, Record]] = []
        self._sequence = 0
        self._token = f"{time.time_ns():x}-{uuid.uuid4().hex[:6]}"

    # ------------------------------------------------------------------ during the run

    async def write(self, ids: Sequence[str], samples: Sequence[torch.Tensor]) -> list[Record]:
        if not ids:
            return []
        layout = self._layout
        for identifier, sample in zip(ids, samples, strict=True):
            try:
                got = self._format.layout(tuple(sample.shape))
            except PredictionError as exc:
                raise PredictionError(f"prediction {identifier!r}: {exc}") from None
            if layout is None:
                layout = self._layout = got
            elif got != layout:
                raise PredictionError(
                    f"prediction {identifier!r} has shape {tuple(sample.shape)}, which fills columns {list(got[0])}"
                    f"{_width(got)}; the table's rows have columns {list(layout[0])}{_width(layout)}, set by the "
                    "first prediction"
                )
        assert layout is not None
        rows = await anyio.to_thread.run_sync(self._encode, ids, samples, layout)
        self._pending.extend(rows)
        if len(self._pending) < _PART_ROWS:
            return []
        return await self._store_pending()

    async def _store_pending(self) -> list[Record]:
        """Store the pending rows as a part; return their records. A failed part keeps its rows pending.

        Records go to the manifest only once their rows are stored: a killed run never records a lost row, and
        rows whose part could not be stored are kept for the next attempt (a flush called again, the commit).
        """
        pending, self._pending = self._pending, []
        if not pending:
            return []
        try:
            await self._put_part(pending)
        except BaseException:
            self._pending[:0] = pending
            raise
        return [record for _, record in pending]

    def _encode(self, ids: Sequence[str], samples: Sequence[torch.Tensor], layout: Layout) -> list[tuple[Row, Record]]:
        lines, shape, dtype = self._format.row_lines(ids, samples, layout)
        filename = self._format.filename
        return [
            (Row(order(i), i, line), Record(i, filename, len(line), f"{zlib.crc32(line):08x}", shape, dtype))
            for i, line in zip(ids, lines, strict=True)
        ]

    async def _put_part(self, pending: list[tuple[Row, Record]]) -> None:
        assert self._layout is not None
        pending.sort(key=lambda item: item[0].order)
        self._sequence += 1
        key = f"{self._context.scratch}/rank-{self._context.rank:05d}/{self._token}-{self._sequence:06d}.part"
        header = json.dumps({"columns": self._layout[0], "width": self._layout[1]}).encode() + b"\n"
        # one buffer: a local write passes its buffers to writev, which takes at most IOV_MAX of them
        await self._context.store.put(key, [header + b"".join(row.part_line() for row, _ in pending)])

    async def flush(self) -> list[Record]:
        return await self._store_pending()

    # ------------------------------------------------------------------ commit, on rank 0

    async def commit(self, records: RecordStream) -> None:
        store = self._context.store
        filename = self._format.filename
        scratch = self._context.scratch
        merge = TableMerge(self._format, store, records, self._token, scratch, part_rows=_PART_ROWS)
        parts = [key for key in await store.list(scratch) if key.endswith(".part")]
        readers = [merge.part_reader(key) for key in parts]
        if self._context.mode == "resume":
            readers.append(merge.table_reader(parts))
        level = 0
        while len(readers) > _FAN_IN:
            level += 1
            groups = [readers[i : i + _FAN_IN] for i in range(0, len(readers), _FAN_IN)]
            readers = [await merge.spill(group, f"{level}-{i:06d}") for i, group in enumerate(groups)]
            del groups
        output = store.open_output(filename)
        try:
            await merge.write_table(readers, output)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await output.discard()
            raise
        await output.finish()
        await store.delete_prefix(scratch)


def _width(layout: Layout) -> str:
    return "" if layout[1] is None else f" with {layout[1]} values per cell"


class _TableCheck(RecordCheck):
    """``verify``'s check of tables: each table parsed once, each record's line compared by length and CRC-32."""

    def __init__(self) -> None:
        super().__init__()
        # path -> the (nbytes, crc32) of every line of each id; None: the table is absent
        self._tables: dict[str, dict[str, list[tuple[int, int]]] | None] = {}

    async def load(self, fmt: TableFormat, store: ObjectStore, path: str, ids: set[str], context: CheckContext) -> None:
        try:
            data = await store.get(path)
        except FileNotFoundError:
            # an uncommitted run: its rows are still in the per-rank parts the commit would have merged
            self._tables[path] = await _part_lines(store, context.scratch) if context.guessed else None
            return
        lines = fmt.rows_of(fmt.split_lines(data))
        if not fmt.ids_in_rows:
            self._tables[path] = self._paired(path, lines, ids)
            return
        rows: dict[str, list[tuple[int, int]]] = {}
        for number, line in enumerate(lines, start=1):
            try:
                identifier = fmt.row_id(line)
            except (ValueError, KeyError, TypeError, StopIteration) as exc:
                self.problems.append(Problem("invalid", path, None, f"line {number} cannot be parsed: {exc!r}"))
                continue
            rows.setdefault(identifier, []).append((len(line), zlib.crc32(line)))
        self._tables[path] = rows
        for identifier, found in rows.items():
            if identifier not in ids:
                self.problems.append(
                    Problem("mismatch", path, identifier, "a row of the table the manifest does not list")
                )
            elif len(found) > 1:
                self.problems.append(
                    Problem("invalid", path, identifier, f"the table holds {len(found)} rows for this id")
                )

    def _paired(self, path: str, lines: Sequence[bytes], ids: set[str]) -> dict[str, list[tuple[int, int]]]:
        """A table without ids holds its recorded rows in id order: its lines are paired with them by position."""
        ordered = sorted(ids, key=order)
        if len(lines) != len(ordered):
            self.problems.append(
                Problem(
                    "invalid",
                    path,
                    None,
                    f"the table holds {len(lines)} rows and the manifest lists {len(ordered)}; its rows hold no id, "
                    "so they are checked against the manifest's in id order",
                )
            )
        return {i: [(len(line), zlib.crc32(line))] for i, line in zip(ordered, lines, strict=False)}

    def covers(self, record: Record) -> bool:
        return record.path in self._tables

    async def check(self, record: Record) -> tuple[Problem | None, int]:
        rows = self._tables[record.path]
        if rows is None:
            return Problem("missing", record.path, record.id, "the table holding this row is absent"), 0
        found = rows.get(record.id)
        if not found:
            return Problem("missing", record.path, record.id, "recorded in the manifest but not in the table"), 0
        # parts of an uncommitted run may also hold stale copies of a row: one copy must match
        problems = [(record_problem(record, nbytes, crc), nbytes) for nbytes, crc in found]
        return next((p for p in problems if p[0] is None), problems[0])


async def _part_lines(store: ObjectStore, scratch: str) -> dict[str, list[tuple[int, int]]] | None:
    """The (nbytes, crc32) of every row line in the parts under ``scratch``, by id; None when there is no part."""
    rows: dict[str, list[tuple[int, int]]] = {}
    keys = [k for k in await store.list(scratch) if k.endswith(".part")]
    for key in keys:
        _header, _, body = (await store.get(key)).partition(b"\n")
        for row in part_rows(body):
            rows.setdefault(row.id, []).append((len(row.line), zlib.crc32(row.line)))
    return rows if keys else None
