"""The sink: the public face of one output. It checks what comes in and hands it to its run.

``Sink`` keeps no machinery of its own (see :mod:`lighter_sink._run`): the caller's thread validates ids and
values, stages them to host memory (:mod:`lighter_sink._staging`) and hands them off
(:mod:`lighter_sink._handoff`); everything else happens on the run's event loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self, Unpack

from lighter_sink._config import SinkConfig, SinkOptions
from lighter_sink._errors import ConfigurationError, PredictionError, SinkStateError
from lighter_sink._handoff import ROW_FROM, Batch
from lighter_sink._ids import CounterIds, IdBatch, id_batch, validate_identifier, validate_identifiers
from lighter_sink._run import Run, SinkState
from lighter_sink._staging import HostBatch, count_samples, numpy_view, stage, stage_one
from lighter_sink._stats import SinkProgress, SinkStats
from lighter_sink.formats import Format

__all__ = ["Sink"]

logger = logging.getLogger(__name__)
_CHECKED_KINDS = 256


class Sink:
    """Writes predictions asynchronously to a local directory or any fsspec url.

    Use it as a context manager: leaving the block flushes, writes the manifest and commits ``_SUCCESS``;
    leaving it with an exception aborts (nothing is committed)::

        with Sink("s3://bucket/run-7/preds", format="npy") as sink:
            for ids, batch in loader:
                sink.put_batch(ids, model(batch))

    Args:
        url: a local path or an fsspec url (``s3://``, ``gs://``, ``memory://``, ...).
        format: a registered format name (``"npy"``, ``"pt"``, ...) or a :class:`~lighter_sink.formats.Format`.
        rank: this process's rank; rank 0 prepares the url and commits.
        world_size: number of ranks writing to the url.
        all_ok: a collective that returns True only when every rank passed True (also used as a barrier).
            Defaults to an all-reduce over ``torch.distributed`` when ``world_size > 1``.
        **options: the options every entry point shares (``storage_options``, ``max_queue_bytes``,
            ``concurrency``, ``retries``, ``timeout``, ``mode``, ``key``, ``backend``, ``upload_checksums``,
            ``durable``, ``num_samples``, ``copy``), documented in :class:`~lighter_sink.SinkConfig`; the sink's
            are :attr:`config`.

    Raises:
        ConfigurationError: an invalid argument (an unknown format lists the known ones).
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        format: str | Format = "npy",
        rank: int = 0,
        world_size: int = 1,
        all_ok: Callable[[bool], bool] | None = None,
        **options: Unpack[SinkOptions],
    ) -> None:
        url = os.fspath(url)
        if not isinstance(url, str) or not url:
            raise ConfigurationError(f"url must be a non-empty path or fsspec url, got {url!r}")
        self.url = url.rstrip("/") or url
        self.config = config = SinkConfig.of(format, options)
        config.check_url(self.url)
        if config.format.needs_num_samples and config.num_samples is None:
            raise ConfigurationError(
                f"format {config.format.name!r} needs the number of samples: pass num_samples= "
                "(PredictionSink takes it from the predict dataset's length)"
            )
        if not isinstance(world_size, int) or world_size < 1:
            raise ConfigurationError(f"world_size must be an int >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigurationError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        self.rank = rank
        self.world_size = world_size
        self._key = config.key_template
        self._checked: set[tuple[object, ...]] = set()
        self._run = Run(self.url, config, rank, world_size, all_ok)

    @property
    def format(self) -> Format:
        return self.config.format

    @property
    def copy(self) -> bool:
        return self.config.copy

    @property
    def max_queue_bytes(self) -> int:
        return self.config.max_queue_bytes

    def __repr__(self) -> str:
        return (
            f"<Sink {self.url!r} format={self.format.name!r} state={self.state.value} "
            f"rank={self.rank}/{self.world_size}>"
        )

    @property
    def state(self) -> SinkState:
        return self._run.state

    @property
    def summary(self) -> dict[str, Any] | None:
        """The ``_SUCCESS`` summary once committed (on rank 0), else ``None``."""
        return self._run.summary

    @property
    def failed(self) -> bool:
        """Whether a background write failed (the next ``put`` will raise it)."""
        return self._run.handoff.error is not None

    @property
    def stats(self) -> SinkStats:
        """A consistent snapshot of the counters (cheap; safe to call from any thread)."""
        return self._run.stats()

    def progress(self) -> SinkProgress:
        """Queued bytes, stored MB/s and stall seconds: what a progress bar shows, cheaper than :attr:`stats`."""
        return self._run.progress()

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self.abort()
        else:
            self.close()

    def __del__(self) -> None:
        run = getattr(self, "_run", None)
        if run is not None and run.state in (SinkState.RUNNING, SinkState.COMMITTING):
            warnings.warn(
                f"{self!r} was garbage-collected while open; nothing was committed. "
                "Use it as a context manager or call close().",
                ResourceWarning,
                stacklevel=2,
                source=self,
            )
            with contextlib.suppress(Exception):
                run.abort(vote=False)  # (the garbage collector's thread takes part in no agreement)

    def open(self) -> Self:
        """Start the event loop and the workers, and prepare the url according to ``mode``.

        Raises:
            DestinationError: the url cannot receive predictions (a regular file, cannot be created, not empty
                with ``mode="error"``).
            SinkStateError: the sink was already opened.
        """
        if self.state is not SinkState.NEW:
            raise SinkStateError(f"open() needs a new sink; this one is {self.state.value}")
        self._run.open()
        logger.debug("opened %r", self)
        return self

    def put(self, identifier: int | str, value: object) -> None:
        """Queue one prediction (one sample) under ``identifier``.

        Blocks only while the queue holds ``max_queue_bytes`` (or 131,072 predictions, whatever their bytes).

        Raises:
            WriteError: an earlier background write failed (chained to the storage error).
            IdentifierError: the identifier cannot be an object key.
            PredictionError: the value is not a tensor the format can store.
            SinkStateError: the sink is not running.
        """
        # put_batch([identifier], [value]) without what a batch needs (one call per prediction: the hot path)
        run = self._run
        run.check_running("put")
        handoff = run.handoff
        handoff.raise_if_failed()
        ids = [validate_identifier(identifier)]
        keys = [self._key.render(ids[0])]
        handoff.check_unique(ids, keys)
        if handoff.stored is not None and not handoff.split_stored(keys):
            return  # resume: stored already
        sample = numpy_view(value, ROW_FROM)
        if sample is not None:  # small: copied into an array with the others put meanwhile, one batch for all
            kind = (value.dtype, value.shape)  # type: ignore[attr-defined]
            if kind not in self._checked:
                self.format.check(value)  # type: ignore[arg-type]
                self._remember(kind)
            handoff.claim(ids, keys)
            handoff.submit_row(ids[0], keys[0], sample)
            return
        host = stage_one(value, copy=self.config.copy, pool=handoff.pool)
        self._check(host)
        handoff.claim(ids, keys)
        handoff.submit(Batch(ids, keys, host))

    def put_batch(self, identifiers: IdBatch, values: object) -> None:
        """Queue a batch: ``values`` is a tensor whose dim 0 matches ``identifiers``, or one tensor per id.

        ``identifiers`` is a sequence of ids, or a 1-d integer tensor or numpy array (ids as a DataLoader collates
        them). The batch stays one queue item: the caller pays one hand-off per batch, not per sample. An id may
        be put once per run, and two ids may not give one key. Raises as :meth:`put`, and
        :class:`IdentifierError` for ids that are not a vector of ids, a repeated id or a key another id has.
        """
        run = self._run
        run.check_running("put")
        handoff = run.handoff
        handoff.raise_if_failed()
        # A counter's ids are valid and never repeat: they need no check when distinct ids give distinct keys.
        ids: list[str]
        if isinstance(identifiers, CounterIds):
            ids, unique = identifiers, True
        else:
            ids = validate_identifiers(identifiers if isinstance(identifiers, list) else id_batch(identifiers))
            unique = False
        count = count_samples(values)
        if count != len(ids):
            raise PredictionError(f"got {count} predictions for {len(ids)} ids; expected one per id")
        keys = [self._key.render(i) for i in ids]
        check = not unique or not self._key.injective
        if check:
            handoff.check_unique(ids, keys)
        write = handoff.split_stored(keys)
        if not write:
            return
        if len(write) != len(ids):
            values = _select(values, write)
            ids = [ids[i] for i in write]
            keys = [keys[i] for i in write]
        host = stage(values, len(ids), copy=self.config.copy, pool=handoff.pool)
        self._check(host)
        if check:
            handoff.claim(ids, keys)  # only once the batch is accepted: a refused batch may be put again
        handoff.submit(Batch(ids, keys, host))

    def _check(self, host: HostBatch) -> None:
        """Have the format check each kind of sample (dtype and shape; staging let only dense ones in) once per sink.

        A batch is checked through its first row; later batches of the same kind are not checked again. This
        keeps the caller's thread from making (and freeing) a row tensor per batch: torch gives up the GIL in
        those calls, and getting it back from the sink's busy threads cost the predict loop milliseconds.
        """
        checked = self._checked
        if isinstance(host.values, list):
            for value in host.values:
                kind = (value.dtype, value.shape)
                if kind not in checked:
                    self.format.check(value)
                    self._remember(kind)
            return
        batch = host.values
        kind = (batch.dtype, batch.shape[1:])
        if kind not in checked:
            self.format.check(batch[0])  # (a batch that gets here has a sample: empty ones return earlier)
            self._remember(kind)

    def _remember(self, kind: tuple[object, ...]) -> None:
        if len(self._checked) >= _CHECKED_KINDS:  # predictions of ever-new shapes: start over, stay bounded
            self._checked.clear()
        self._checked.add(kind)

    def flush(self) -> None:
        """Wait until everything queued so far is stored and recorded in a manifest part.

        Raises:
            WriteError: a background write failed.
        """
        self._run.check_running("flush")
        self._run.flush()

    def commit(self) -> None:
        """Flush, then (on rank 0, once every rank flushed without error) write the manifest and ``_SUCCESS``.

        Every rank calls it; it returns on every rank or raises on every rank. The sink is closed afterwards.

        Raises:
            WriteError: this rank's writes failed; nothing was committed.
            CommitError: another rank failed, or the manifest or marker could not be written.
        """
        self._run.check_running("commit")
        self._run.commit()

    def close(self) -> None:
        """Commit if still running; do nothing if already committed or aborted."""
        if self.state is SinkState.RUNNING:
            self.commit()
        elif self.state is SinkState.NEW:
            self._run.state = SinkState.ABORTED

    def abort(self) -> None:
        """Stop the workers without committing. Safe to call in any state, and more than once."""
        self._run.abort()


def _select(values: object, positions: list[int]) -> object:
    if isinstance(values, list | tuple):
        return [values[i] for i in positions]
    return values[positions]  # type: ignore[index]
