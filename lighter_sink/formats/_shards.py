"""Shards: many predictions packed into few large objects (WebDataset tar, Parquet), streamed as they fill.

Layout under the url::

    shards/{run}-r{rank:05d}-{seq:06d}{ext}     each rank's shards, in the order it filled them
    _manifest.jsonl                            per prediction: id, the shard's path, offset, nbytes, crc32, ...

One request per shard part instead of one per prediction: object stores bill and throttle requests, and a Python
client spends about a millisecond of CPU on each.

Each rank fills one shard at a time. Workers encode their batches in threads, then append them to the open
shard in turn (its :class:`Packer` says where each prediction's bytes land); the shard is streamed to the store
as it fills (``ObjectStore.open_output``: a multipart or resumable upload, a temporary file locally), and once it
reaches ``shard_bytes`` it is closed while the next one fills. A prediction is recorded only when its shard was
stored whole, so a killed run never records a prediction its shard lost: resume writes the predictions of a shard
that did not complete again, and skips those of every complete one. At commit rank 0 removes the shards no record
lists (a killed run's complete shards whose records it never wrote; their predictions were written again).

A record's ``offset`` and ``nbytes`` are the prediction's bytes in the shard (a tar member's data, a Parquet value),
so that one ranged read returns them; ``crc32`` is theirs. :class:`ShardCheck` lets ``verify`` read them back.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio
import anyio.to_thread
import torch

from lighter_sink._checksum import crc32
from lighter_sink._errors import ConfigurationError
from lighter_sink._types import Buffer, ObjectStore, Output, Problem, Record, RecordColumns, RecordStream
from lighter_sink.formats._base import CheckContext, Format, FormatWriter, RecordCheck, WriterContext, record_problem

__all__ = ["DEFAULT_SHARD_BYTES", "SHARDS_DIR", "Packer", "ShardCheck", "ShardFormat", "ShardWriter"]

DEFAULT_SHARD_BYTES = 256 * 2**20
SHARDS_DIR = "shards/"
# verify reads a shard's records in spans of at most this many bytes (one ranged read each)
_SPAN_BYTES = 16 * 2**20
# ...and reads across a gap between two records (a tar header) when it is smaller than this
_SPAN_GAP = 64 * 2**10


class Packer:
    """Lays out one shard: turns encoded predictions into the shard's bytes, in order.

    Called on worker threads, one call at a time. :attr:`size` is the number of bytes returned so far (where the
    next bytes start); :attr:`members` the records of the predictions whose place is known (their ``path`` is
    the shard's key once it is stored), as columns: a shard's hundreds of thousands of predictions are then a few
    arrays, not as many objects.
    """

    def __init__(self) -> None:
        self.size = 0
        self.members = RecordColumns()

    @property
    def filled(self) -> int:
        """How full the shard is: :attr:`size`, and what the packer holds back (rows of a row group)."""
        return self.size

    def add(self, ids: Sequence[str], encoded: Any) -> list[Buffer]:
        """Append the predictions ``encoded`` by :meth:`ShardFormat.prepare`; return the bytes to store next."""
        raise NotImplementedError

    def finish(self) -> list[Buffer]:
        """The shard's last bytes (what is still held, a trailer); :attr:`members` is then complete."""
        raise NotImplementedError


class ShardFormat(Format):
    """Base of formats that pack predictions into shards (see the module docstring).

    Subclasses say how a batch is encoded (:meth:`prepare`, off the event loop, several batches at once) and how a
    shard is laid out (:meth:`open_packer`).
    """

    per_item_objects = False
    packs_shards = True
    #: the shards' file name extension (``".tar"``)
    shard_extension: ClassVar[str] = ""

    @property
    def outputs(self) -> tuple[str, ...]:
        return (SHARDS_DIR,)

    def prepare(self, ids: Sequence[str], samples: torch.Tensor | Sequence[torch.Tensor]) -> Any:
        """Encode a batch for :meth:`Packer.add` (on a worker thread, outside the shard's lock): one tensor whose
        rows are the samples, or a list of samples."""
        raise NotImplementedError

    def open_packer(self, previous: Packer | None = None) -> Packer:
        """The packer of a rank's next shard; ``previous`` packed the shard before it (what the rank's shards must
        agree on, such as a Parquet schema, comes from it)."""
        raise NotImplementedError

    def check_records(self, records: Sequence[Record]) -> None:
        """At commit, on rank 0: raise when the shards of every rank (and of the run a resume continued) cannot be
        read together, so that no ``_SUCCESS`` vouches for them. Tar shards always can.

        ``records``: one record of each shape and dtype the output holds (not every record: their number is not
        bounded).
        """

    def open_writer(self, context: WriterContext) -> FormatWriter:
        return ShardWriter(self, context)

    async def open_check(
        self, store: ObjectStore, records: Sequence[Record], context: CheckContext
    ) -> RecordCheck | None:
        ours = [r for r in records if r.offset is not None and _is_shard(r.path, self.shard_extension)]
        if not ours:
            return None
        check = ShardCheck(store, ours)
        if not context.guessed:  # (an unfinished output's records are not all known: nothing is unlisted then)
            listed = {r.path for r in ours}
            check.problems += [
                Problem("unlisted", key, None, "a shard of this output that the manifest does not list")
                for key in await store.list(SHARDS_DIR)
                if key not in listed and _is_shard(key, self.shard_extension)
            ]
        return check


def _is_shard(key: str, extension: str) -> bool:
    name = key.rsplit("/", 1)[-1]
    return key.startswith(SHARDS_DIR) and key.endswith(extension) and not name.startswith((".", "_"))


@dataclass(eq=False)
class _Shard:
    key: str
    output: Output
    packer: Packer


class ShardWriter(FormatWriter):
    """One rank's shards: one open at a time, filled by every worker in turn, closed at ``shard_bytes``."""

    def __init__(self, fmt: ShardFormat, context: WriterContext) -> None:
        self._format = fmt
        self._store = context.store
        self._prefix = f"{SHARDS_DIR}{context.run}-r{context.rank:05d}-"
        self._shard_bytes = context.shard_bytes or DEFAULT_SHARD_BYTES
        if self._shard_bytes < 1:
            raise ConfigurationError(f"shard_bytes must be a positive int, got {self._shard_bytes!r}")
        self._open: _Shard | None = None
        self._packer: Packer | None = None  # the last shard's: the next one's comes from it
        self._seq = 0
        self._lock = anyio.Lock()
        self._closing: set[_Shard] = set()  # full shards being finished while the next one fills

    async def write(self, ids: Sequence[str], samples: Sequence[torch.Tensor]) -> Sequence[Record]:
        return await self.write_batch(ids, samples)

    async def write_batch(self, ids: Sequence[str], samples: torch.Tensor | Sequence[torch.Tensor]) -> Sequence[Record]:
        encoded = await anyio.to_thread.run_sync(self._format.prepare, ids, samples)
        full = None
        async with self._lock:
            shard = self._open
            if shard is None:
                key = f"{self._prefix}{self._seq:06d}{self._format.shard_extension}"
                self._seq += 1
                self._packer = self._format.open_packer(self._packer)
                shard = self._open = _Shard(key, self._store.open_output(key), self._packer)
            try:
                for piece in await anyio.to_thread.run_sync(shard.packer.add, ids, encoded):
                    await shard.output.write(piece)
            except BaseException:
                self._open = None  # a shard that lost bytes is never completed (its predictions were not recorded)
                with anyio.CancelScope(shield=True):
                    await shard.output.discard()
                raise
            if shard.packer.filled >= self._shard_bytes:
                full, self._open = shard, None
        return [] if full is None else await self._finish(full)

    async def _finish(self, shard: _Shard) -> Sequence[Record]:
        """Store the shard's last bytes and make it visible whole; then, only then, its predictions are records."""
        self._closing.add(shard)
        try:
            for piece in await anyio.to_thread.run_sync(shard.packer.finish):
                await shard.output.write(piece)
            await shard.output.finish()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await shard.output.discard()
            raise
        finally:
            self._closing.discard(shard)
        records = shard.packer.members.at(shard.key)
        shard.packer.members = RecordColumns()  # (the packer stays, as the next one's previous: not its records)
        return records

    async def flush(self) -> Sequence[Record]:
        async with self._lock:
            shard, self._open = self._open, None
        return [] if shard is None else await self._finish(shard)

    async def commit(self, records: RecordStream) -> None:
        """Remove the shards no record lists: a killed run's, stored whole but never recorded (their predictions
        were written again), so that the output holds exactly what its manifest lists. Reads the records as they
        come; holds the shards' keys and one record of each shape and dtype."""
        unlisted = set(await self._store.list(SHARDS_DIR))
        kinds: dict[tuple[tuple[int, ...], str], Record] = {}
        async for batch in records.batches():
            for record in batch:
                unlisted.discard(record.path)
                kinds.setdefault((tuple(record.shape), record.dtype), record)
        self._format.check_records(list(kinds.values()))
        await self._store.delete(sorted(unlisted))

    async def aclose(self) -> None:
        shards = [*self._closing, *([self._open] if self._open is not None else [])]
        self._open = None
        for shard in shards:
            with contextlib.suppress(Exception):
                await shard.output.discard()


class ShardCheck(RecordCheck):
    """``verify``'s reading of shards: each shard's records in a few ranged reads, each record's bytes compared."""

    def __init__(self, store: ObjectStore, records: Sequence[Record]) -> None:
        super().__init__()
        self._store = store
        self._covered = {(r.id, r.path) for r in records}
        by_shard: defaultdict[str, list[Record]] = defaultdict(list)
        for record in records:
            by_shard[record.path].append(record)
        self._shards = dict(by_shard)
        # one reading per shard, shared by the checks of its records
        self._results: dict[str, anyio.Event] = {}
        self._found: dict[tuple[str, int], tuple[Problem | None, int]] = {}

    def covers(self, record: Record) -> bool:
        return (record.id, record.path) in self._covered

    async def check(self, record: Record) -> tuple[Problem | None, int]:
        done = self._results.get(record.path)
        if done is None:
            done = self._results[record.path] = anyio.Event()
            try:
                await self._read_shard(record.path)
            finally:
                done.set()
        else:
            await done.wait()
        return self._found.get((record.id, record.offset or 0), (None, 0))

    async def _read_shard(self, path: str) -> None:
        records = sorted(self._shards[path], key=lambda r: r.offset or 0)
        start = 0
        while start < len(records):
            # a span: consecutive records read at once, up to _SPAN_BYTES
            first = records[start].offset or 0
            end = start + 1
            last = first + records[start].nbytes
            while end < len(records):
                offset = records[end].offset or 0
                stop = offset + records[end].nbytes
                if offset - last > _SPAN_GAP or stop - first > _SPAN_BYTES:
                    break
                last = max(last, stop)
                end += 1
            try:
                data = await self._store.get_range(path, first, last - first)
            except FileNotFoundError:
                for r in records[start:]:
                    self._found[(r.id, r.offset or 0)] = (Problem("missing", path, r.id, "its shard is absent"), 0)
                return
            except OSError as exc:
                for r in records[start:end]:
                    problem = Problem("unreadable", path, r.id, f"{type(exc).__name__}: {exc}")
                    self._found[(r.id, r.offset or 0)] = (problem, 0)
                start = end
                continue
            for r in records[start:end]:
                offset = (r.offset or 0) - first
                piece = data[offset : offset + r.nbytes]
                self._found[(r.id, r.offset or 0)] = (record_problem(r, len(piece), crc32(piece, 0)), len(piece))
            start = end
