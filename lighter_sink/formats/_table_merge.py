"""A table's sorted runs of rows and their merge at commit (see :mod:`lighter_sink.formats._table`).

The writer stores rows in part objects, sorted by id, one ``json(id) TAB line`` per row after a JSON header line
(``json(id) NUL json(line)`` for a line that holds line breaks of its own, a CSV cell's);
at commit rank 0 merges them (an external merge: at most ``fan_in`` objects are read at once, more parts are
first merged into intermediate runs) into the table, keeping exactly the rows the manifest vouches for (same id,
same CRC-32 of the line). ``verify`` reads the parts of an uncommitted run the same way. A table whose rows hold
no id (``ids_in_rows`` false) was written in id order: a resumed run pairs its lines with the recorded ids that no
part holds, in that order.
"""

from __future__ import annotations

import heapq
import json
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from lighter_sink._errors import CommitError
from lighter_sink._ids import is_numeric_id
from lighter_sink._types import ObjectStore, Output

__all__ = ["Row", "TableMerge", "TableText", "order", "part_rows"]


def order(identifier: str) -> tuple[int, int, str]:
    """The table's order of ids: counters by value first, then other ids by text (as the manifest's)."""
    return (0, int(identifier), identifier) if is_numeric_id(identifier) else (1, 0, identifier)


@dataclass(frozen=True, slots=True)
class Row:
    order: tuple[int, int, str]
    id: str
    line: bytes  # the table's line, newline included

    def part_line(self) -> bytes:
        line = self.line
        if b"\r" in line or line.find(b"\n") != len(line) - 1:  # a quoted CSV cell's line break: one part line
            return json.dumps(self.id).encode() + b"\x00" + json.dumps(line.decode()).encode() + b"\n"
        return json.dumps(self.id).encode() + b"\t" + line


def part_rows(data: bytes) -> list[Row]:
    """The rows of a part's body (the part without its header line), or of an intermediate run."""
    rows = []
    for raw in data.splitlines(keepends=True):
        encoded_id, tab, line = raw.partition(b"\t")
        if not tab:  # a line with line breaks of its own, stored as a JSON string (Row.part_line)
            encoded_id, _, text = raw.partition(b"\x00")
            line = json.loads(text).encode()
        # json.dumps wrote the id in ASCII: without a backslash its text is what lies between the quotes
        identifier = json.loads(encoded_id) if b"\\" in encoded_id else encoded_id[1:-1].decode("ascii")
        rows.append(Row(order(identifier), identifier, line))
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

    Args:
        fmt: the table's format.
        store: the sink's store.
        wanted: the CRC-32 (hex) of each recorded row's line, by id.
        token: this writer's token, naming its intermediate runs.
        scratch: the prefix of the parts and intermediate runs.
        part_rows: rows per intermediate run object.
    """

    def __init__(
        self, fmt: TableText, store: ObjectStore, wanted: Mapping[str, str], token: str, scratch: str, *, part_rows: int
    ) -> None:
        self._format = fmt
        self._store = store
        self._wanted = wanted
        self._token = token
        self._scratch = scratch
        self._part_rows = part_rows
        self._columns: tuple[str, ...] | None = None

    def _keep(self, rows: list[Row], columns: tuple[str, ...], where: str) -> list[Row]:
        wanted = self._wanted
        kept = [r for r in rows if wanted.get(r.id) == f"{zlib.crc32(r.line):08x}"]
        if kept:
            if self._columns is None:
                self._columns = columns
            elif columns != self._columns:
                raise CommitError(
                    f"{where} holds rows with columns {list(columns)}, others have {list(self._columns)}: "
                    "ranks (or the resumed run) stored predictions of different shapes"
                )
        return kept

    def part_reader(self, key: str) -> _Reader:
        async def load() -> list[Row]:
            data = await self._store.get(key)
            header, _, body = data.partition(b"\n")
            columns = tuple(json.loads(header)["columns"])
            return self._keep(part_rows(body), columns, key)

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
                return self._keep(self._paired(fmt.rows_of(lines), await self._part_ids(parts)), columns, fmt.filename)
            rows = []
            for line in fmt.rows_of(lines):
                identifier = fmt.row_id(line)
                rows.append(Row(order(identifier), identifier, line))
            rows.sort(key=lambda r: r.order)
            return self._keep(rows, columns, fmt.filename)

        return _Reader([load])

    async def _part_ids(self, parts: Sequence[str]) -> set[str]:
        """The ids whose recorded row a part holds."""
        found: set[str] = set()
        for key in parts:
            _header, _, body = (await self._store.get(key)).partition(b"\n")
            found.update(r.id for r in part_rows(body) if self._wanted.get(r.id) == f"{zlib.crc32(r.line):08x}")
        return found

    def _paired(self, lines: Sequence[bytes], in_parts: set[str]) -> list[Row]:
        """The rows of a table without ids: its lines, in order, are the recorded rows no part holds, in id order.

        Each line is paired with the next such id when it is that id's row (the same CRC-32); a line that is not
        (a row of a run interrupted after writing the table, whose part is still here) is passed over.
        """
        ids = [i for i in sorted(self._wanted, key=order) if i not in in_parts]
        rows: list[Row] = []
        for line in lines:
            if len(rows) == len(ids):
                break
            identifier = ids[len(rows)]
            if self._wanted[identifier] == f"{zlib.crc32(line):08x}":
                rows.append(Row(order(identifier), identifier, line))
        return rows

    async def spill(self, readers: Sequence[_Reader], name: str) -> _Reader:
        """Merge ``readers`` into an intermediate run of objects of ``part_rows`` rows; return its reader."""
        keys: list[str] = []
        buffer: list[bytes] = []

        async def put() -> None:
            key = f"{self._scratch}/merge-{self._token}/{name}-{len(keys):06d}.run"
            await self._store.put(key, [b"".join(buffer)])
            keys.append(key)
            buffer.clear()

        async def emit(row: Row) -> None:
            buffer.append(row.part_line())
            if len(buffer) >= self._part_rows:
                await put()

        await _merge(readers, emit)
        if buffer:
            await put()

        def loader(key: str) -> Callable[[], Awaitable[list[Row]]]:
            async def load() -> list[Row]:
                return part_rows(await self._store.get(key))

            return load

        return _Reader([loader(k) for k in keys])

    async def write_table(self, readers: Sequence[_Reader], output: Output) -> None:
        remaining = dict(self._wanted)
        started = False

        async def emit(row: Row) -> None:
            nonlocal started
            if remaining.pop(row.id, None) is None:
                return  # a second copy of a row already written (an earlier run's part, or its table)
            if not started:
                started = True
                await output.write(self._format.header(self._columns or ()))
            await output.write(row.line)

        await _merge(readers, emit)
        if not started:
            await output.write(self._format.header(self._format.columns or ()))
        if remaining:
            some = ", ".join(repr(i) for i in sorted(remaining, key=order)[:5])
            raise CommitError(
                f"{len(remaining)} rows recorded in the manifest are in no table part (for example {some}); "
                f"{self._format.filename} was not written"
            )
