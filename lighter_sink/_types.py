"""The ground floor: the types every room shares. It imports nothing of the package.

* :data:`Buffer`: bytes as the formats make them and the stores send them (never joined without need).
* :class:`Record`: what the manifest says of one stored prediction; :class:`RecordColumns`: the records of many
  predictions of one object (a shard's) as columns; :class:`RecordStream`: the records of an output in id order, as
  a format's commit reads them (a chunk at a time: never all at once).
* :class:`ObjectStore` and :class:`Output`: the narrow interface a format that streams or updates in place (tables,
  zarr) gets to the sink's store. It has no url and no credentials: the sink opened the store, with its retries,
  timeouts and statistics, and every byte a format stores goes through it.
* :class:`Problem`: one thing ``verify`` found wrong with an output; formats that check their own rows (tables,
  zarr) report them too.
"""

from __future__ import annotations

import json
import json.encoder
from array import array
from bisect import bisect_right
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol, overload

__all__ = [
    "CHECKSUM",
    "Buffer",
    "KeyPage",
    "KeyPages",
    "ObjectStore",
    "Output",
    "Problem",
    "ProblemKind",
    "Record",
    "RecordColumns",
    "RecordStream",
    "decode_records",
    "encode_records",
    "encode_sorted",
    "id_positions",
    "is_numeric_id",
]

Buffer = bytes | bytearray | memoryview

_json_str = json.encoder.encode_basestring_ascii  # json.dumps(text), as json.dumps writes a str with its defaults

#: The manifest's name of a record's checksum field.
CHECKSUM = "crc32"
#: Keys of one page of a listing (``Store.iter_list``), and the listing itself.
KeyPage = list[str]
KeyPages = AsyncGenerator[KeyPage, None]


def is_numeric_id(identifier: str) -> bool:
    """Whether ``identifier`` is a number's id: the decimal text of a non-negative int, as ``str(int)`` writes it.

    Numbers sort by value, key templates format them as ints and the manifest writes them as JSON numbers; every
    other id is text, sorted and rendered as written. ``"007"`` is text (else ``"007"`` and ``"7"`` would be one
    id), and so are Unicode digits such as ``"1²"`` and ``"٣"``, which ``str.isdigit()`` accepts and ``int()``
    refuses or reads as another number.
    """
    return identifier.isascii() and identifier.isdigit() and (identifier[0] != "0" or identifier == "0")


class Record(NamedTuple):
    """What the manifest says of one stored prediction (a named tuple: a run creates millions).

    ``id`` is text, as every id inside the sink; in JSON a number's id (:func:`is_numeric_id`) is a number, so that
    a reader of the manifest joins it on a dataset's index, and every other id a string.

    ``offset``: where the prediction's bytes start in the object ``path`` when it is one of many in that object
    (a shard: ``nbytes`` bytes from ``offset`` are its bytes, ``crc32`` theirs), so that one ranged read returns
    them; ``None`` (and absent from the JSON) when ``path`` is its own object or a row of a table or array.
    """

    id: str
    path: str
    nbytes: int
    crc32: str
    shape: tuple[int, ...]
    dtype: str
    offset: int | None = None

    def to_json(self) -> str:
        # The same text as json.dumps of the dict, several times faster: only the strings need escaping.
        # (json.dumps of a str is this C function behind two Python calls: a third of the time of a record)
        shape = ",".join(map(str, self.shape))
        identifier = self.id if is_numeric_id(self.id) else _json_str(self.id)
        offset = "" if self.offset is None else f',"offset":{self.offset}'
        return (
            f'{{"id":{identifier},"path":{_json_str(self.path)},"nbytes":{self.nbytes},'
            f'"{CHECKSUM}":"{self.crc32}","shape":[{shape}],"dtype":{_json_str(self.dtype)}{offset}}}'
        )

    @classmethod
    def from_json(cls, line: str) -> Record:
        data = json.loads(line)
        identifier = data["id"]
        # a number (written since ids keep their type) or a string (also a number's id, in older manifests)
        if type(identifier) is int and identifier >= 0:
            identifier = str(identifier)
        elif not isinstance(identifier, str):
            raise ValueError(f"a record's id must be a string or an int >= 0, got {identifier!r}")
        offset = data.get("offset")
        if offset is not None and (type(offset) is not int or offset < 0):
            raise ValueError(f"a record's offset must be an int >= 0, got {offset!r}")
        return cls(
            id=identifier,
            path=data["path"],
            nbytes=int(data["nbytes"]),
            crc32=data[CHECKSUM],
            shape=tuple(data["shape"]),
            dtype=data["dtype"],
            offset=offset,
        )


def encode_records(records: Iterable[Record]) -> bytes:
    """JSON lines, one record each (the body of a manifest part)."""
    return "".join(r.to_json() + "\n" for r in records).encode()


def decode_records(data: bytes) -> list[Record]:
    return [Record.from_json(line) for line in data.decode().splitlines() if line.strip()]


def id_positions(ids: Sequence[str]) -> list[int]:
    """The positions of ``ids`` in id order (numbers by value, then text by code point), ties in place: sorted
    without building a key tuple per id (a million ids at a part or a commit)."""
    numeric: list[int] = []
    text: list[int] = []
    for index, identifier in enumerate(ids):
        (numeric if is_numeric_id(identifier) else text).append(index)
    numeric.sort(key=lambda index: int(ids[index]))
    text.sort(key=ids.__getitem__)
    return numeric + text


# Lines of a part encoded at a time by encode_sorted: its text is never one string.
_ENCODE_LINES = 8192


def encode_sorted(chunks: Sequence[Sequence[Record]]) -> list[bytes]:
    """The records of every chunk sorted by id (numbers by value, then text by code point), as JSON lines in a few
    buffers: :func:`encode_records` of them, sorted stably. Columns are encoded without a :class:`Record` object."""
    ids: list[str] = []
    for chunk in chunks:
        ids += chunk.ids() if isinstance(chunk, RecordColumns) else [record.id for record in chunk]
    starts = [0]
    for chunk in chunks:
        starts.append(starts[-1] + len(chunk))
    out: list[bytes] = []
    lines: list[str] = []
    for index in id_positions(ids):
        which = bisect_right(starts, index) - 1
        chunk = chunks[which]
        if isinstance(chunk, RecordColumns):
            lines.append(chunk.line(index - starts[which], ids[index]))
        else:
            lines.append(chunk[index - starts[which]].to_json())
        if len(lines) == _ENCODE_LINES:
            out.append(("\n".join(lines) + "\n").encode())
            lines = []
    if lines:
        out.append(("\n".join(lines) + "\n").encode())
    return out


class RecordColumns(Sequence[Record]):
    """Records of predictions stored in one object (a shard), held as columns: a sequence of :class:`Record`, made
    one at a time when asked for.

    A shard holds hundreds of thousands of predictions. As objects, their records (with their ids and numbers)
    took about 220 bytes each, allocated a few at a time while the shard filled, among the run's short-lived
    objects; kept until the shard was stored, they held on to memory the allocator could then not give back
    (pymalloc arenas with a few live objects each). Here they take about 40 bytes with the id's characters, in a
    few large arrays; :func:`encode_sorted` writes them to a manifest part without making a record object.

    Args:
        path: the object every record's prediction is in (a shard's key; ``""`` until it is known: :meth:`at`).
    """

    __slots__ = (
        "_crc32",
        "_ends",
        "_firsts",
        "_kind_list",
        "_kind_of",
        "_kinds",
        "_lines",
        "_nbytes",
        "_offsets",
        "_path_json",
        "_texts",
        "path",
    )

    #: ids of one chunk of text joined onto the previous one below this many characters (few, small objects)
    _TEXT_CHARS = 4096

    def __init__(self, path: str = "") -> None:
        self.path = path
        self._path_json = _json_str(path)
        self._texts: list[str] = []  # ids, joined, in chunks
        self._firsts = array("q")  # each chunk's first record
        self._ends = array("q")  # where each record's id ends in its chunk's text
        self._offsets = array("q")  # -1: none
        self._nbytes = array("q")
        self._crc32 = array("I")
        self._kind_of = array("I")  # an index into _kinds
        self._kinds: dict[tuple[tuple[int, ...], str], int] = {}
        self._kind_list: list[tuple[tuple[int, ...], str]] = []
        self._lines: list[str] = []  # each kind's end of a JSON line

    def at(self, path: str) -> RecordColumns:
        """These records, in the object ``path`` (the columns are shared, not copied)."""
        other = RecordColumns(path)
        for name in RecordColumns.__slots__:
            if name not in ("path", "_path_json"):
                setattr(other, name, getattr(self, name))
        return other

    def extend(
        self,
        ids: Sequence[str],
        offsets: Iterable[int | None],
        nbytes: Iterable[int],
        crc32: Iterable[int],
        kinds: Iterable[tuple[tuple[int, ...], str]],
    ) -> None:
        """Append the records of ``ids``: each one's offset, size, CRC-32 (an int) and ``(shape, dtype)``."""
        if not ids:
            return
        ends = self._ends
        text = "".join(ids)
        if self._texts and len(self._texts[-1]) < self._TEXT_CHARS:
            position = len(self._texts[-1])
            self._texts[-1] += text
        else:
            position = 0
            self._firsts.append(len(ends))
            self._texts.append(text)
        for identifier in ids:
            position += len(identifier)
            ends.append(position)
        self._offsets.extend(-1 if offset is None else offset for offset in offsets)
        self._nbytes.extend(nbytes)
        self._crc32.extend(crc32)
        known = self._kinds
        kind_of = self._kind_of
        for kind in kinds:
            index = known.get(kind)
            if index is None:
                index = known[kind] = len(known)
                self._kind_list.append(kind)
                shape, dtype = kind
                self._lines.append(f',"shape":[{",".join(map(str, shape))}],"dtype":{_json_str(dtype)}')
            kind_of.append(index)
        if not len(self._offsets) == len(self._nbytes) == len(self._crc32) == len(kind_of) == len(ends):
            raise ValueError("RecordColumns.extend needs one offset, size, checksum and kind per id")

    def __len__(self) -> int:
        return len(self._ends)

    def ids(self) -> list[str]:
        """Every record's id, in order."""
        out: list[str] = []
        ends = self._ends
        for chunk, text in enumerate(self._texts):
            first = self._firsts[chunk]
            stop = self._firsts[chunk + 1] if chunk + 1 < len(self._firsts) else len(ends)
            start = 0
            for end in ends[first:stop]:
                out.append(text[start:end])
                start = end
        return out

    def _id(self, index: int) -> str:
        chunk = bisect_right(self._firsts, index) - 1
        start = 0 if index == self._firsts[chunk] else self._ends[index - 1]
        return self._texts[chunk][start : self._ends[index]]

    @overload
    def __getitem__(self, index: int) -> Record: ...

    @overload
    def __getitem__(self, index: slice) -> list[Record]: ...

    def __getitem__(self, index: int | slice) -> Record | list[Record]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("record index out of range")
        shape, dtype = self._kind_list[self._kind_of[index]]
        offset = self._offsets[index]
        return Record(
            self._id(index),
            self.path,
            self._nbytes[index],
            f"{self._crc32[index]:08x}",
            shape,
            dtype,
            None if offset < 0 else offset,
        )

    def __iter__(self) -> Iterator[Record]:
        for index in range(len(self)):
            yield self[index]

    def total_bytes(self) -> int:
        """The records' ``nbytes``, summed."""
        return sum(self._nbytes)

    def line(self, index: int, identifier: str) -> str:
        """:meth:`Record.to_json` of the record at ``index``, whose id is ``identifier`` (as :meth:`ids` gives it)."""
        offset = self._offsets[index]
        return (
            f'{{"id":{identifier if is_numeric_id(identifier) else _json_str(identifier)},"path":{self._path_json},'
            f'"nbytes":{self._nbytes[index]},"{CHECKSUM}":"{self._crc32[index]:08x}"{self._lines[self._kind_of[index]]}'
            + ("}" if offset < 0 else f',"offset":{offset}}}')
        )


class RecordStream:
    """The records of an output in id order, read as they are needed: a format's commit goes through them without
    holding them all (ten million records are gigabytes as Python objects).

    ``async for record in records`` reads them one by one, :meth:`batches` a list at a time; each pass reads them
    again from the start. :meth:`collect` holds them all, by id, for code written against a dict of records.

    Args:
        batches: a function returning a new iterator over the records, in lists (one per chunk read).
    """

    def __init__(self, batches: Callable[[], AsyncIterator[list[Record]]]) -> None:
        self._batches = batches

    @classmethod
    def of(cls, records: Iterable[Record]) -> RecordStream:
        """A stream of records already in memory, in the order given (tests, and formats that wrap others)."""
        held = list(records)

        async def batches() -> AsyncIterator[list[Record]]:
            if held:
                yield held

        return cls(batches)

    def batches(self) -> AsyncIterator[list[Record]]:
        """The records in lists, in id order."""
        return self._batches()

    async def __aiter__(self) -> AsyncIterator[Record]:
        async for batch in self._batches():
            for record in batch:
                yield record

    async def collect(self) -> dict[str, Record]:
        """Every record by id, held in memory: as large as the output's record count."""
        return {record.id: record async for record in self}


class Output(Protocol):
    """One object written piece by piece (a table at commit): it appears whole at :meth:`finish`, or never."""

    async def write(self, data: Buffer) -> None:
        """Append ``data``, which may be kept until it is sent: the caller does not change it afterwards."""

    async def finish(self) -> None:
        """Make the object visible, whole (a rename locally, the completion of an S3 multipart or GCS resumable
        upload, one PUT for an object smaller than one part)."""

    async def discard(self) -> None:
        """Drop what was written; nothing appears."""


class ObjectStore(Protocol):
    """Bytes under the sink's url, by relative ``/``-separated key: what a format may do with storage.

    Every call is bounded and retried by the sink's policy, and counted in its statistics.
    """

    async def get(self, key: str) -> bytes:
        """Read a whole object; raises ``FileNotFoundError`` when absent."""
        ...

    async def put(self, key: str, buffers: Sequence[Buffer], crc32: int | None = None) -> None:
        """Store one object; it becomes visible whole or not at all."""

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes of an object from ``start`` (fewer at its end); raises ``FileNotFoundError`` when absent."""
        ...

    async def exists(self, key: str) -> bool: ...

    async def delete(self, keys: Sequence[str]) -> None:
        """Remove objects; missing ones are ignored."""

    async def delete_prefix(self, prefix: str) -> None: ...

    async def list(self, prefix: str = "") -> list[str]:
        """Keys of every object below ``prefix`` (recursively)."""
        ...

    def iter_list(self, prefix: str = "", *, page_size: int = ..., begins: str = "") -> KeyPages:
        """:meth:`list` in pages of at most ``page_size`` keys, in no particular order; with ``begins``, only the
        names below ``prefix`` that begin so."""
        ...

    def open_output(self, key: str, *, part_size: int = ...) -> Output:
        """An object to write piece by piece, streamed where the store can (a local file, an upload in parts of
        ``part_size`` bytes to S3 or GCS), else held and put."""
        ...


ProblemKind = Literal[
    "incomplete", "invalid", "mismatch", "missing", "size", "checksum", "unreadable", "duplicate", "unlisted"
]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an output.

    Attributes:
        kind: ``incomplete`` (no ``_SUCCESS``), ``invalid`` (a marker, manifest or record that cannot be parsed
            or names an unsafe path), ``mismatch`` (``_SUCCESS`` and the manifest disagree), ``missing`` (a
            recorded object or the manifest is absent), ``size`` / ``checksum`` (an object differs from its
            record), ``unreadable`` (reading it failed), ``duplicate`` (an id, or one object, listed twice),
            ``unlisted`` (an object the output's format and key could have written that the manifest does not
            list: left by an earlier run, or written by another).
        path: the object concerned, relative to the url.
        id: the prediction's identifier, when the problem concerns one prediction.
        detail: what was expected and what was found.
    """

    kind: ProblemKind
    path: str
    id: str | None
    detail: str
