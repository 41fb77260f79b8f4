"""A table's sorted runs of rows and their merge at commit (see :mod:`lighter_sink.formats._table`).

The writer stores rows in part objects, sorted by id, one ``json(id) TAB line`` per row after a JSON header line
(``json(id) NUL json(line)`` for a line that holds line breaks of its own, a CSV cell's);
at commit rank 0 merges them (an external merge: at most ``fan_in`` objects are read at once, more parts are
first merged into intermediate runs) into the table, keeping exactly the rows the manifest vouches for (same id,
same CRC-32 of the line), read from the manifest in id order as the rows come. ``verify`` reads the parts of an
uncommitted run the same way. A table whose rows hold no id (``ids_in_rows`` false) was written in id order: a
resumed run pairs its lines with the recorded ids that no part holds, in that order.
"""

from __future__ import annotations

import heapq
import json
import zlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from lighter_sink._errors import CommitError
from lighter_sink._ids import is_numeric_id
from lighter_sink._types import ObjectStore, Output, RecordStream

__all__ = ["Row", "TableMerge", "TableText", "order", "part_rows"]


def order(identifier: str) -> tuple[int, int, str]:
    """The table's order of ids: counters by value first, then other ids by text (as the manifest's)."""
    return (0, int(identifier), identifier) if is_numeric_id(identifier) else (1, 0, identifier)


@dataclass(frozen=True, slots=True)
class Row:
    order: tuple[int, int, str]
    id: str
    line: bytes  # the table's line, newline included
    columns: tuple[str, ...] | None = None  # the columns of the part that holds it (None: not known yet)

    def part_line(self) -> bytes:
        line = self.line
        if b"\r" in line or line.find(b"\n") != len(line) - 1:  # a quoted CSV cell's line break: one part line
            return json.dumps(self.id).encode() + b"\x00" + json.dumps(line.decode()).encode() + b"\n"
        return json.dumps(self.id).encode() + b"\t" + line


def part_rows(data: bytes, columns: tuple[str, ...] | None = None) -> list[Row]:
    """The rows of a part's body (the part without its header line), of ``columns``."""
    return [_row(raw, columns) for raw in data.splitlines(keepends=True)]


def _row(raw: bytes, columns: tuple[str, ...] | None) -> Row:
    encoded_id, tab, line = raw.partition(b"\t")
    if not tab:  # a line with line breaks of its own, stored as a JSON string (Row.part_line)
        encoded_id, _, text = raw.partition(b"\x00")
        line = json.loads(text).encode()
    # json.dumps wrote the id in ASCII: without a backslash its text is what lies between the quotes
    identifier = json.loads(encoded_id) if b"\\" in encoded_id else encoded_id[1:-1].decode("ascii")
    return Row(order(identifier), identifier, line, columns)


def _run_rows(data: bytes) -> list[Row]:
    """The rows of an intermediate run: a header line listing the columns of its parts, then ``index SPACE
    part line`` per row (``index`` into that list)."""
    header, _, body = data.partition(b"\n")
    kinds = [tuple(c) for c in json.loads(header)["columns"]]
    rows = []
    for raw in body.splitlines(keepends=True):
        index, _, rest = raw.partition(b" ")
        rows.append(_row(rest, kinds[int(index)] if index != b"-" else None))
    return rows


class TableText(Protocol):
    """What the merge needs of a table format: its lines, written and read back."""

    filename: str
    columns: tuple[str, ...] | None

    @property
    def ids_in_rows(self) -> bool: ...

    def header(self, columns: Sequence[str]) -> bytes: ...

    def split_lines(self, data: bytes) -> list[bytes]: ...

    def row_id(self, line: bytes) -> str: ...

    def columns_of(self, first_lines: Sequence[bytes]) -> tuple[str, ...]: ...

    def rows_of(self, lines: Sequence[bytes]) -> Sequence[bytes]: ...


class _Reader:
    """One sorted run of rows, loaded one stored object at a time."""

    def __init__(self, loaders: Sequence[Callable[[], Awaitable[list[Row]]]]) -> None:
        self._loaders = list(loaders)
        self._rows: list[Row] = []
        self._next = 0

    async def next(self) -> Row | None:
        while self._next >= len(self._rows):
            self._rows = []  # (an exhausted run holds nothing: its readers outlive it)
            if not self._loaders:
                return None
            self._rows = await self._loaders.pop(0)()
            self._next = 0
        row = self._rows[self._next]
        self._next += 1
        return row


async def _merge(readers: Sequence[_Reader], emit: Callable[[Row], Awaitable[None]]) -> None:
    heap: list[tuple[tuple[int, int, str], int, Row]] = []
    for index, reader in enumerate(readers):
        row = await reader.next()
        if row is not None:
            heap.append((row.order, index, row))
    heapq.heapify(heap)
    while heap:
        _, index, row = heap[0]
        await emit(row)
        following = await readers[index].next()
        if following is None:
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (following.order, index, following))


class TableMerge:
    """The commit's external merge: sorted runs in, one table out, only rows the manifest vouches for.

    The records come as a stream in id order, as the merged rows do: the table is written by walking both at once
    (a merge join), so that neither the records nor the rows are held whole, except the previous table a resumed
    run keeps (read whole, as it was written) and, for a table without ids, that table's recorded ids.

    Args:
        fmt: the table's format.
        store: the sink's store.
        records: the output's records, in id order (those of other paths are passed over).
        token: this writer's token, naming its intermediate runs.
        scratch: the prefix of the parts and intermediate runs.
        part_rows: rows per intermediate run object.
    """

    def __init__(
        self, fmt: TableText, store: ObjectStore, records: RecordStream, token: str, scratch: str, *, part_rows: int
    ) -> None:
        self._format = fmt
        self._store = store
        self._records = records
        self._token = token
        self._scratch = scratch
        self._part_rows = part_rows

    async def _wanted(self) -> AsyncGenerator[tuple[tuple[int, int, str], str, str], None]:
        """``(order, id, crc32)`` of each record of the table, in id order."""
        filename = self._format.filename
        async for batch in self._records.batches():
            for record in batch:
                if record.path == filename:
                    yield order(record.id), record.id, record.crc32

    def part_reader(self, key: str) -> _Reader:
        async def load() -> list[Row]:
            data = await self._store.get(key)
            header, _, body = data.partition(b"\n")
            return part_rows(body, tuple(json.loads(header)["columns"]))

        return _Reader([load])

    def table_reader(self, parts: Sequence[str]) -> _Reader:
        """The table a previous run committed (resume keeps its recorded rows); read whole, like its parts.

        Args:
            parts: the keys of this run's parts (a table without ids holds the recorded rows they do not).
        """
        fmt = self._format

        async def load() -> list[Row]:
            try:
                data = await self._store.get(fmt.filename)
            except FileNotFoundError:
                return []
            lines = fmt.split_lines(data)
            columns = fmt.columns_of(lines[:1])
            if not fmt.ids_in_rows:
                wanted = {i: crc async for _, i, crc in self._wanted()}
                return self._paired(fmt.rows_of(lines), wanted, await self._part_ids(parts, wanted), columns)
            rows = []
            for line in fmt.rows_of(lines):
                identifier = fmt.row_id(line)
                rows.append(Row(order(identifier), identifier, line, columns))
            rows.sort(key=lambda r: r.order)
            return rows

        return _Reader([load])

    async def _part_ids(self, parts: Sequence[str], wanted: Mapping[str, str]) -> set[str]:
        """The ids whose recorded row a part holds."""
        found: set[str] = set()
        for key in parts:
            _header, _, body = (await self._store.get(key)).partition(b"\n")
            found.update(r.id for r in part_rows(body) if wanted.get(r.id) == f"{zlib.crc32(r.line):08x}")
        return found

    @staticmethod
    def _paired(
        lines: Sequence[bytes], wanted: Mapping[str, str], in_parts: set[str], columns: tuple[str, ...]
    ) -> list[Row]:
        """The rows of a table without ids: its lines, in order, are the recorded rows no part holds, in id order.

        Each line is paired with the next such id when it is that id's row (the same CRC-32); a line that is not
        (a row of a run interrupted after writing the table, whose part is still here) is passed over.
        """
        ids = [i for i in sorted(wanted, key=order) if i not in in_parts]
        rows: list[Row] = []
        for line in lines:
            if len(rows) == len(ids):
                break
            identifier = ids[len(rows)]
            if wanted[identifier] == f"{zlib.crc32(line):08x}":
                rows.append(Row(order(identifier), identifier, line, columns))
        return rows

    async def spill(self, readers: Sequence[_Reader], name: str) -> _Reader:
        """Merge ``readers`` into an intermediate run of objects of ``part_rows`` rows; return its reader."""
        keys: list[str] = []
        buffer: list[bytes] = []
        kinds: dict[tuple[str, ...], int] = {}  # the columns of the rows of the object being filled

        async def put() -> None:
            key = f"{self._scratch}/merge-{self._token}/{name}-{len(keys):06d}.run"
            header = json.dumps({"columns": list(kinds)}).encode() + b"\n"
            await self._store.put(key, [header + b"".join(buffer)])
            keys.append(key)
            buffer.clear()
            kinds.clear()

        async def emit(row: Row) -> None:
            index = b"-" if row.columns is None else str(kinds.setdefault(row.columns, len(kinds))).encode()
            buffer.append(index + b" " + row.part_line())
            if len(buffer) >= self._part_rows:
                await put()

        await _merge(readers, emit)
        if buffer:
            await put()

        def loader(key: str) -> Callable[[], Awaitable[list[Row]]]:
            async def load() -> list[Row]:
                return _run_rows(await self._store.get(key))

            return load

        return _Reader([loader(k) for k in keys])

    async def write_table(self, readers: Sequence[_Reader], output: Output) -> None:
        """Write the rows the records vouch for (same id, same CRC-32 of the line), once each, in id order.

        Raises:
            CommitError: a recorded row is in no part (nothing is written), or kept rows have different columns.
        """
        wanted = self._wanted()
        current = await anext(wanted, None)
        columns: tuple[str, ...] | None = None
        missing: list[str] = []
        count_missing = 0

        async def emit(row: Row) -> None:
            nonlocal current, columns, count_missing
            while current is not None and current[0] < row.order:  # recorded, and in no part
                count_missing += 1
                if len(missing) < 5:
                    missing.append(current[1])
                current = await anext(wanted, None)
            if current is None or current[1] != row.id or current[2] != f"{zlib.crc32(row.line):08x}":
                return  # a row no record vouches for (a stale part's), or a second copy of one already written
            current = await anext(wanted, None)
            row_columns = row.columns or ()
            if columns is None:
                columns = row_columns
                await output.write(self._format.header(columns))
            elif row_columns != columns:
                raise CommitError(
                    f"the parts hold rows with columns {list(row_columns)} and {list(columns)}: ranks (or the "
                    "resumed run) stored predictions of different shapes"
                )
            await output.write(row.line)

        try:
            await _merge(readers, emit)
            while current is not None:
                count_missing += 1
                if len(missing) < 5:
                    missing.append(current[1])
                current = await anext(wanted, None)
        finally:
            await wanted.aclose()
        if columns is None:
            await output.write(self._format.header(self._format.columns or ()))
        if count_missing:
            some = ", ".join(repr(i) for i in missing)
            raise CommitError(
                f"{count_missing} rows recorded in the manifest are in no table part (for example {some}); "
                f"{self._format.filename} was not written"
            )
