"""The ground floor: the types every room shares. It imports nothing of the package.

* :data:`Buffer`: bytes as the formats make them and the stores send them (never joined without need).
* :class:`Record`: what the manifest says of one stored prediction; :class:`RecordStream`: the records of an output
  in id order, as a format's commit reads them (a chunk at a time: never all at once).
* :class:`ObjectStore` and :class:`Output`: the narrow interface a format that streams or updates in place (tables,
  zarr) gets to the sink's store. It has no url and no credentials: the sink opened the store, with its retries,
  timeouts and statistics, and every byte a format stores goes through it.
* :class:`Problem`: one thing ``verify`` found wrong with an output; formats that check their own rows (tables,
  zarr) report them too.
"""

from __future__ import annotations

import json
import json.encoder
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

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
    "RecordStream",
    "decode_records",
    "encode_records",
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
