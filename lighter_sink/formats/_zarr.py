"""Zarr v3 arrays: every prediction becomes one row of a single array, readable with ``zarr.open_array(url)``.

Layout: ``{url}`` is a Zarr v3 array of shape ``(N, *item_shape)``; row ``i`` holds identifier ``i``. ``N`` is the
number of samples of the run (the predict dataset's length, or ``Sink(num_samples=)``); the item shape and dtype
are those of the first prediction. Ids must be integers in ``[0, N)``. ``_manifest.jsonl``, ``_parts/`` and
``_SUCCESS`` sit beside ``zarr.json``; zarr ignores them. Consolidated metadata is not written: it goes stale
as soon as a later run changes the array.

Chunking: one chunk per row, ``chunks=(1, *item_shape)``. Ranks' counter ids interleave (rank ``r`` of ``W`` writes
rows ``r, r + W, ...``) and several workers of one rank write at once, so any chunk spanning two rows would be
read, modified and written back by two writers concurrently, and one of the updates would be lost. With one row
per chunk every write replaces a whole chunk that no one else touches, and needs no lock. ``write_empty_chunks``
is on: a row that happens to equal the fill value is stored too, so a resumed run can never mistake it for a row
that was never written.

Sharding (many rows in one stored object) is not the default for the same reason: the inner chunks of a shard
are written by reading, patching and rewriting the shard, so concurrent writers of one shard lose rows. It is
safe only when a single writer owns each whole shard, e.g. one rank that buffers ``rows_per_shard`` consecutive
rows and writes them in one call, with ids assigned in contiguous blocks per rank instead of interleaved.

Creation: every rank may need the array before rank 0 has seen a prediction, so each rank writes ``zarr.json``
when its first prediction arrives. The metadata depends only on ``N``, the first prediction's shape and dtype
and the format's options, so every rank writes the same bytes and the writes are idempotent (one atomic PUT or
rename each). With ``mode="resume"`` an existing compatible array is kept as it is, and an incompatible one is an
error. With ``mode="overwrite"`` a stale ``zarr.json`` is simply replaced; stale rows are removed at commit: rank
0, after every rank flushed, deletes every chunk under ``c/`` that no manifest record vouches for. Deleting them
before the run would race with the other ranks' first writes, since the writer hook has no barrier of its own.

Storage: zarr writes through the sink's own store (:class:`~lighter_sink.formats._zarr_store.ZarrObjectStore`),
so every chunk is one put with the sink's retries, per-attempt timeout and statistics, on either backend.

Records: the manifest's ``path`` of a row is its chunk key relative to the url (``c/17/0/0``); ``nbytes`` and
``crc32`` are those of the row's raw values as little-endian, C-ordered bytes, not of the stored (compressed)
chunk, so that ``lighter-sink verify`` checks what a reader gets back (:meth:`ZarrFormat.open_check`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import numpy as np
import torch

from lighter_sink._checksum import crc32
from lighter_sink._errors import (
    CommitError,
    ConfigurationError,
    IdentifierError,
    MissingDependencyError,
    PredictionError,
)
from lighter_sink._ids import is_numeric_id
from lighter_sink._types import ObjectStore, Problem, Record, RecordStream
from lighter_sink.formats._base import (
    NON_NUMPY_DTYPES,
    CheckContext,
    Format,
    FormatWriter,
    RecordCheck,
    WriterContext,
    record_problem,
    require_numpy_dtype,
)

if TYPE_CHECKING:
    from zarr.core.array import AsyncArray

    from lighter_sink.formats._zarr_store import ZarrObjectStore

__all__ = ["ZarrFormat", "require_zarr", "row_checksum"]

METADATA = "zarr.json"
CHUNKS = "c"
# Rows per zarr write call: bounds the block of rows stacked in memory at once (each row's chunk is one put of the
# sink's store, retried and timed out on its own).
_ROWS_PER_WRITE = 64
# What a put raises where a chunk of a stale array of another dimensionality blocks the way (see _clear_blockers)
_BLOCKED = (FileExistsError, NotADirectoryError, IsADirectoryError)


def require_zarr() -> None:
    """Raise :class:`MissingDependencyError` (an :class:`ImportError`) naming the extra to install when zarr is
    missing."""
    try:
        import zarr  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            "format 'zarr' needs the zarr package (3.x): pip install 'lighter-sink[zarr]'", name="zarr"
        ) from exc


def row_checksum(row: np.ndarray[Any, Any]) -> tuple[int, int]:
    """``(nbytes, crc32)`` of one row's values as little-endian, C-ordered bytes (what the manifest records)."""
    data = np.ascontiguousarray(row, dtype=row.dtype.newbyteorder("<"))
    return data.nbytes, crc32(data.reshape(-1).view(np.uint8).data if data.size else b"", 0)


def _zarr_store(store: ObjectStore, *, read_only: bool = False) -> ZarrObjectStore:
    """zarr's view of the sink's store (the adapter imports zarr: only once :func:`require_zarr` passed)."""
    from lighter_sink.formats._zarr_store import ZarrObjectStore

    return ZarrObjectStore(store, read_only=read_only)


def _parse_row(identifier: str, num_samples: int) -> int:
    if not is_numeric_id(identifier) or int(identifier) >= num_samples:
        raise IdentifierError(
            f"format 'zarr' stores identifier i in row i of an array of {num_samples} rows; got id {identifier!r}, "
            f"expected an integer in [0, {num_samples}) (use the default counter ids, or an npy/pt format for "
            "other ids)"
        )
    return int(identifier)


def _progressions(rows: Sequence[int]) -> list[tuple[int, int, list[int]]]:
    """Split rows (in batch order) into runs ``start, start + step, ...``: each run is one zarr slice write.

    Returns ``(start, step, positions)`` per run, ``positions`` indexing ``rows``.
    """
    runs: list[tuple[int, int, list[int]]] = []
    position = 0
    while position < len(rows):
        start = rows[position]
        step = rows[position + 1] - start if position + 1 < len(rows) else 1
        if step <= 0:
            runs.append((start, 1, [position]))
            position += 1
            continue
        end = position + 1
        while end < len(rows) and end - position < _ROWS_PER_WRITE and rows[end] - rows[end - 1] == step:
            end += 1
        runs.append((start, step, list(range(position, end))))
        position = end
    return runs


class ZarrFormat(Format):
    """All predictions in one Zarr v3 array at the url; row ``i`` holds identifier ``i`` (see the module docstring).

    Args:
        compressors: zarr's ``compressors`` argument of ``create_array``: ``"auto"`` (zstd), ``None`` for raw
            chunks, or codecs.

    Raises:
        MissingDependencyError: when a sink is built, if zarr is not installed (``pip install 'lighter-sink[zarr]'``).
    """

    name = "zarr"
    extension = ""
    per_item_objects = False
    needs_num_samples = True

    def __init__(self, *, compressors: Any = "auto") -> None:
        self.compressors = compressors

    def require(self) -> None:
        require_zarr()

    def check(self, value: torch.Tensor) -> None:
        super().check(value)
        require_numpy_dtype(
            value,
            "format 'zarr' cannot store dtype {dtype}: numpy and zarr have no such type; "
            "cast the prediction (for example .float())",
        )

    @property
    def outputs(self) -> tuple[str, ...]:
        return (METADATA, f"{CHUNKS}/")

    def open_writer(self, context: WriterContext) -> FormatWriter:
        require_zarr()
        if context.num_samples is None:
            raise ConfigurationError("format 'zarr' needs the number of samples (num_samples=)")
        return _ZarrWriter(self, context, context.num_samples)

    async def open_check(
        self, store: ObjectStore, records: Sequence[Record], context: CheckContext
    ) -> RecordCheck | None:
        """Rows (records under ``c/``) are read back through zarr and their raw values checksummed.

        Guessed (no marker names the format), the output is an array when ``zarr.json`` is stored.
        """
        if not any(r.path.startswith(CHUNKS + "/") for r in records) or not await store.exists(METADATA):
            if context.guessed or not records:
                return None
            check = _ZarrCheck(None, set())  # every row is missing with its array
            check.problems.append(
                Problem("missing", METADATA, None, "rows of a zarr array are recorded; zarr.json is absent")
            )
            return check
        require_zarr()
        from zarr.api.asynchronous import open_array
        from zarr.storage import StorePath

        array = await open_array(store=StorePath(_zarr_store(store, read_only=True)), zarr_format=3, mode="r")
        # one listing instead of a request per row: a missing chunk reads back as fill values, not as an error
        return _ZarrCheck(array, set(await store.list(CHUNKS)))


class _ZarrWriter(FormatWriter):
    def __init__(self, fmt: ZarrFormat, context: WriterContext, num_samples: int) -> None:
        self._format = fmt
        self._context = context
        self._num_samples = num_samples
        self._lock = anyio.Lock()
        self._store = _zarr_store(context.store)
        self._array: AsyncArray[Any] | None = None

    # ------------------------------------------------------------------ the array

    async def _metadata_for(self, sample: torch.Tensor) -> Any:
        """The metadata this run's array has, computed without touching storage (a scratch in-memory store)."""
        from zarr.api.asynchronous import create_array
        from zarr.storage import MemoryStore

        item_shape = tuple(sample.shape)
        scratch = await create_array(
            MemoryStore(),
            shape=(self._num_samples, *item_shape),
            chunks=(1, *(max(1, d) for d in item_shape)),
            dtype=sample.numpy().dtype,
            compressors=self._format.compressors,
        )
        return scratch.metadata

    async def _open(self, sample: torch.Tensor) -> AsyncArray[Any]:
        async with self._lock:
            if self._array is None:
                self._array = await self._create(sample)
            return self._array

    async def _create(self, sample: torch.Tensor) -> AsyncArray[Any]:
        from zarr.core.array import AsyncArray
        from zarr.core.buffer import default_buffer_prototype
        from zarr.storage import StorePath

        path = StorePath(self._store)
        metadata = await self._metadata_for(sample)
        existing = await _existing_array(path) if self._context.mode == "resume" else None
        if existing is not None:
            _check_compatible(existing.metadata, metadata)
            metadata = existing.metadata  # keep the stored codecs: rows already written use them
        else:
            # Same inputs on every rank, same bytes: ranks writing it concurrently agree (see the module docstring).
            for key, buffer in metadata.to_buffer_dict(default_buffer_prototype()).items():
                await (path / key).set(buffer)
        return AsyncArray(metadata=metadata, store_path=path, config={"write_empty_chunks": True})

    # ------------------------------------------------------------------ FormatWriter

    async def write(self, ids: Sequence[str], samples: Sequence[torch.Tensor]) -> list[Record]:
        rows = [_parse_row(i, self._num_samples) for i in ids]
        if not rows:
            return []
        array = await self._open(samples[0])
        item_shape = tuple(array.metadata.shape[1:])
        dtype = _numpy_dtype(array)
        for identifier, sample in zip(ids, samples, strict=True):
            _check_sample(identifier, sample, item_shape, dtype)
        records: list[Record] = []
        for start, step, positions in _progressions(rows):
            block, sums = await anyio.to_thread.run_sync(_stack, [samples[p] for p in positions])
            selection = slice(start, start + step * (len(positions) - 1) + 1, step)
            keys = [array.metadata.encode_chunk_key((rows[p],) + (0,) * len(item_shape)) for p in positions]
            write = functools.partial(array.setitem, selection, block)
            try:
                await write()
            except _BLOCKED:
                await _clear_blockers(self._context.store, keys)
                await write()
            for position, key, (nbytes, crc) in zip(positions, keys, sums, strict=True):
                records.append(Record(ids[position], key, nbytes, f"{crc:08x}", item_shape, str(dtype)))
        return records

    async def commit(self, records: RecordStream) -> None:
        """Check that every rank wrote the same array, then delete the chunks no record vouches for.

        Reads the records as they come (a chunk of the manifest at a time); holds the array's chunk keys.
        """
        store = self._context.store
        unlisted: set[str] | None = None  # the stored chunks no record has named yet; None until the first row
        item_shape: tuple[int, ...] = ()
        dtype = ""
        async for batch in records.batches():
            for record in batch:
                if not record.path.startswith(CHUNKS + "/"):
                    continue
                if unlisted is None:
                    item_shape, dtype = await self._stored_layout()
                    unlisted = set(await store.list(CHUNKS))
                if tuple(record.shape) != item_shape or record.dtype != dtype:
                    raise CommitError(
                        f"row {record.id!r} was written with shape {tuple(record.shape)} and dtype {record.dtype}, "
                        f"but the array holds rows of shape {item_shape} and dtype {dtype}: ranks saw different "
                        "predictions"
                    )
                unlisted.discard(record.path)
        if unlisted is None:
            # nothing stored by this run nor kept from an earlier one: leave no stale array behind either
            await store.delete([METADATA])
            await store.delete_prefix(CHUNKS)
            return
        await store.delete(sorted(unlisted))

    async def _stored_layout(self) -> tuple[tuple[int, ...], str]:
        """The item shape and dtype of the stored array; raises :class:`CommitError` when it is absent, or is not
        the array rank 0 wrote."""
        from zarr.storage import StorePath

        stored = await _existing_array(StorePath(self._store))
        if stored is None:
            raise CommitError(f"rows are recorded but the output holds no {METADATA}")
        if self._array is not None and _layout(stored.metadata) != _layout(self._array.metadata):
            raise CommitError(
                f"{METADATA} no longer describes the array rank 0 wrote (shape "
                f"{tuple(self._array.metadata.shape)}): did ranks see predictions of different shapes or dtypes?"
            )
        return tuple(stored.metadata.shape[1:]), str(_numpy_dtype(stored))


class _ZarrCheck(RecordCheck):
    """``verify``'s check of the array's rows: each read back through zarr, its raw values checksummed."""

    def __init__(self, array: AsyncArray[Any] | None, chunks: set[str]) -> None:
        super().__init__()
        self._array = array
        self._chunks = chunks

    def covers(self, record: Record) -> bool:
        return record.path.startswith(CHUNKS + "/")

    async def check(self, record: Record) -> tuple[Problem | None, int]:
        if self._array is None or record.path not in self._chunks:
            return Problem("missing", record.path, record.id, "recorded in the manifest but the chunk is absent"), 0
        if not is_numeric_id(record.id) or int(record.id) >= self._array.shape[0]:
            return Problem("invalid", record.path, record.id, f"not a row of an array of {self._array.shape[0]}"), 0
        row = int(record.id)
        try:
            values = np.asarray(await self._array.getitem(slice(row, row + 1)))
        except OSError as exc:
            return Problem("unreadable", record.path, record.id, f"{type(exc).__name__}: {exc}"), 0
        nbytes, crc = row_checksum(values[0])
        return record_problem(record, nbytes, crc), nbytes


async def _existing_array(path: Any) -> AsyncArray[Any] | None:
    from zarr.api.asynchronous import open_array

    if not await (path / METADATA).exists():
        return None
    return await open_array(store=path, zarr_format=3, mode="r")


def _numpy_dtype(array: AsyncArray[Any]) -> np.dtype[Any]:
    return np.dtype(array.dtype)


def _layout(metadata: Any) -> tuple[Any, ...]:
    return tuple(metadata.shape), str(metadata.data_type), tuple(metadata.chunks)


def _check_compatible(existing: Any, wanted: Any) -> None:
    if _layout(existing) != _layout(wanted):
        raise PredictionError(
            f"mode='resume' found an array of shape {tuple(existing.shape)}, dtype {existing.data_type} and chunks "
            f"{tuple(existing.chunks)}; this run's predictions make shape {tuple(wanted.shape)}, dtype "
            f"{wanted.data_type} and chunks {tuple(wanted.chunks)}: use mode='overwrite' to replace it"
        )


def _check_sample(identifier: str, sample: torch.Tensor, item_shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
    shape = tuple(sample.shape)
    got = sample.numpy().dtype if sample.dtype not in NON_NUMPY_DTYPES else sample.dtype
    if shape != item_shape or got != dtype:
        raise PredictionError(
            f"prediction {identifier!r} has shape {shape} and dtype {got}, but the zarr array holds rows of shape "
            f"{item_shape} and dtype {dtype} (set by the first prediction): every prediction must have the same "
            "shape and dtype"
        )


async def _clear_blockers(store: ObjectStore, keys: Sequence[str]) -> None:
    """Remove the chunks of a stale array of another dimensionality that stand where ``keys`` go.

    Where a store has directories (a local one), a chunk ``c/0/0`` of an array of 1-d rows blocks the directory
    ``c/0/0/`` that an array of 2-d rows needs, and the other way round. This run's chunk keys all have one depth,
    so what blocks them is never this run's. Removed through the store, which forgets the directories it removes.
    """
    stale: set[str] = set()
    for key in keys:
        below = key + "/"
        stale.update(k for k in await store.list(below) if k.startswith(below))  # a directory where the chunk goes
        parts = key.split("/")
        for depth in range(2, len(parts)):  # a chunk where a directory on the key's path goes
            prefix = "/".join(parts[:depth])
            if prefix in await store.list(prefix):
                stale.add(prefix)
    # (c itself a chunk, of a 0-d array: only then nothing deeper can stand in the way)
    if not stale and CHUNKS in await store.list(CHUNKS):
        stale.add(CHUNKS)
    await store.delete(sorted(stale))


def _stack(samples: Sequence[torch.Tensor]) -> tuple[np.ndarray[Any, Any], list[tuple[int, int]]]:
    block = np.stack([s.numpy() for s in samples])
    return block, [row_checksum(row) for row in block]
