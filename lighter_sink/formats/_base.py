"""The contract every format fulfils: turn host tensors into bytes, knowing nothing of urls or storage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from lighter_sink._errors import PredictionError
from lighter_sink._types import Buffer, ObjectStore, Problem, Record, RecordStream

__all__ = [
    "Buffer",
    "CheckContext",
    "EncodedItem",
    "Format",
    "FormatWriter",
    "RecordCheck",
    "RecordStream",
    "WriterContext",
    "record_problem",
]


@dataclass(slots=True)
class EncodedItem:
    """One prediction encoded: the buffers of its object in order (not joined, to avoid a copy).

    (Not frozen: a frozen dataclass assigns every field through ``object.__setattr__``, and tiny predictions
    create one of these each.)
    """

    buffers: tuple[Buffer, ...]
    shape: tuple[int, ...]
    dtype: str
    nbytes: int = -1

    def __post_init__(self) -> None:
        if self.nbytes < 0:
            size = sum(b.nbytes if isinstance(b, memoryview) else len(b) for b in self.buffers)
            self.nbytes = size


@dataclass(frozen=True, slots=True)
class WriterContext:
    """What a :class:`FormatWriter` knows of the run (built on the sink's event loop): no url, no credentials.

    Attributes:
        store: the sink's store, by key relative to the url (``await store.put(key, [bytes])``); every call is
            bounded, retried and counted by the sink's policy.
        rank: this process's rank.
        world_size: number of ranks.
        num_samples: samples in the run when known (the predict dataset's length, or ``Sink(num_samples=)``).
        mode: ``"overwrite"``, ``"resume"`` or ``"error"``.
        scratch: the prefix under which this output may keep intermediate objects (sorted runs of a table); it
            is the output's own, and overwriting the output removes it.
        run: this run's token (unique per run: a resumed run's objects never take an earlier run's names).
        shard_bytes: ``Sink(shard_bytes=)`` for formats that pack shards; ``None``: the format's default.
    """

    store: ObjectStore
    rank: int
    world_size: int
    num_samples: int | None
    mode: str
    scratch: str = "_table_parts"
    run: str = ""
    shard_bytes: int | None = None


class FormatWriter:
    """Stores predictions of formats that are not one object per prediction (arrays, tables).

    Lives on the sink's event loop; :meth:`write` may be called by several workers at once. Records returned
    by :meth:`write` go to the manifest (their ``path`` says where the row lives, e.g. ``"predictions.csv"``): a
    list, or a :class:`~lighter_sink._types.RecordColumns` of many records at once (a shard's).
    """

    async def write(self, ids: Sequence[str], samples: Sequence[torch.Tensor]) -> Sequence[Record]:
        raise NotImplementedError

    async def write_batch(self, ids: Sequence[str], values: torch.Tensor | Sequence[torch.Tensor]) -> Sequence[Record]:
        """:meth:`write` of a batch as it was put: one tensor whose rows are the samples, or a list of them.

        What the sink calls; writers that encode a batch at once override it to save splitting it.
        """
        return await self.write(ids, values.unbind(0) if isinstance(values, torch.Tensor) else values)

    async def flush(self) -> Sequence[Record]:
        """Store everything written so far and return the records of what this call stored.

        Called before the ranks agree to commit, and again if it failed: what it could not store stays pending
        (and is not returned) until a later call stores it. The sink records what it returns.
        """
        return []

    async def commit(self, records: RecordStream) -> None:
        """On rank 0 only, after every rank flushed: finish the output (merge parts, write metadata).

        ``records``: every record of the output (those of earlier runs a resume kept included), in id order, read
        as they are needed; the manifest listing them is written already, ``_SUCCESS`` follows if this returns.
        """

    async def aclose(self) -> None:
        """Release resources; called on every rank, after a commit or an abort."""


@dataclass(frozen=True, slots=True)
class CheckContext:
    """What ``verify`` tells a format of the output it checks.

    Attributes:
        scratch: the prefix under which the output's writer kept intermediate objects (a table's sorted parts).
        guessed: the output's ``_SUCCESS`` does not name this format (the run did not finish, or its format is
            not registered here): every registered format of rows is asked in turn about the records no earlier
            one took, and answers only for those it recognises as its own from what is stored.
    """

    scratch: str
    guessed: bool = False


class RecordCheck:
    """Checks the rows of a format's output against their records (made by :meth:`Format.open_check`).

    :meth:`check` is called for every record that :meth:`covers`, several at once.
    """

    def __init__(self) -> None:
        #: problems found while preparing that belong to no record (a table's row that no record lists, ...)
        self.problems: list[Problem] = []

    def covers(self, record: Record) -> bool:
        """Whether ``record`` is a row this check reads (others are checked as whole objects)."""
        raise NotImplementedError

    async def check(self, record: Record) -> tuple[Problem | None, int]:
        """The record's problem (``None`` when its row matches) and the bytes read to check it."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release what preparing the check acquired."""


def record_problem(record: Record, nbytes: int, crc: int) -> Problem | None:
    """What is wrong with a row of ``nbytes`` bytes and CRC-32 ``crc`` read back for ``record``, if anything."""
    try:
        expected_crc = int(record.crc32, 16)
    except ValueError as exc:
        return Problem("invalid", record.path, record.id, f"unusable record: {exc}")
    if nbytes != record.nbytes:
        return Problem("size", record.path, record.id, f"has {nbytes} bytes, the manifest says {record.nbytes}")
    if crc != expected_crc:
        return Problem("checksum", record.path, record.id, f"crc32 is {crc:08x}, the manifest says {expected_crc:08x}")
    return None


# dtypes numpy has no type for: torch stores them (format "pt"), numpy-based formats refuse them up front
NON_NUMPY_DTYPES = frozenset({torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2})


def require_numpy_dtype(value: torch.Tensor, message: str) -> None:
    """Raise :class:`PredictionError` with ``message`` (``{dtype}`` filled in) when numpy cannot hold ``value``."""
    if value.dtype in NON_NUMPY_DTYPES or value.is_quantized:
        raise PredictionError(message.format(dtype=value.dtype))


class Format:
    """Base class of formats; subclass it and register the instance with :func:`register_format`.

    Capabilities are class attributes, read by the sink instead of ``isinstance`` checks:

    * ``per_item_objects``: each prediction becomes its own object ``{url}/{key}{extension}``.
    * ``needs_num_samples``: the format must know the number of samples before the first write.
    * ``packs_shards``: predictions are packed into shard objects (``Sink(shard_bytes=)`` applies).

    :meth:`require` says whether the optional packages it needs are installed, when a sink is built.

    ``verify`` asks the format how its records are checked (:meth:`open_check`) instead of knowing formats.
    """

    name: ClassVar[str] = ""
    extension: ClassVar[str] = ""
    per_item_objects: ClassVar[bool] = True
    needs_num_samples: ClassVar[bool] = False
    packs_shards: ClassVar[bool] = False

    @property
    def namespace(self) -> str:
        """The name of this output's control objects (manifest, marker, lease) when the url holds other outputs
        too: ``""`` for an output that fills its url, which keeps them at ``{url}/_manifest.jsonl`` and so on."""
        return ""

    @property
    def outputs(self) -> tuple[str, ...]:
        """For formats without per-item objects: the keys, or prefixes ending in ``/``, their writer stores.

        Overwriting removes them before the new run writes; per-item formats are known by extension and key.
        """
        return ()

    def require(self) -> None:
        """Raise :class:`~lighter_sink.MissingDependencyError` naming the extra to install when an optional
        package this format needs is missing. Called when a sink's configuration is built, before any compute."""

    def check(self, value: torch.Tensor) -> None:
        """Raise :class:`PredictionError` when ``value`` (one sample or one batch) cannot be stored.

        Called on the caller's thread before the value is queued, so bad input fails early and loudly; the sink
        calls it once per kind of sample (dtype and shape), so a check sees the first sample of each kind
        and should judge the kind, not the values.
        """
        if value.is_sparse or value.layout != torch.strided:
            raise PredictionError(f"format {self.name!r} stores dense tensors, got layout {value.layout}")

    def encode(self, value: torch.Tensor) -> EncodedItem:
        """Encode one sample held in host memory."""
        raise NotImplementedError

    def open_writer(self, context: WriterContext) -> FormatWriter:
        """For formats without per-item objects: the writer that stores this rank's predictions."""
        raise NotImplementedError(f"format {self.name!r} writes one object per prediction")

    async def open_check(
        self, store: ObjectStore, records: Sequence[Record], context: CheckContext
    ) -> RecordCheck | None:
        """How ``verify`` checks the records this format stores otherwise than as whole objects.

        ``None`` (the default, right for one object per prediction): every record is an object of its own, read
        whole and compared with its record. Formats of rows (an array, a table) return a :class:`RecordCheck`
        that reads their rows back through ``store``.
        """
        return None

    def describe(self, data: bytes) -> tuple[tuple[int, ...], str]:
        """Shape and dtype of an encoded object.

        Resume uses it to record objects that a killed run stored before it could record them; a format that
        cannot tell raises ``NotImplementedError`` and such objects are written again.
        """
        raise NotImplementedError

    def encode_rows(self, batch: torch.Tensor) -> list[EncodedItem]:
        """Encode every row of a batched tensor (dim 0 = samples); formats override it to share work."""
        return self.encode_batch(batch.unbind(0))

    def encode_batch(self, values: Sequence[torch.Tensor]) -> list[EncodedItem]:
        """Encode several samples; formats override it when a batch can share work (headers, conversions)."""
        return [self.encode(v) for v in values]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
