"""The framework-agnostic sink: lifecycle, a byte-bounded queue, the worker pool, errors and statistics.

Threads: the caller's thread runs ``put``; one background thread runs an asyncio event loop through an anyio
blocking portal, where worker tasks encode (in worker threads, off the loop) and write; a small waker thread
wakes that loop for each hand-over, so that ``put`` makes no system call and never gives up the GIL. The byte
bound is kept on the caller's side with a condition variable, so ``put`` costs microseconds and blocks only
while the queue is full, whatever the event loop is busy with.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import os
import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import anyio
import anyio.to_thread
import numpy as np
import torch
from anyio.abc import TaskStatus
from anyio.from_thread import BlockingPortal, start_blocking_portal
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from lighter_sink._checksum import crc32
from lighter_sink._commit import (
    LEASE_SECONDS,
    RENEW_SECONDS,
    ControlKeys,
    Lease,
    acquire_lease,
    check_lease,
    new_token,
    orphan_records,
    owned_key,
    read_lease,
    renew_lease,
    stored_generation,
)
from lighter_sink._errors import (
    CommitError,
    ConfigurationError,
    DestinationError,
    IdentifierError,
    PredictionError,
    SinkStateError,
    WriteError,
)
from lighter_sink._ids import KeyTemplate, validate_identifiers
from lighter_sink._manifest import merge_parts, read_records, write_success
from lighter_sink._staging import BufferPool, HostBatch, stage
from lighter_sink._store import RetryPolicy, Store, check_local_destination, is_local_url, local_path, open_store
from lighter_sink._types import Buffer, Record, encode_records
from lighter_sink._version import __version__
from lighter_sink.formats import Format, FormatWriter, WriterContext, get_format

__all__ = ["Mode", "Sink", "SinkState", "SinkStats"]

logger = logging.getLogger(__name__)

Mode = Literal["overwrite", "resume", "error"]
Backend = Literal["fsspec", "obstore"]
_BACKENDS = ("fsspec", "obstore")
_MODES = ("overwrite", "resume", "error")
DEFAULT_MAX_QUEUE_BYTES = 512 * 2**20
DEFAULT_CONCURRENCY = 16
# Consecutive queued batches one worker takes at once: tiny predictions then cost one thread hop per group.
_GROUP_ITEMS = 1024
_GROUP_BYTES = 8 * 2**20
# Workers that encode groups for object stores (CPU work in threads; the uploaders give the concurrency).
_ENCODERS = 2
# Records per manifest part: a killed run loses at most this many records (the objects stay, resume re-lists).
_PART_RECORDS = 1024
_LATENCY_SAMPLES = 4096
_FAILED_IDS_KEPT = 100


class SinkState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    COMMITTING = "committing"
    COMMITTED = "committed"
    ABORTED = "aborted"


@dataclass(frozen=True, slots=True)
class SinkStats:
    """A snapshot of what the sink did so far.

    Attributes:
        items: predictions stored.
        bytes: encoded bytes stored.
        batches: batches handed to ``put``/``put_batch``.
        stall_seconds: time ``put`` spent blocked because the queue was full.
        queue_bytes: host bytes queued or being written right now.
        queue_high_water_bytes: the most host bytes ever held at once.
        write_seconds_p50: median time to write one group of objects.
        write_seconds_p99: 99th percentile of the same.
        retries: transient storage errors that were retried.
        failed: predictions that could not be stored.
        skipped: predictions not written because an earlier run stored them (``mode="resume"``).
        elapsed_seconds: time since the sink was opened.
    """

    items: int
    bytes: int
    batches: int
    stall_seconds: float
    queue_bytes: int
    queue_high_water_bytes: int
    write_seconds_p50: float | None
    write_seconds_p99: float | None
    retries: int
    failed: int
    skipped: int
    elapsed_seconds: float

    @property
    def mb_per_second(self) -> float:
        return self.bytes / 1e6 / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mb_per_second": self.mb_per_second}


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def _default_all_ok(world_size: int) -> Callable[[bool], bool]:
    if world_size == 1:
        return lambda ok: ok
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigurationError(
            f"world_size={world_size} needs torch.distributed to be initialised, or an all_ok callable "
            "that returns True only when every rank passed True"
        )

    def all_ok(ok: bool) -> bool:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1 if ok else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    return all_ok


_Encoded = tuple[str, Record, tuple[Buffer, ...]]
# Objects of a group left unwritten because an earlier write failed: neither stored nor counted as failures.
_NOT_WRITTEN = Exception("not written: an earlier write failed")


@dataclass(slots=True)
class _Batch:
    ids: list[str]
    keys: list[str]  # object keys without the extension
    host: HostBatch


@dataclass(slots=True, eq=False)
class _Upload:
    """A group whose objects the uploaders store one by one; the last one to finish settles the group."""

    group: Sequence[_Batch]
    encoded: list[_Encoded]
    errors: list[BaseException | None]
    left: int
    started: float
    retries: int = 0  # the store's retry count when the group was handed to it


# The caller's thread never blocks without a timeout: a signal (Ctrl-C) may be delivered to any thread, and a
# main thread blocked in a lock is not woken by one that went elsewhere; waking up this often lets the
# interpreter raise KeyboardInterrupt promptly.
_WAKE_EVERY = 0.25
T = TypeVar("T")


def _result(future: Future[T]) -> T:
    """``future.result()``, waited for in slices so that the calling thread stays interruptible."""
    while True:
        try:
            return future.result(timeout=_WAKE_EVERY)
        except TimeoutError:
            if future.done():
                raise  # the call itself raised TimeoutError
            continue


class _Engine:
    """Everything that runs: the portal thread, the outbox, the workers, the store and the counters.

    Kept apart from :class:`Sink` so that the event loop, which references the engine, never keeps the user's
    ``Sink`` alive: a sink dropped while open is garbage-collected, warns and aborts.
    """

    def __init__(self, sink: Sink, storage_options: dict[str, Any], all_ok: Callable[[bool], bool] | None) -> None:
        self.url = sink.url
        self.format = sink.format
        self.max_queue_bytes = sink.max_queue_bytes
        self.concurrency = sink.concurrency
        self.retry = sink.retry
        self.mode = sink.mode
        self.rank = sink.rank
        self.world_size = sink.world_size
        self.storage_options = storage_options
        self.all_ok = all_ok
        self.key = sink.key
        self.backend = sink.backend
        self.num_samples = sink.num_samples
        self._writer: FormatWriter | None = None
        self.upload_checksums = sink.upload_checksums
        self.durable = sink.durable

        self.state = SinkState.NEW
        self.summary: dict[str, Any] | None = None
        self._cond = threading.Condition()
        self.pool = BufferPool()  # staging buffers of stored batches, for later puts to copy into
        self._held_bytes = 0
        self._pending = 0
        self._high_water = 0
        self._stall = 0.0
        self._batches = 0
        self._items = 0
        self._bytes = 0
        self._failed = 0
        self._error: BaseException | None = None
        self._stopping = ""  # why put refuses batches from now on: "aborted" or "committing" (set under _cond)
        self._error_count = 0
        self._failed_ids: list[str] = []
        self._latencies: deque[float] = deque(maxlen=_LATENCY_SAMPLES)
        self._records: list[Record] = []
        self._seen: dict[str, str] = {}  # key -> the id put under it in this run, for ids that are checked
        self._stored: set[str] | None = None  # resume: object paths already in storage
        self._skipped = 0
        # Batches put but not yet on the event loop. While a hand-over is scheduled and the loop is busy, puts
        # only append here, so one loop wake-up carries many batches and put never waits for the loop.
        self._outbox: list[_Batch] = []
        self._hand_over_scheduled = False
        self._wakes: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._waker: threading.Thread | None = None
        self._part_seq = 0
        self.keys = ControlKeys(self.format.namespace)
        self._run = new_token()
        self._generation: str | None = None  # known once the output is prepared (rank 0) or joined (the others)
        self._lease: Lease | None = None  # rank 0's, while it holds the output
        self._lease_lock: anyio.Lock | None = None
        self._lease_scope: anyio.CancelScope | None = None
        self._opened_at = 0.0
        self._closed_at: float | None = None
        self._portal_cm: contextlib.AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._store: Store | None = None
        self._send: MemoryObjectSendStream[list[_Batch]] | None = None
        self._service: Future[None] | None = None
        self._worker_scope: anyio.CancelScope | None = None
        self._part_lock: anyio.Lock | None = None
        self._deferred_open = False
        self._opened: anyio.Event | None = None  # set once a deferred open finished (made on the loop)
        self._open_error: BaseException | None = None
        self._open_scope: anyio.CancelScope | None = None

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        self.all_ok = self.all_ok or _default_all_ok(self.world_size)
        self._opened_at = time.perf_counter()
        self._portal_cm = start_blocking_portal(backend="asyncio")
        self._portal = self._portal_cm.__enter__()
        try:
            self._start(self._portal, self.all_ok)
        except BaseException:
            self._shutdown(abort=True)
            self.state = SinkState.ABORTED
            raise
        self.state = SinkState.RUNNING

    def _start(self, portal: BlockingPortal, all_ok: Callable[[bool], bool]) -> None:
        self._loop = self._call(asyncio.get_running_loop)
        # A single process overwriting needs no agreement and no answer before compute starts: the store is
        # created (a client's start-up costs a few hundred milliseconds on S3) and the url prepared while the
        # model computes its first batches. Refusing a url (mode="error"), resuming and several ranks need
        # the answer first.
        self._deferred_open = self.world_size == 1 and self.mode == "overwrite"
        if self._deferred_open:
            if is_local_url(self.url):
                check_local_destination(local_path(self.url))  # microseconds: a bad path fails right here
        else:
            error: BaseException | None = None
            try:
                self._call(self._aopen)
                if self.rank == 0:
                    self._call(self._prepare_destination)
            except BaseException as exc:
                error = exc
            # Nobody writes before rank 0 removed a stale marker; nobody runs if any rank could not open.
            if not all_ok(error is None) or error is not None:
                raise error or DestinationError(f"another rank could not open {self.url}; see its error")
            self._call(self._join)
        self._service, _ = portal.start_task(self._serve)
        self._waker = threading.Thread(target=self._wake_loop, name="lighter-sink-waker", daemon=True)
        self._waker.start()

    def abort(self, *, vote: bool = True) -> None:
        running = self.state is SinkState.RUNNING
        with self._cond:  # a put on another thread, even one waiting for room, raises from here on
            self._stopping = "aborted"
            self._cond.notify_all()
        if self.state in (SinkState.RUNNING, SinkState.COMMITTING):
            self._shutdown(abort=True)
        if self.state is not SinkState.COMMITTED:
            self.state = SinkState.ABORTED
        if running and vote and self.world_size > 1 and self.all_ok is not None:
            # The other ranks wait for this rank's vote in commit's agreement: an aborting rank votes no there,
            # so they fail promptly instead of waiting for ever. (Each rank votes once per agreement.)
            try:
                self.all_ok(False)
            except Exception as exc:  # the collective itself broke: the others see that too
                logger.warning("rank %d could not tell the other ranks it aborted: %r", self.rank, exc)

    def _call(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run ``func(*args)`` (a coroutine function or a plain one) on the loop and wait for its result."""
        assert self._portal is not None
        return _result(self._portal.start_task_soon(func, *args))

    def check_running(self, what: str) -> None:
        if self.state is not SinkState.RUNNING:
            hint = " (use the sink as a context manager or call open())" if self.state is SinkState.NEW else ""
            raise SinkStateError(f"{what}() needs a running sink; this one is {self.state.value}{hint}")

    # ------------------------------------------------------------------ the caller's side

    def check_unique(self, ids: Sequence[str], keys: Sequence[str]) -> None:
        """Refuse an id already put in this run, and two ids with one key (in this run or in this batch).

        Two such ids would write one object, and the manifest would list both at its path: one prediction lost.
        The ids of a batch are distinct (``validate_identifiers``), so its keys are too when the template is
        injective.
        """
        seen = self._seen
        if not seen.keys().isdisjoint(keys):  # one lookup per key, in C; the loop only names the culprit
            for identifier, key in zip(ids, keys, strict=True):
                owner = seen.get(key)
                if owner is not None:
                    raise self._collision(owner, identifier, key)
        if not self.key.injective and len(set(keys)) != len(keys):
            first: dict[str, str] = {}
            for identifier, key in zip(ids, keys, strict=True):
                owner = first.setdefault(key, identifier)
                if owner != identifier:
                    raise self._collision(owner, identifier, key)

    def _collision(self, owner: str, identifier: str, key: str) -> IdentifierError:
        if owner == identifier:
            return IdentifierError(f"identifier {identifier!r} was already put in this run; ids must be unique")
        return IdentifierError(
            f"identifiers {owner!r} and {identifier!r} both give the key {key!r} (key template "
            f"{self.key.template!r}); each id needs a key of its own"
        )

    def claim(self, ids: Sequence[str], keys: Sequence[str]) -> None:
        self._seen.update(zip(keys, ids, strict=True))

    def split_stored(self, keys: Sequence[str]) -> list[int]:
        """Resume: the positions whose object is not stored yet (all of them in the other modes)."""
        stored = self._stored
        if stored is None:
            return list(range(len(keys)))
        suffix = self.format.extension if self.format.per_item_objects else ""
        write = [position for position, key in enumerate(keys) if key + suffix not in stored]
        with self._cond:
            self._skipped += len(keys) - len(write)
        return write

    def submit(self, batch: _Batch) -> None:
        """Wait for room, then add ``batch`` to the outbox and wake the loop if no hand-over is pending."""
        nbytes = batch.host.nbytes
        with self._cond:
            waited_from = None
            while (
                self._error is None
                and not self._stopping
                and self._held_bytes > 0
                and self._held_bytes + nbytes > self.max_queue_bytes
            ):
                if waited_from is None:
                    waited_from = time.perf_counter()
                self._cond.wait(_WAKE_EVERY)
            if waited_from is not None:
                self._stall += time.perf_counter() - waited_from
            if self._stopping:
                raise SinkStateError(
                    f"put() raced {'abort' if self._stopping == 'aborted' else 'commit'}(): {self.url} is "
                    f"{self._stopping}; the batch was not queued"
                )
            self.raise_if_failed()
            self._held_bytes += nbytes
            self._pending += 1
            self._batches += 1
            self._high_water = max(self._high_water, self._held_bytes)
            self._outbox.append(batch)
            if self._hand_over_scheduled:
                return
            self._hand_over_scheduled = True
        # The waker thread wakes the loop: the caller's thread never gives up the GIL here. Waking the loop
        # itself (call_soon_threadsafe writes to a socket) releases the GIL for the system call, and on a busy
        # machine the caller then waited milliseconds to get it back from the loop and the encoders.
        self._wakes.put(True)

    def _wake_loop(self) -> None:
        """The waker thread: one event-loop wake-up per hand-over that ``submit`` scheduled."""
        loop = self._loop
        assert loop is not None
        while self._wakes.get():
            try:
                # Not portal.start_task_soon: it waits for the loop to accept the task. This only wakes the loop.
                loop.call_soon_threadsafe(self._hand_over)
            except RuntimeError as exc:  # the loop is closed: nothing queued can be written any more
                self._fail(exc, [])
                return

    def _release(self, nbytes: int, recycle: list[np.ndarray] | None = None) -> None:
        """Free a batch's place in the queue. ``recycle``: its staging buffers, given only once every object made
        from them was stored at the first attempt (a write that failed or timed out may still read them)."""
        with self._cond:
            self._held_bytes -= nbytes
            self._pending -= 1
            if recycle is not None:  # (pooled and queued bytes together stay within max_queue_bytes)
                self.pool.give_back(recycle, self.max_queue_bytes - self._held_bytes)
            self._cond.notify_all()

    def _fail(self, exc: BaseException, keys: Sequence[str]) -> None:
        with self._cond:
            self._failed += len(keys)
            if len(self._failed_ids) < _FAILED_IDS_KEPT:
                self._failed_ids.extend(keys[: _FAILED_IDS_KEPT - len(self._failed_ids)])
            if self._error is None:
                self._error = exc
                logger.error("writing to %s failed: %s: %s", self.url, type(exc).__name__, exc)
            else:
                self._error_count += 1
            self._cond.notify_all()

    def raise_if_failed(self) -> None:
        error = self._error
        if error is None:
            return
        if self._open_error is not None:
            raise self._open_error  # the url could not be prepared: that error, as the caller would have had it
        reason = f"{type(error).__name__}: {error}"
        raise WriteError(self.url, self._failed_ids, reason, failures=1 + self._error_count) from error

    @property
    def failed(self) -> bool:
        return self._error is not None

    def wait_drained(self) -> None:
        with self._cond:
            while self._pending and self._error is None:
                self._cond.wait(_WAKE_EVERY)
        self.raise_if_failed()

    def flush(self) -> None:
        self.wait_drained()
        assert self._portal is not None
        self._call(self._flush_rank)

    async def _wait_opened(self) -> None:
        if self._deferred_open:
            assert self._opened is not None
            await self._opened.wait()
            if self._open_error is not None:
                raise self._open_error

    async def _flush_rank(self) -> None:
        await self._wait_opened()
        if self._writer is not None:
            self._records.extend(await self._writer.flush())
        await self._write_part()
        if self.durable:  # what the parts record is on disk before anything can vouch for it
            assert self._store is not None
            await self._store.sync()

    def commit(self) -> None:
        with self._cond:  # a put racing the commit on another thread raises instead of being left out
            self._stopping = "committing"
            self._cond.notify_all()
        self.state = SinkState.COMMITTING
        assert self.all_ok is not None
        assert self._portal is not None
        committed = False
        try:
            local_error: BaseException | None = None
            try:
                self.flush()
            except Exception as exc:
                local_error = exc
            if not self.all_ok(local_error is None):
                if local_error is not None:
                    raise local_error
                raise CommitError(f"another rank failed to write its predictions; {self.url} was not committed")
            commit_error: BaseException | None = None
            if self.rank == 0:
                try:
                    self.summary = self._call(self._commit_rank0, self._summary_base())
                except Exception as exc:
                    commit_error = exc
            if not self.all_ok(commit_error is None):
                if commit_error is not None:
                    raise CommitError(f"committing {self.url} failed: {commit_error}") from commit_error
                raise CommitError(f"rank 0 failed to commit {self.url}; see its error")
            committed = True
        finally:
            self._shutdown(abort=not committed)
            self.state = SinkState.COMMITTED if committed else SinkState.ABORTED
        if self.summary is not None:
            logger.info(
                "committed %d predictions (%.1f MB) to %s in %.2fs",
                self.summary["count"],
                self.summary["bytes"] / 1e6,
                self.url,
                self.summary["seconds"],
            )

    def _summary_base(self) -> dict[str, Any]:
        stats = self.stats()
        return {
            "format": self.format.name,
            "world_size": self.world_size,
            "version": __version__,
            "manifest": self.keys.manifest,
            "marker": self.keys.success,
            "seconds": round(stats.elapsed_seconds, 6),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "mode": self.mode,
            "key": self.key.template,
            "run": self._run,
            "generation": self._generation,
            "rank0_stats": stats.as_dict(),
        }

    def progress(self) -> tuple[int, float, float]:
        """Queued bytes, stored MB/s and stall seconds: what a progress bar shows, without sorting latencies."""
        end = self._closed_at if self._closed_at is not None else time.perf_counter()
        elapsed = (end - self._opened_at) if self._opened_at else 0.0
        with self._cond:
            return self._held_bytes, (self._bytes / 1e6 / elapsed if elapsed > 0 else 0.0), self._stall

    def stats(self) -> SinkStats:
        end = self._closed_at if self._closed_at is not None else time.perf_counter()
        latencies = list(self._latencies)
        with self._cond:
            return SinkStats(
                items=self._items,
                bytes=self._bytes,
                batches=self._batches,
                stall_seconds=self._stall,
                queue_bytes=self._held_bytes,
                queue_high_water_bytes=self._high_water,
                write_seconds_p50=_percentile(latencies, 0.5),
                write_seconds_p99=_percentile(latencies, 0.99),
                retries=self._store.retries if self._store is not None else 0,
                failed=self._failed,
                skipped=self._skipped,
                elapsed_seconds=(end - self._opened_at) if self._opened_at else 0.0,
            )

    def _shutdown(self, *, abort: bool) -> None:
        portal = self._portal
        if portal is None:
            return
        # A KeyboardInterrupt raised right after this thread took the lock, inside Condition.__enter__ and so
        # before its `with` block began, leaves the lock held for good (a CPython limitation of Python-level
        # __enter__); the loop's workers need it to wind down. Release what this thread holds; the lock is
        # reentrant, and releasing one this thread does not hold raises RuntimeError.
        with contextlib.suppress(RuntimeError):
            while True:
                self._cond.release()
        try:
            waker, self._waker = self._waker, None
            if waker is not None:
                # Every hand-over scheduled so far reaches the loop before the stop does.
                self._wakes.put(False)
                while waker.is_alive():
                    waker.join(_WAKE_EVERY)
            self._call(self._stop, abort)
            if self._service is not None:
                with contextlib.suppress(Exception):
                    _result(self._service)
            if abort and self._store is not None:
                # The workers and the open are over or abandoned: a thread stuck in a write and woken later
                # makes nothing appear, not even once the lease below is given up and another run writes.
                self._store.fence()
            with contextlib.suppress(Exception):
                self._call(self._aclose_store)
        finally:
            self.pool.close()
            with self._cond:
                self._cond.notify_all()
            if abort:  # a flush or commit another thread still waits for is cancelled, not waited for
                with contextlib.suppress(Exception):
                    portal.call(portal.stop, True)
            self._portal = None
            assert self._portal_cm is not None
            self._portal_cm.__exit__(None, None, None)
            self._portal_cm = None
            self._closed_at = time.perf_counter()

    # ------------------------------------------------------------------ the event loop's side

    async def _aopen(self) -> None:
        self._part_lock = anyio.Lock()
        self._lease_lock = anyio.Lock()
        self._loop = asyncio.get_running_loop()
        self._store = await open_store(
            self.url,
            self.storage_options,
            concurrency=self.concurrency,
            retry=self.retry,
            backend=self.backend,
            upload_checksums=self.upload_checksums,
            run=self._run,
            temp_prefix=self.keys.temp_prefix,
            durable=self.durable,
        )
        if not self.format.per_item_objects:
            context = WriterContext(
                url=self.url,
                storage_options=self.storage_options,
                store=self._store,
                rank=self.rank,
                world_size=self.world_size,
                num_samples=self.num_samples,
                mode=self.mode,
                scratch=self.keys.scratch,
            )
            self._writer = self.format.open_writer(context)

    async def _prepare_destination(self) -> None:
        try:
            await self._prepare_store()
        except DestinationError:
            raise
        except Exception as exc:
            raise DestinationError(f"cannot prepare {self.url}: {type(exc).__name__}: {exc}") from exc

    async def _prepare_store(self) -> None:
        """Rank 0: take the output (its lease), then make it what ``mode`` says before anything is written."""
        store = self._store
        assert store is not None
        if store.is_local:
            await anyio.to_thread.run_sync(check_local_destination, local_path(self.url))
        keys = self.keys
        if self.mode == "error":
            existing = await store.list()
            if existing:
                raise DestinationError(
                    f"{self.url} already holds {len(existing)} objects (for example {existing[0]!r}) and "
                    "mode='error' refuses a non-empty url; use mode='overwrite' or mode='resume'"
                )
        lease, previous = await acquire_lease(store, keys, self._run)
        self._lease = lease  # (held from here on: an abort releases it)
        if self.mode == "resume" and (previous is None or previous.state == "running"):
            # The generation resumed: the dead or finished run's, else the committed output's.
            if previous is not None:
                generation = previous.generation
            else:
                generation = await stored_generation(store, keys) or self._run
            lease = await self._set_lease(lease.renewed(generation=generation, state="running"))
            await store.delete([keys.success])  # a stale marker must never vouch for this run
            await store.remove_incomplete()
            if self.format.per_item_objects:
                await self._adopt_orphans(generation)
        else:
            # overwrite, error, or a resume of a run that died before it wrote (while it removed an earlier
            # output, say): a new generation, and nothing of the earlier one may stay reachable before it writes.
            lease = await self._set_lease(lease.renewed(generation=self._run, state="clearing"))
            await self._clear_output()
            lease = await self._set_lease(lease.renewed(state="running"))
        self._generation = lease.generation

    async def _set_lease(self, lease: Lease) -> Lease:
        assert self._store is not None
        await self._store.put(self.keys.lease, [lease.to_bytes()])
        self._lease = lease
        return lease

    def _owned(self, key: str) -> bool:
        return owned_key(key, self.format, self.key)

    async def _clear_output(self) -> None:
        """Overwrite: remove the earlier output (marker first), everything it recorded, and every object this
        output's format and key could have written, so that nothing of it can be adopted or listed later."""
        store = self._store
        assert store is not None
        keys = self.keys
        await store.delete([keys.success])
        recorded = {record.path for record in (await read_records(store, keys, None)).values()}
        control = (keys.parts + "/", keys.scratch + "/")
        doomed = [
            key
            for key in await store.list()
            if key == keys.manifest or key.startswith(control) or key in recorded or self._owned(key)
        ]
        if doomed:
            logger.info("overwrite: removing %d objects of an earlier run under %s", len(doomed), self.url)
        await store.delete(doomed)
        await store.remove_incomplete()

    async def _adopt_orphans(self, generation: str) -> None:
        """Resume: record what the resumed run stored but could not record (see :func:`orphan_records`)."""
        assert self._store is not None
        records = await orphan_records(self._store, self.keys, generation, self.format, self.key)
        if records:
            await self._store.put(self.keys.part(generation, self._run, self.rank, 0), [encode_records(records)])

    async def _join(self) -> None:
        """Every rank, once rank 0 prepared the output: learn its generation, and on resume what is recorded."""
        store = self._store
        assert store is not None
        if self._generation is None:
            lease = await read_lease(store, self.keys)
            if lease is None:
                raise DestinationError(f"rank 0's lease of {self.url} is missing; another run removed it")
            self._generation = lease.generation
        if self.mode == "resume":
            recorded = await read_records(store, self.keys, self._generation)
            if self.format.per_item_objects:
                self._stored = {record.path for record in recorded.values()}
            else:  # rows of an array or a table
                self._stored = {self.key.render(i) for i in recorded}

    async def _keep_lease(self) -> None:
        """Rank 0: renew the lease while the run lives; losing it fails the run (another run took the output)."""
        store = self._store
        assert store is not None and self._lease_lock is not None
        renewed_at = time.monotonic()
        with anyio.CancelScope() as self._lease_scope:
            while True:
                await anyio.sleep(RENEW_SECONDS)
                async with self._lease_lock:
                    if self._lease is None:
                        return
                    try:
                        self._lease = await renew_lease(store, self.keys, self._lease)
                        renewed_at = time.monotonic()
                    except CommitError as exc:
                        self._fail(exc, [])
                        return
                    except Exception as exc:
                        if time.monotonic() - renewed_at > LEASE_SECONDS:
                            self._fail(CommitError(f"could not renew the lease of {self.url}: {exc!r}"), [])
                            return
                        logger.warning("renewing the lease of %s failed, trying again: %r", self.url, exc)

    async def _release_lease(self, *, committed: bool) -> None:
        """Give the output up: delete the lease once the run committed, or aborted while writing (its parts say
        which generation a resumed run continues); an abort before that leaves it marked released, so that a
        resumed run knows the earlier output may be half removed and starts a new generation."""
        store = self._store
        if store is None or self._lease_lock is None:
            return
        async with self._lease_lock:
            lease, self._lease = self._lease, None
            if lease is None:
                return
            held = await read_lease(store, self.keys)
            if held is None or held.run != lease.run:
                return
            if committed or lease.state == "running":
                await store.delete([self.keys.lease])
            else:
                await store.put(self.keys.lease, [lease.renewed(released=True).to_bytes()])

    async def _serve(self, *, task_status: TaskStatus[None]) -> None:
        send, receive = anyio.create_memory_object_stream[list[_Batch]](math.inf)
        self._send = send
        self._opened = anyio.Event()
        with anyio.CancelScope() as scope, receive:
            self._worker_scope = scope
            task_status.started()
            if self._deferred_open:
                try:
                    # Shielded: even a run aborted at once must not leave an older run's _SUCCESS vouching for
                    # this url, so the preparation that removes it completes; an abort bounds it by `timeout`.
                    with anyio.CancelScope(shield=True) as self._open_scope:
                        await self._aopen()
                        await self._prepare_destination()
                        await self._join()
                except Exception as exc:
                    self._open_error = exc
                    self._fail(exc, [])
                finally:
                    self._opened.set()
            try:
                async with anyio.create_task_group() as tg:
                    if self._lease is not None:
                        tg.start_soon(self._keep_lease)
                    store = self._store
                    if self._writer is None and store is not None and not store.supports_write_many:
                        # Object stores: a few workers encode groups off the loop and hand each object to a
                        # fixed pool of `concurrency` uploaders (no task, no queueing under a timeout per object).
                        # An asyncio queue, not an anyio stream: the loop is asyncio by design, and anyio's
                        # checkpoints and events (each looking up the running library) were a quarter of the
                        # loop's time on tiny objects. Bounded to one: encoders run at most one object ahead.
                        uploads: asyncio.Queue[tuple[_Upload, int] | None] = asyncio.Queue(1)
                        for _ in range(self.concurrency):
                            tg.start_soon(self._uploader, store, uploads)
                        async with anyio.create_task_group() as encoders:
                            for _ in range(min(self.concurrency, _ENCODERS)):
                                encoders.start_soon(self._worker, receive.clone(), uploads)
                        for _ in range(self.concurrency):
                            await uploads.put(None)  # every group was handed over: the uploaders finish
                    else:
                        for _ in range(self.concurrency):
                            tg.start_soon(self._worker, receive.clone(), None)
            finally:
                # Cancelled (abort): what was queued will never be written; wake any put waiting for room.
                with self._cond:
                    self._held_bytes = self._pending = 0
                    self._cond.notify_all()

    def _hand_over(self) -> None:
        with self._cond:
            batches, self._outbox = self._outbox, []
            self._hand_over_scheduled = False
        assert self._send is not None
        # Groups bounded in items and bytes: small predictions share thread hops, big ones spread over workers.
        group: list[_Batch] = []
        items = size = 0
        for batch in batches:
            count = len(batch.ids)
            nbytes = batch.host.nbytes
            if group and (items + count > _GROUP_ITEMS or size + nbytes > _GROUP_BYTES):
                self._send.send_nowait(group)
                group, items, size = [], 0, 0
            group.append(batch)
            items += count
            size += nbytes
        if group:
            self._send.send_nowait(group)

    async def _worker(
        self,
        receive: MemoryObjectReceiveStream[list[_Batch]],
        uploads: asyncio.Queue[tuple[_Upload, int] | None] | None,
    ) -> None:
        async with receive:
            async for group in receive:
                handed_over = stored = False
                try:
                    if self._error is None:
                        if uploads is None:
                            retries = _retries(self._store)
                            await self._write_group(group)
                            # (a failed object fails the sink, a retried one counts: either way no recycling)
                            stored = self._writer is None and self._error is None and _retries(self._store) == retries
                        else:
                            contiguous = self._store is not None and self._store.contiguous_writes
                            encoded = await anyio.to_thread.run_sync(self._encode, group, contiguous)
                            upload = _Upload(group, encoded, [None] * len(encoded), len(encoded), time.perf_counter())
                            upload.retries = _retries(self._store)
                            handed_over = bool(encoded)  # from here on, the upload of its last object releases it
                            for index in range(len(encoded)):
                                await uploads.put((upload, index))
                except Exception as exc:
                    self._fail(exc, [i for b in group for i in b.ids])
                finally:
                    if not handed_over:
                        for batch in group:
                            self._release(batch.host.nbytes, batch.host.pooled if stored else None)

    async def _uploader(self, store: Store, uploads: asyncio.Queue[tuple[_Upload, int] | None]) -> None:
        while (job := await uploads.get()) is not None:
            upload, index = job
            path, record, buffers = upload.encoded[index]
            if self._error is None:
                try:
                    await store.put(path, buffers, int(record.crc32, 16))  # the upload checksum, where sent
                except Exception as exc:
                    upload.errors[index] = exc
            else:
                upload.errors[index] = _NOT_WRITTEN
            upload.left -= 1
            if not upload.left:
                await self._uploaded(upload)

    async def _uploaded(self, upload: _Upload) -> None:
        """Every object of a group was tried: record what was stored, report what failed, free its bytes."""
        stored = False
        try:
            self._latencies.append(time.perf_counter() - upload.started)
            await self._settle(upload.encoded, upload.errors)
            stored = self._error is None and _retries(self._store) == upload.retries
        except Exception as exc:
            self._fail(exc, [i for b in upload.group for i in b.ids])
        finally:
            for batch in upload.group:
                self._release(batch.host.nbytes, batch.host.pooled if stored else None)

    async def _settle(self, encoded: Sequence[_Encoded], errors: Sequence[BaseException | None]) -> None:
        stored = [record for (_, record, _), error in zip(encoded, errors, strict=True) if error is None]
        self._items += len(stored)
        self._bytes += sum(r.nbytes for r in stored)
        self._records.extend(stored)
        failed = [
            (record.id, e) for (_, record, _), e in zip(encoded, errors, strict=True) if e not in (None, _NOT_WRITTEN)
        ]
        if failed:
            self._fail(failed[0][1], [i for i, _ in failed])
        elif len(self._records) >= _PART_RECORDS:
            await self._write_part()

    def _encode(self, group: Sequence[_Batch], contiguous: bool = False) -> list[_Encoded]:
        out = []
        extension = self.format.extension
        fmt = self.format
        for batch in group:
            values = batch.host.ready()
            encoded = fmt.encode_rows(values) if isinstance(values, torch.Tensor) else fmt.encode_batch(values)
            for identifier, key, item in zip(batch.ids, batch.keys, encoded, strict=True):
                # one body for object stores, joined here on a worker thread rather than on the event loop (small
                # ones for every store: one small buffer costs any store less than two)
                buffers = item.buffers
                if len(buffers) > 1 and (contiguous or item.nbytes < _GIL_FREE_COPY):
                    buffers = (_joined(buffers, item.nbytes),)
                crc = 0
                for buffer in buffers:
                    crc = crc32(buffer, crc)
                path = key + extension
                record = Record(identifier, path, item.nbytes, f"{crc:08x}", item.shape, item.dtype)
                out.append((path, record, buffers))
        return out

    async def _write_rows(self, group: Sequence[_Batch]) -> None:
        writer = self._writer
        assert writer is not None
        started = time.perf_counter()
        for batch in group:
            records = await writer.write(batch.ids, batch.host.samples())
            self._items += len(records)
            self._bytes += sum(r.nbytes for r in records)
            self._records.extend(records)
        self._latencies.append(time.perf_counter() - started)
        if len(self._records) >= _PART_RECORDS:
            await self._write_part()

    async def _write_group(self, group: Sequence[_Batch]) -> None:
        if self._writer is not None:
            await self._write_rows(group)
            return
        store = self._store
        assert store is not None
        started = time.perf_counter()
        write_many = store.write_many
        assert store.supports_write_many, "stores without write_many go through the uploaders"
        # Encode and write in the same worker thread: one hop per group instead of two.
        encoded: list[_Encoded] = []

        since = store.fence_epoch  # (encoding may be what got stuck: a format's own writer function)

        def encode_and_write() -> list[BaseException | None]:
            encoded.extend(self._encode(group))
            return write_many([(path, buffers) for path, _, buffers in encoded], since)

        try:  # bounded: a write stuck in the kernel (a dead mount) fails the group, retried as a timeout
            errors = await store.run_bounded(encode_and_write, f"writing {len(group)} batches of predictions")
        except TimeoutError as exc:
            if not encoded:
                raise  # still encoding: the group fails with its ids
            errors = [exc] * len(encoded)
        errors = await store.retry_failed([(path, buffers) for path, _, buffers in encoded], errors)
        self._latencies.append(time.perf_counter() - started)
        await self._settle(encoded, errors)

    async def _write_part(self) -> None:
        """Store the records not yet in a part. They are let go only once stored: after a failed attempt they stay
        for the next one (a flush called again, the commit), which writes the same part key again."""
        assert self._part_lock is not None
        assert self._store is not None
        async with self._part_lock:
            if not self._records:
                return
            assert self._generation is not None
            count = len(self._records)  # (workers only append: the first `count` are this part's)
            key = self.keys.part(self._generation, self._run, self.rank, self._part_seq + 1)
            await self._store.put(key, [encode_records(self._records[:count])])
            del self._records[:count]
            self._part_seq += 1

    async def _commit_rank0(self, summary: dict[str, Any]) -> dict[str, Any]:
        store = self._store
        assert store is not None and self._generation is not None and self._lease is not None
        keys = self.keys
        if self._writer is not None:
            await self._writer.commit(await read_records(store, keys, self._generation))
            if self.durable:  # (what the format wrote at commit, a zarr array's metadata say; tables fsync their own)
                await store.sync()
        count, nbytes = await merge_parts(store, keys, self._generation)
        summary = {**summary, "count": count, "bytes": nbytes}
        # Only the run that owns the output commits; the marker goes last (S3 has no rename), and then the
        # output is given up.
        await check_lease(store, keys, self._lease)
        await write_success(store, keys, summary)
        try:
            await self._release_lease(committed=True)
        except Exception as exc:  # committed all the same: the lease runs out on its own
            logger.warning("committed %s, but its lease could not be removed: %r", self.url, exc)
        return summary

    async def _stop(self, abort: bool) -> None:
        if self._lease_scope is not None:
            self._lease_scope.cancel()
        if abort and self._open_scope is not None:
            self._open_scope.deadline = anyio.current_time() + (self.retry.timeout or 60.0)
        if abort and self._worker_scope is not None:
            self._worker_scope.cancel()
        if self._send is not None:
            self._send.close()

    async def _aclose_store(self) -> None:
        with anyio.CancelScope(shield=True):
            # Best effort, briefly: an abort is prompt, and a lease left behind runs out on its own.
            with anyio.move_on_after(min(self.retry.timeout or _RELEASE_SECONDS, _RELEASE_SECONDS)):
                await self._release_lease(committed=False)  # (a no-op after a commit, which deleted it)
            if self._writer is not None:
                await self._writer.aclose()
            if self._store is not None:
                await self._store.aclose()


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
        storage_options: passed to fsspec; never logged nor shown in reprs.
        max_queue_bytes: host bytes queued before ``put`` blocks (a single larger batch is still accepted).
        concurrency: writes in flight at once.
        retries: attempts per object for transient errors (throttling, 5xx, resets, timeouts), the first included.
        timeout: seconds one write attempt may take; with ``retries`` it bounds how long a dead store stalls.
        mode: ``"overwrite"`` replaces a previous run's manifest and marker; ``"error"`` refuses a url that holds
            anything; ``"resume"`` keeps what is stored and skips ids whose object exists.
        key: object key template: ``{id}`` and ``{hash}`` fields (``"{id:08d}"``, ``"{hash:.2}/{id}"``); the
            object of an id is ``{url}/{key}{extension}``.
        backend: ``"fsspec"`` (any url) or ``"obstore"`` (S3 through the Rust object_store client: several
            times fewer CPU cycles per request; ``pip install 'lighter-sink[obstore]'``).
        upload_checksums: have the server verify each upload body. On S3 through s3fs the manifest's CRC-32 is
            sent as the object's checksum (no extra client work); through obstore, obstore's SHA-256. Off, none
            is sent; the manifest's crc32 still lets ``lighter-sink verify`` check every object.
        durable: on local and mounted filesystems, make objects, manifest parts and the manifest durable (synced
            to disk) before ``_SUCCESS`` is written, so that a power loss cannot leave a marker over empty files.
            ``False`` skips the syncs, for scratch space. Object stores are durable once a write is answered.
        num_samples: number of samples in the run, for formats that size their output up front (``zarr``).
        rank: this process's rank; rank 0 prepares the url and commits.
        world_size: number of ranks writing to the url.
        all_ok: a collective that returns True only when every rank passed True (also used as a barrier).
            Defaults to an all-reduce over ``torch.distributed`` when ``world_size > 1``.
        copy: copy CPU tensors and numpy arrays at ``put`` (CUDA tensors on the device), so that the caller may
            reuse or change them once ``put`` returns (output buffers, ``out=``, CUDA graphs). ``False`` saves
            the copy (0.1-0.3 ms per MiB on the caller's thread) for callers that never touch a buffer after
            putting it; one that does gets its later values stored.

    Raises:
        ConfigurationError: an invalid argument (an unknown format lists the known ones).
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        format: str | Format = "npy",
        storage_options: Mapping[str, Any] | None = None,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        concurrency: int = DEFAULT_CONCURRENCY,
        retries: int = 5,
        timeout: float | None = 60.0,
        mode: Mode = "overwrite",
        key: str = "{id}",
        backend: Backend = "fsspec",
        upload_checksums: bool = True,
        durable: bool = True,
        num_samples: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        all_ok: Callable[[bool], bool] | None = None,
        copy: bool = True,
    ) -> None:
        url = os.fspath(url)
        if not isinstance(url, str) or not url:
            raise ConfigurationError(f"url must be a non-empty path or fsspec url, got {url!r}")
        self.url = url.rstrip("/") or url
        self.format = get_format(format)
        if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 0):
            raise ConfigurationError(f"num_samples must be an int >= 0 or None, got {num_samples!r}")
        if self.format.needs_num_samples and num_samples is None:
            raise ConfigurationError(
                f"format {self.format.name!r} needs the number of samples: pass num_samples= "
                "(PredictionSink takes it from the predict dataset's length)"
            )
        self.num_samples = num_samples
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise ConfigurationError(f"storage_options must be a mapping, got {type(storage_options).__name__}")
        if not isinstance(max_queue_bytes, int) or max_queue_bytes < 1:
            raise ConfigurationError(f"max_queue_bytes must be a positive int, got {max_queue_bytes!r}")
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigurationError(f"concurrency must be a positive int, got {concurrency!r}")
        if not isinstance(retries, int) or retries < 1:
            raise ConfigurationError(f"retries must be an int >= 1 (attempts per object), got {retries!r}")
        if timeout is not None and not timeout > 0:
            raise ConfigurationError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        if mode not in _MODES:
            raise ConfigurationError(f"mode must be one of {', '.join(map(repr, _MODES))}, got {mode!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ConfigurationError(f"world_size must be an int >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigurationError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        self.max_queue_bytes = max_queue_bytes
        self.concurrency = concurrency
        self.retry = RetryPolicy(attempts=retries, timeout=timeout)
        self.mode: Mode = mode
        self.key = KeyTemplate(key)
        if backend not in _BACKENDS:
            raise ConfigurationError(f"backend must be one of {', '.join(map(repr, _BACKENDS))}, got {backend!r}")
        self.backend: Backend = backend
        self.upload_checksums = bool(upload_checksums)
        self.copy = bool(copy)
        self.durable = bool(durable)
        self.rank = rank
        self.world_size = world_size
        self._checked: set[tuple[object, ...]] = set()
        self._engine = _Engine(self, dict(storage_options or {}), all_ok)

    def __repr__(self) -> str:
        return (
            f"<Sink {self.url!r} format={self.format.name!r} state={self.state.value} "
            f"rank={self.rank}/{self.world_size}>"
        )

    @property
    def state(self) -> SinkState:
        return self._engine.state

    @property
    def summary(self) -> dict[str, Any] | None:
        """The ``_SUCCESS`` summary once committed (on rank 0), else ``None``."""
        return self._engine.summary

    @property
    def failed(self) -> bool:
        """Whether a background write failed (the next ``put`` will raise it)."""
        return self._engine.failed

    @property
    def stats(self) -> SinkStats:
        """A consistent snapshot of the counters (cheap; safe to call from any thread)."""
        return self._engine.stats()

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
        engine = getattr(self, "_engine", None)
        if engine is not None and engine.state in (SinkState.RUNNING, SinkState.COMMITTING):
            warnings.warn(
                f"{self!r} was garbage-collected while open; nothing was committed. "
                "Use it as a context manager or call close().",
                ResourceWarning,
                stacklevel=2,
                source=self,
            )
            with contextlib.suppress(Exception):
                engine.abort(vote=False)  # (the garbage collector's thread takes part in no agreement)

    def open(self) -> Self:
        """Start the event loop and the workers, and prepare the url according to ``mode``.

        Raises:
            DestinationError: the url cannot receive predictions (a regular file, cannot be created, not empty
                with ``mode="error"``).
            SinkStateError: the sink was already opened.
        """
        if self.state is not SinkState.NEW:
            raise SinkStateError(f"open() needs a new sink; this one is {self.state.value}")
        self._engine.open()
        logger.debug("opened %r", self)
        return self

    def put(self, identifier: int | str, value: object) -> None:
        """Queue one prediction (one sample) under ``identifier``.

        Blocks only while the queue holds ``max_queue_bytes``.

        Raises:
            WriteError: an earlier background write failed (chained to the storage error).
            IdentifierError: the identifier cannot be an object key.
            PredictionError: the value is not a tensor the format can store.
            SinkStateError: the sink is not running.
        """
        self.put_batch([identifier], [value])

    def put_batch(self, identifiers: Sequence[int | str], values: object) -> None:
        """Queue a batch: ``values`` is a tensor whose dim 0 matches ``identifiers``, or one tensor per id.

        The batch stays one queue item: the caller pays one hand-off per batch, not per sample. An id may be put
        once per run, and two ids may not give one key. Raises as :meth:`put`, and :class:`IdentifierError` for a
        repeated id or a key another id has.
        """
        self._put(validate_identifiers(identifiers), values, unique=False)

    def _put(self, ids: list[str], values: object, *, unique: bool) -> None:
        """Queue validated ids; ``unique`` says they cannot repeat (counter ids)."""
        engine = self._engine
        engine.check_running("put")
        engine.raise_if_failed()
        count = _num_samples(values)
        if count != len(ids):
            raise PredictionError(f"got {count} predictions for {len(ids)} ids; expected one per id")
        keys = [self.key.render(i) for i in ids]
        # Ids that cannot repeat (the counter's) need no check when distinct ids give distinct keys.
        check = not unique or not self.key.injective
        if check:
            engine.check_unique(ids, keys)
        write = engine.split_stored(keys)
        if not write:
            return
        if len(write) != len(ids):
            values = _select(values, write)
            ids = [ids[i] for i in write]
            keys = [keys[i] for i in write]
        host = stage(values, len(ids), copy=self.copy, pool=engine.pool)
        self._check(host)
        if check:
            engine.claim(ids, keys)  # only once the batch is accepted: a refused batch may be put again
        engine.submit(_Batch(ids, keys, host))

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
        self._engine.check_running("flush")
        self._engine.flush()

    def commit(self) -> None:
        """Flush, then (on rank 0, once every rank flushed without error) write the manifest and ``_SUCCESS``.

        Every rank calls it; it returns on every rank or raises on every rank. The sink is closed afterwards.

        Raises:
            WriteError: this rank's writes failed; nothing was committed.
            CommitError: another rank failed, or the manifest or marker could not be written.
        """
        self._engine.check_running("commit")
        self._engine.commit()

    def close(self) -> None:
        """Commit if still running; do nothing if already committed or aborted."""
        if self.state is SinkState.RUNNING:
            self.commit()
        elif self.state is SinkState.NEW:
            self._engine.state = SinkState.ABORTED

    def abort(self) -> None:
        """Stop the workers without committing. Safe to call in any state, and more than once."""
        self._engine.abort()


_GIL_FREE_COPY = 64 * 2**10
_RELEASE_SECONDS = 5.0
_CHECKED_KINDS = 256


def _retries(store: Store | None) -> int:
    return store.retries if store is not None else -1


def _joined(buffers: Sequence[Buffer], nbytes: int) -> Buffer:
    """The buffers as one ``bytearray`` (a body botocore and aiohttp send as it is, without a further copy).

    Large bodies are copied by numpy, which releases the GIL while it copies (``bytes.join`` holds it for
    anything but ``bytes`` parts), so the event loop keeps running while a worker builds the next body.
    """
    if nbytes < _GIL_FREE_COPY:
        return bytearray().join(buffers)
    body = bytearray(nbytes)
    view = np.frombuffer(body, dtype=np.uint8)
    position = 0
    for buffer in buffers:
        part = np.frombuffer(buffer, dtype=np.uint8)
        view[position : position + part.size] = part
        position += part.size
    return body


def _num_samples(values: object) -> int:
    if isinstance(values, list | tuple):
        return len(values)
    if isinstance(values, torch.Tensor) and values.is_nested:
        return values.size(0)  # (a nested tensor has no shape; staging refuses it with the reason)
    shape = getattr(values, "shape", None)
    if shape is None:
        raise PredictionError(
            f"predictions must be a batched tensor or a list of tensors, got {type(values).__name__}; "
            "return tensors from predict_step, or a dict and name the entry with value_key"
        )
    if len(shape) == 0:
        raise PredictionError("the prediction batch is a 0-dim tensor; expected a batch with samples along dim 0")
    return int(shape[0])


def _select(values: object, positions: list[int]) -> object:
    if isinstance(values, list | tuple):
        return [values[i] for i in positions]
    return values[positions]  # type: ignore[index]
