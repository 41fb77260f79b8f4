"""The run's record: per-rank manifest parts written as the run goes, the merged manifest and ``_SUCCESS``.

Layout under the url (readers need no lighter-sink)::

    _parts/rank-00000/<start>-000001.jsonl   one JSON record per line, written every few thousand predictions
    _manifest.jsonl                          every record, sorted by id, merged by rank 0 at commit
    _SUCCESS                                 JSON summary, written last, only when every rank succeeded

Object stores have no rename and no append, so progress is recorded as new part objects, and the marker is the
single object whose presence says "complete".
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, NamedTuple

from lighter_sink._ids import is_numeric_id
from lighter_sink._store import Store

__all__ = [
    "MANIFEST",
    "PARTS",
    "SUCCESS",
    "Record",
    "clear_commit",
    "merge_parts",
    "part_key",
    "write_success",
]

MANIFEST = "_manifest.jsonl"
SUCCESS = "_SUCCESS"
PARTS = "_parts"
CHECKSUM = "crc32"


class Record(NamedTuple):
    """What the manifest says of one stored prediction (a named tuple: a run creates millions)."""

    id: str
    path: str
    nbytes: int
    crc32: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> str:
        # The same text as json.dumps of the dict, several times faster: only the strings need escaping.
        shape = ",".join(map(str, self.shape))
        return (
            f'{{"id":{json.dumps(self.id)},"path":{json.dumps(self.path)},"nbytes":{self.nbytes},'
            f'"{CHECKSUM}":"{self.crc32}","shape":[{shape}],"dtype":{json.dumps(self.dtype)}}}'
        )

    @classmethod
    def from_json(cls, line: str) -> Record:
        data = json.loads(line)
        return cls(
            id=str(data["id"]),
            path=data["path"],
            nbytes=int(data["nbytes"]),
            crc32=data[CHECKSUM],
            shape=tuple(data["shape"]),
            dtype=data["dtype"],
        )


def part_key(rank: int, run_token: str, sequence: int) -> str:
    return f"{PARTS}/rank-{rank:05d}/{run_token}-{sequence:06d}.jsonl"


def encode_records(records: Iterable[Record]) -> bytes:
    return "".join(r.to_json() + "\n" for r in records).encode()


def decode_records(data: bytes) -> list[Record]:
    return [Record.from_json(line) for line in data.decode().splitlines() if line.strip()]


def id_order(identifier: str) -> tuple[int, int, str]:
    """Sort key: numeric ids (:func:`~lighter_sink._ids.is_numeric_id`) by value, then text ids by code point."""
    return (0, int(identifier), identifier) if is_numeric_id(identifier) else (1, 0, identifier)


def sorted_ids(identifiers: Iterable[str]) -> list[str]:
    """``identifiers`` in :func:`id_order`, sorted without building a key tuple per id (a million ids at commit)."""
    numeric: list[str] = []
    text: list[str] = []
    for identifier in identifiers:
        (numeric if is_numeric_id(identifier) else text).append(identifier)
    numeric.sort(key=int)
    text.sort()
    return numeric + text


async def _recorded(store: Store, parts: list[str]) -> AsyncIterator[bytes]:
    """The merged manifest's bytes (when there is one), then each of ``parts``': later records win."""
    manifest: bytes | None = None
    with contextlib.suppress(FileNotFoundError):
        manifest = await store.get(MANIFEST)
    if manifest is not None:
        yield manifest
    for key in parts:
        yield await store.get(key)


async def _part_keys(store: Store) -> list[str]:
    return [k for k in await store.list(PARTS) if k.endswith(".jsonl")]


async def read_records(store: Store) -> dict[str, Record]:
    """Every record of the merged manifest and of every part, by id; a later part wins over an earlier one."""
    records: dict[str, Record] = {}
    async for data in _recorded(store, await _part_keys(store)):
        for record in decode_records(data):
            records[record.id] = record
    return records


def _line_id_and_size(line: str) -> tuple[str, int]:
    """The id and nbytes of a record line as :meth:`Record.to_json` writes it, without decoding the rest.

    In ``{"id":<json string>,"path":...,"nbytes":N,...}`` the first ``,"path":`` ends the id (a quote inside a
    JSON string is always escaped), and the first ``"nbytes":`` after the path starts the size (a path is a JSON
    string too). Lines in any other layout are decoded whole.
    """
    end = line.find(',"path":', 6)
    start = line.find('"nbytes":', end)
    if not line.startswith('{"id":"') or end < 0 or start < 0 or line[end - 1] != '"':
        record = Record.from_json(line)
        return record.id, record.nbytes
    start += 9
    raw = line[6:end]
    identifier = raw[1:-1] if "\\" not in raw else json.loads(raw)
    return identifier, int(line[start : line.index(",", start)])


async def merge_parts(store: Store) -> tuple[int, int]:
    """Write ``_manifest.jsonl`` from every part, sorted by id, then remove the parts it absorbed.

    Works on the record lines as they are (an id and a size read from each, nothing re-encoded): a commit of a
    million records costs seconds, not minutes. Returns the number of predictions and their bytes.
    """
    parts = await _part_keys(store)
    lines: dict[str, str] = {}  # id -> line; a later part wins over an earlier one
    total = 0
    async for data in _recorded(store, parts):
        for line in data.decode().splitlines():
            if line.strip():
                identifier, nbytes = _line_id_and_size(line)
                replaced = lines.get(identifier)
                if replaced is not None:  # (rare: a rewrite, or a resumed run's record recorded again)
                    total -= _line_id_and_size(replaced)[1]
                lines[identifier] = line
                total += nbytes
    # One line per record is all the merge holds: no tuple per record, and the body is joined once ("" ends it
    # with a newline) and encoded once.
    ordered = [lines[i] for i in sorted_ids(lines)]
    count = len(ordered)
    lines.clear()
    ordered.append("")
    body = "\n".join(ordered).encode()
    del ordered
    await store.put(MANIFEST, [body])
    await store.delete(parts)
    return count, total


async def write_success(store: Store, summary: Mapping[str, Any]) -> None:
    await store.put(SUCCESS, [json.dumps(summary, indent=2, sort_keys=True).encode() + b"\n"])


async def clear_commit(store: Store, *, manifest: bool = True) -> None:
    """Remove the marker first (a stale marker must never vouch for a new run), then the manifest and parts."""
    await store.delete([SUCCESS])
    if manifest:
        await store.delete([MANIFEST])
        await store.delete_prefix(PARTS)
