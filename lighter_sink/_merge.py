"""The commit's merge of the manifest: sorted streams of record lines in, one sorted manifest out, streamed.

Each rank writes its manifest parts sorted by id (:func:`~lighter_sink._manifest.id_order`); the committed
manifest is sorted too. Rank 0 merges them (a k-way merge over a heap) reading each a chunk at a time, and
streams the result to the manifest through the store's streamed output (a temporary file renamed into place
locally, a multipart or resumable upload on object stores): what it holds does not grow with the number of
predictions. More sources than one pass reads at once (``fan_in``) are first merged into intermediate runs under
the output's scratch prefix, removed once the manifest is written.

A source found out of order (a part written by an earlier version, a resumed run's record of its orphans, a
manifest written by another tool) is first sorted in runs of :data:`SORT_LINES` lines (an external sort), and the
merge starts again with those runs in its place.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import anyio

from lighter_sink._errors import CommitError
from lighter_sink._layout import ControlKeys
from lighter_sink._manifest import id_order, line_id_and_size, object_lines, part_keys
from lighter_sink._store import Store
from lighter_sink._types import Output, Record, RecordStream

__all__ = ["LOCAL_FAN_IN", "REMOTE_FAN_IN", "Merged", "manifest_records", "merge_parts", "write_manifest"]

logger = logging.getLogger(__name__)

#: Sources merged in one pass on a local (or mounted) directory, and on an object store (a connection each).
LOCAL_FAN_IN = 1024
REMOTE_FAN_IN = 64
#: Bytes read ahead over all the sources of one pass (each source reads at least :data:`MIN_CHUNK` at a time).
READ_AHEAD = 8 * 2**20
MIN_CHUNK = 8 * 2**10
#: Lines sorted in memory at a time when a source is out of order.
SORT_LINES = 200_000
#: Bytes of the manifest decoded into records at a time for a format's commit (some 7,000 records).
RECORD_BYTES = 2**20
#: Bytes of merged lines gathered before they are handed to the output.
_WRITE_BYTES = 2**20

# (order, id, nbytes, line) of one record line
_Entry = tuple[tuple[int, int, str], str, int, str]


@dataclass(frozen=True, slots=True)
class Merged:
    """What :func:`write_manifest` wrote: the records, their bytes, and the parts it merged (still stored)."""

    count: int
    nbytes: int
    parts: list[str]


class _Unsorted(Exception):
    """A source's lines are not in id order."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


@dataclass(frozen=True, slots=True)
class _Source:
    key: str
    committed: bool  # the committed manifest, or runs made of it alone


class _Reader:
    """One source's entries, a chunk of ``chunk_bytes`` at a time (its lines, each parsed as it is reached): all
    the merge holds of it."""

    __slots__ = ("_chunks", "_last", "_lines", "_next", "source")

    def __init__(self, store: Store, source: _Source, chunk_bytes: int) -> None:
        self.source = source
        self._chunks = object_lines(store, source.key, chunk_bytes=chunk_bytes)
        self._lines: list[str] = []
        self._next = 0
        self._last: tuple[int, int, str] | None = None

    async def next(self) -> _Entry | None:
        if self._next >= len(self._lines):
            self._lines = []
            self._next = 0
            async for lines in self._chunks:
                if lines:
                    self._lines = lines
                    break
            else:
                return None
        identifier, nbytes, line = line_id_and_size(self._lines[self._next])
        self._next += 1
        order = id_order(identifier)
        if self._last is not None and order < self._last:
            raise _Unsorted(self.source.key)
        self._last = order
        return order, identifier, nbytes, line

    async def aclose(self) -> None:
        await self._chunks.aclose()


class _Writer:
    """Merged lines to an output, gathered into pieces; counts the records and their bytes."""

    def __init__(self, output: Output) -> None:
        self.output = output
        self.count = 0
        self.nbytes = 0
        self._lines: list[str] = []
        self._size = 0

    async def add(self, entry: _Entry) -> None:
        line = entry[3]
        self._lines.append(line)
        self._size += len(line) + 1
        self.count += 1
        self.nbytes += entry[2]
        if self._size >= _WRITE_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if self._lines:
            self._lines.append("")
            piece = "\n".join(self._lines).encode()
            self._lines, self._size = [], 0
            await self.output.write(piece)


async def _merge(store: Store, sources: Sequence[_Source], output: Output, read_ahead: int) -> tuple[int, int]:
    """Merge ``sources`` into ``output`` (which the caller finishes or discards); raises :class:`CommitError` for
    an id recorded twice, :class:`_Unsorted` for a source out of order."""
    chunk = max(MIN_CHUNK, read_ahead // max(1, len(sources)))
    readers = [_Reader(store, source, chunk) for source in sources]
    writer = _Writer(output)
    try:
        heap: list[tuple[tuple[int, int, str], int, _Entry]] = []
        for index, reader in enumerate(readers):
            entry = await reader.next()
            if entry is not None:
                heap.append((entry[0], index, entry))
        heapq.heapify(heap)
        previous: _Entry | None = None
        previous_committed = False
        while heap:
            _, index, entry = heap[0]
            reader = readers[index]
            committed = reader.source.committed
            if previous is not None and previous[1] == entry[1]:
                # a commit interrupted after it wrote the manifest left its parts: the same line, once
                if not ((committed or previous_committed) and previous[3] == entry[3]):
                    raise CommitError(
                        f"the id {entry[1]!r} was recorded twice in {store.url} (again in {reader.source.key}): ids "
                        "must be unique across ranks; a padding DistributedSampler repeats samples: use Lightning's "
                        "own sampler, or drop the repeated ids; nothing was committed"
                    )
                previous_committed = previous_committed or committed
            else:
                await writer.add(entry)
                previous, previous_committed = entry, committed
            following = await reader.next()
            if following is None:
                heapq.heappop(heap)
            else:
                heapq.heapreplace(heap, (following[0], index, following))
        await writer.flush()
    finally:
        with anyio.CancelScope(shield=True):
            for reader in readers:
                with contextlib.suppress(Exception):
                    await reader.aclose()
    return writer.count, writer.nbytes


async def _write(store: Store, key: str, sources: Sequence[_Source], read_ahead: int) -> tuple[int, int]:
    """:func:`_merge` into the object ``key``, which appears whole or not at all."""
    output = store.open_output(key)
    try:
        result = await _merge(store, sources, output, read_ahead)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await output.discard()
        raise
    await output.finish()
    return result


class _Runs:
    """Names of intermediate runs under one prefix, removed together."""

    def __init__(self, store: Store, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        self._made = 0

    def new(self, kind: str) -> str:
        self._made += 1
        return f"{self.prefix}/{kind}-{self._made:08d}.jsonl"

    async def sort(self, source: _Source) -> list[_Source]:
        """``source`` as sorted runs of at most :data:`SORT_LINES` lines (lines held: that many at a time)."""
        runs: list[_Source] = []
        entries: list[_Entry] = []

        async def spill() -> None:
            entries.sort(key=lambda e: e[0])
            output = self.store.open_output(key := self.new("sorted"))
            try:
                writer = _Writer(output)
                for entry in entries:
                    await writer.add(entry)
                await writer.flush()
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await output.discard()
                raise
            await output.finish()
            runs.append(_Source(key, source.committed))
            entries.clear()

        async for lines in object_lines(self.store, source.key):
            for text in lines:
                identifier, nbytes, line = line_id_and_size(text)
                entries.append((id_order(identifier), identifier, nbytes, line))
            if len(entries) >= SORT_LINES:
                await spill()
        if entries:
            await spill()
        return runs


async def _reduced(runs: _Runs, sources: list[_Source], limit: int, fan_in: int, read_ahead: int) -> list[_Source]:
    """``sources`` merged in groups of ``fan_in`` into runs, pass after pass, until at most ``limit`` are left."""
    while len(sources) > max(1, limit):
        merged = []
        for start in range(0, len(sources), fan_in):
            group = sources[start : start + fan_in]
            if len(group) == 1:
                merged.append(group[0])
                continue
            key = runs.new("run")
            await _write(runs.store, key, group, read_ahead)
            merged.append(_Source(key, all(s.committed for s in group)))
        sources = merged
    return sources


async def write_manifest(
    store: Store,
    keys: ControlKeys,
    generation: str,
    *,
    fan_in: int | None = None,
    read_ahead: int = READ_AHEAD,
) -> Merged:
    """Write the manifest from the one there is and ``generation``'s parts, sorted by id, streamed; keep the parts.

    Works on the record lines as they are (an id and a size read from each, nothing re-encoded but the id of an
    older line that wrote a number's id as a string). Holds a chunk of each source merged at once (``read_ahead``
    bytes in all) whatever the number of predictions; ``fan_in`` (default :data:`LOCAL_FAN_IN` locally,
    :data:`REMOTE_FAN_IN` on object stores) bounds the sources of one pass. A failure leaves the manifest as it
    was (the streamed output appears whole or not at all) and every part in place.

    Raises:
        CommitError: an id is recorded twice (put on two ranks, by a padding sampler say): which of the two
            predictions is right cannot be known, and listing one would hide the other. (A line of the manifest
            that a part repeats as it is was recorded once: a commit interrupted after it wrote the manifest.)
    """
    fan_in = fan_in if fan_in is not None else LOCAL_FAN_IN if store.is_local else REMOTE_FAN_IN
    if fan_in < 2:
        raise ValueError(f"fan_in must be at least 2, got {fan_in}")
    parts = await part_keys(store, keys, generation)
    runs = _Runs(store, f"{keys.scratch}/_manifest-merge")
    await store.delete_prefix(runs.prefix)  # (runs of a commit that died: only the output's owner commits)
    committed = [_Source(keys.manifest, True)] if await store.exists(keys.manifest) else []
    uncommitted = [_Source(key, False) for key in parts]
    try:
        while True:
            try:
                # the committed manifest joins the last pass only: a part that repeats its line is told apart
                reduced = await _reduced(
                    runs, uncommitted, fan_in - min(len(committed), fan_in // 2), fan_in, read_ahead
                )
                kept = await _reduced(runs, committed, fan_in - len(reduced), fan_in, read_ahead)
                count, nbytes = await _write(store, keys.manifest, [*kept, *reduced], read_ahead)
                return Merged(count, nbytes, parts)
            except _Unsorted as unsorted:
                # sort it (and the other parts of the run that wrote it: one writer, one version), and start again
                key = unsorted.key
                if key.startswith(runs.prefix + "/"):  # (a run this merge wrote: sorted by construction)
                    raise AssertionError(f"a run of the manifest's merge is out of order: {key}") from unsorted
                folder = key.rpartition("/")[0] + "/"
                doomed = {s.key for s in [*committed, *uncommitted] if s.key == key or s.key.startswith(folder)}
                logger.info("%s: %d manifest sources out of id order are sorted first", store.url, len(doomed))
                committed = await _resorted(runs, committed, doomed)
                uncommitted = await _resorted(runs, uncommitted, doomed)
    finally:
        with anyio.CancelScope(shield=True):
            try:
                await store.delete_prefix(runs.prefix)
            except Exception as exc:  # (removed by the next commit, or an overwrite)
                logger.warning("could not remove the manifest merge's runs under %s: %r", runs.prefix, exc)


async def _resorted(runs: _Runs, sources: list[_Source], doomed: set[str]) -> list[_Source]:
    out: list[_Source] = []
    for source in sources:
        out.extend(await runs.sort(source) if source.key in doomed else [source])
    return out


async def merge_parts(store: Store, keys: ControlKeys, generation: str, **options: int) -> tuple[int, int]:
    """:func:`write_manifest`, then remove the parts; returns the number of predictions and their bytes."""
    merged = await write_manifest(store, keys, generation, **options)
    await store.delete(merged.parts)
    return merged.count, merged.nbytes


def manifest_records(store: Store, keys: ControlKeys) -> RecordStream:
    """The records of the manifest, in its order (id order once merged), read a chunk at a time."""

    async def batches() -> AsyncIterator[list[Record]]:
        async for lines in object_lines(store, keys.manifest, chunk_bytes=RECORD_BYTES):
            yield [Record.from_json(line) for line in lines]

    return RecordStream(batches)
