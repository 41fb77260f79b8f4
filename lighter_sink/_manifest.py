"""The run's record: manifest parts written as the run goes, the merged manifest and ``_SUCCESS``.

Where each lives is :class:`~lighter_sink._commit.ControlKeys`' business (per output, parts per generation and
run); this module reads and writes them through a store it is handed. Object stores have no rename and no append,
so progress is recorded as new part objects, and the marker is the single object whose presence says "complete".
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

from lighter_sink._ids import is_numeric_id
from lighter_sink._idset import IdSet
from lighter_sink._layout import ControlKeys
from lighter_sink._store import Store
from lighter_sink._types import Record, decode_records, id_positions

__all__ = [
    "MANIFEST",
    "SUCCESS",
    "Record",
    "id_order",
    "line_id_and_size",
    "object_lines",
    "part_keys",
    "path_keys",
    "read_records",
    "recorded_ids",
    "recorded_sets",
    "sorted_ids",
    "write_success",
]

MANIFEST = "_manifest.jsonl"
SUCCESS = "_SUCCESS"
#: Bytes of a manifest (or a part) read at a time: a ten-million-record manifest is never held whole.
READ_BYTES = 8 * 2**20


def id_order(identifier: str) -> tuple[int, int, str]:
    """Sort key: numeric ids (:func:`~lighter_sink._ids.is_numeric_id`) by value, then text ids by code point."""
    return (0, int(identifier), identifier) if is_numeric_id(identifier) else (1, 0, identifier)


def sorted_ids(identifiers: Iterable[str]) -> list[str]:
    """``identifiers`` in :func:`id_order` (:func:`~lighter_sink._types.id_positions`)."""
    ids = list(identifiers)
    return [ids[index] for index in id_positions(ids)]


async def object_lines(store: Store, key: str, *, chunk_bytes: int = READ_BYTES) -> AsyncGenerator[list[str], None]:
    """The text lines of the object ``key`` (without their line ends, blank ones skipped), a chunk's worth at a
    time, read by ranged reads of ``chunk_bytes``; raises ``FileNotFoundError`` when absent."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be at least 1, got {chunk_bytes}")
    offset = 0
    tail = b""
    while True:
        data = await store.get_range(key, offset, chunk_bytes)
        offset += len(data)
        if len(data) < chunk_bytes:  # the end (a short read)
            text = (tail + data).decode()
            lines = [line for line in text.splitlines() if line.strip()]
            if lines:
                yield lines
            return
        head, newline, rest = data.rpartition(b"\n")
        if not newline:  # (one line longer than a chunk: keep reading)
            tail += data
            continue
        text = (tail + head).decode()
        tail = rest
        lines = [line for line in text.splitlines() if line.strip()]
        if lines:
            yield lines


async def _recorded(store: Store, keys: ControlKeys, parts: list[str]) -> AsyncIterator[tuple[str, bytes]]:
    """``(key, bytes)`` of the merged manifest (when there is one), then of each of ``parts``."""
    manifest: bytes | None = None
    with contextlib.suppress(FileNotFoundError):
        manifest = await store.get(keys.manifest)
    if manifest is not None:
        yield keys.manifest, manifest
    for key in parts:
        yield key, await store.get(key)


async def part_keys(store: Store, keys: ControlKeys, generation: str | None) -> list[str]:
    """The manifest parts of ``generation`` (of every generation when ``None``)."""
    prefix = keys.generation_parts(generation) if generation is not None else keys.parts
    return [k for k in await store.list(prefix) if k.endswith(".jsonl")]


async def read_records(store: Store, keys: ControlKeys, generation: str | None) -> dict[str, Record]:
    """Every record of the merged manifest and of ``generation``'s parts (every generation's when ``None``), by id."""
    records: dict[str, Record] = {}
    async for _, data in _recorded(store, keys, await part_keys(store, keys, generation)):
        for record in decode_records(data):
            records[record.id] = record
    return records


async def recorded_ids(
    store: Store, keys: ControlKeys, generation: str | None, *, chunk_bytes: int = READ_BYTES
) -> AsyncIterator[tuple[list[str], list[str]]]:
    """The ids and paths of the records :func:`read_records` reads, a chunk of lines at a time (ranged reads of
    ``chunk_bytes``): a manifest of ten million records is never held whole, nor a record object made of a line.

    An id recorded twice (in the manifest and a part) comes twice, with each path its records have.
    """
    for key in [keys.manifest, *await part_keys(store, keys, generation)]:
        lines = object_lines(store, key, chunk_bytes=chunk_bytes)
        try:
            first = await anext(lines)
        except StopAsyncIteration:
            continue
        except FileNotFoundError:
            if key == keys.manifest:
                continue  # (none merged yet)
            raise
        yield _ids_and_paths(first)
        async for chunk in lines:
            yield _ids_and_paths(chunk)


async def recorded_sets(
    store: Store, keys: ControlKeys, generation: str | None, *, suffix: str = "", ids: bool = False
) -> tuple[IdSet, IdSet]:
    """The paths recorded (as :func:`path_keys` with ``suffix`` gives them) and, with ``ids``, the ids, read a
    chunk at a time (:func:`recorded_ids`) into compact sets: ten million counter ids cost bytes, not a gigabyte."""
    recorded_paths = IdSet()
    recorded = IdSet()
    async for chunk_ids, paths in recorded_ids(store, keys, generation):
        recorded_paths.add(path_keys(paths, suffix))
        if ids:
            recorded.add(chunk_ids)
    return recorded_paths, recorded


def path_keys(paths: Sequence[str], suffix: str) -> Sequence[str]:
    """``paths`` as a set of recorded paths keeps them: each less ``suffix`` (a format's extension: then an object
    whose key is a number's costs a few bits), one without it marked (it is no key's object, and two paths never
    become one). A key is stored exactly when ``path_keys([key + suffix])`` is in such a set, that is ``key``."""
    if not suffix:
        return paths
    cut = len(suffix)
    return [path[:-cut] if path.endswith(suffix) else "\0" + path for path in paths]


def _ids_and_paths(lines: list[str]) -> tuple[list[str], list[str]]:
    ids: list[str] = []
    paths: list[str] = []
    for line in lines:
        identifier, path = _line_id_and_path(line)
        ids.append(identifier)
        paths.append(path)
    return ids, paths


def _leading_id(line: str) -> tuple[str, int] | None:
    """The id of a record line as :meth:`Record.to_json` writes it, without decoding the rest, and where its
    ``,"path":"`` begins; None for a line in any other layout (decode it whole).

    In ``{"id":<json number or string>,"path":"...",...}`` the first ``,"path":"`` ends the id: a quote inside a
    JSON string is always escaped.
    """
    end = line.find(',"path":"', 6)
    if end < 0 or not line.startswith('{"id":'):
        return None
    if line[6] == '"':  # a string
        if end < 8 or line[end - 1] != '"':
            return None
        identifier = line[7 : end - 1]
        return (json.loads(line[6:end]) if "\\" in identifier else identifier), end
    identifier = line[6:end]
    return (identifier, end) if is_numeric_id(identifier) else None


def _line_id_and_path(line: str) -> tuple[str, str]:
    """The id and path of a record line, without decoding the rest (:func:`_leading_id`; the path, a JSON string,
    ends at the first quote when it holds no backslash)."""
    leading = _leading_id(line)
    if leading is None:
        return _decoded_id_and_path(line)
    identifier, end = leading
    start = end + 9
    stop = line.find('"', start)
    path = line[start:stop]
    if stop < 0 or "\\" in path:
        return _decoded_id_and_path(line)
    return identifier, path


def _decoded_id_and_path(line: str) -> tuple[str, str]:
    record = Record.from_json(line)
    return record.id, record.path


def line_id_and_size(line: str) -> tuple[str, int, str]:
    """The id and nbytes of a record line as :meth:`Record.to_json` writes it, without decoding the rest, and the
    line as the manifest keeps it: a number's id as a JSON number (older versions wrote every id as a string).

    The id as :func:`_leading_id` reads it; the first ``"nbytes":`` after the path starts the size (a path is a
    JSON string too). Lines in any other layout are decoded whole.
    """
    leading = _leading_id(line)
    start = -1 if leading is None else line.find('"nbytes":', leading[1])
    if leading is None or start < 0:
        return _decoded_id_and_size(line)
    identifier, end = leading
    start += 9
    try:
        nbytes = int(line[start : line.index(",", start)])
    except ValueError:  # (the size last, say)
        return _decoded_id_and_size(line)
    if line[6] == '"' and "0" <= identifier[:1] <= "9" and is_numeric_id(identifier):
        line = '{"id":' + identifier + line[end:]  # written before ids kept their type
    return identifier, nbytes, line


def _decoded_id_and_size(line: str) -> tuple[str, int, str]:
    """:func:`line_id_and_size` of a line in another layout: decoded whole, its id given its type if need be."""
    record = Record.from_json(line)
    data = json.loads(line)
    if data["id"] != record.id or not is_numeric_id(record.id):
        return record.id, record.nbytes, line
    data["id"] = int(record.id)  # a number's id written as a string: that field changed, the others kept
    return record.id, record.nbytes, json.dumps(data, ensure_ascii=False, separators=(",", ":"))


async def write_success(store: Store, keys: ControlKeys, summary: Mapping[str, Any]) -> None:
    await store.put(keys.success, [json.dumps(summary, indent=2, sort_keys=True).encode() + b"\n"])
