"""The caller's side of a sink: checking ids, the bounded hand-off to the event loop, and its errors.

``put`` runs on the caller's thread and must cost microseconds: it checks the batch's ids, waits only while the
queue holds ``max_queue_bytes`` or :data:`MAX_QUEUED_ITEMS` predictions (a condition variable, woken every
:data:`WAKE_EVERY` seconds so that Ctrl-C stays prompt), appends the batch to an outbox and, when no hand-over is
pending, tells the waker thread. The waker wakes the event loop, which takes the whole outbox at once: the
caller's thread makes no system call and never gives up the GIL. The first background error is kept here and
raised on the caller's thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from lighter_sink._errors import IdentifierError, SinkStateError, WriteError
from lighter_sink._ids import KeyTemplate
from lighter_sink._idset import IdSet
from lighter_sink._staging import BufferPool, HostBatch

__all__ = ["MAX_QUEUED_ITEMS", "ROW_FROM", "WAKE_EVERY", "Batch", "Handoff", "wait_for"]

logger = logging.getLogger(__name__)

# The caller's thread never blocks without a timeout: a signal (Ctrl-C) may be delivered to any thread, and a
# main thread blocked in a lock is not woken by one that went elsewhere; waking up this often lets the
# interpreter raise KeyboardInterrupt promptly.
WAKE_EVERY = 0.25
_FAILED_IDS_KEPT = 100
#: Predictions queued before ``put`` blocks, whatever their bytes. Each queued prediction holds its id and key as
#: Python strings (about 130 bytes), which ``max_queue_bytes`` does not count: tiny predictions put faster than
#: they were stored queued by the million (650,000 of 4 float32 at a 10^6 run's last put, 10 MB of tensors and
#: some 85 MB of strings), and the strings, freed as they were written, left the allocator's memory fragmented.
MAX_QUEUED_ITEMS = 2**17
# Keys of checked ids kept with their ids (about 100 bytes each) before they move into the run's IdSet.
_RECENT_KEYS = 2**16
#: Single predictions of at most this many bytes are copied into an array shared with the others of their kind.
ROW_FROM = 4096
ROWS_BYTES = 64 * 2**10  # of one such array (at most ROWS_MAX rows)
ROWS_MAX = 1024
T = TypeVar("T")


def wait_for(future: Future[T]) -> T:
    """``future.result()``, waited for in slices so that the calling thread stays interruptible."""
    while True:
        try:
            return future.result(timeout=WAKE_EVERY)
        except TimeoutError:
            if future.done():
                raise  # the call itself raised TimeoutError
            continue


@dataclass(slots=True)
class Batch:
    ids: list[str]
    keys: list[str]  # object keys without the extension
    host: HostBatch


class _Rows:
    """Single predictions of one kind (dtype and shape) copied into one array as they are put: one batch.

    ``Sink.put`` of a small CPU tensor made a tensor, a host batch, a batch and two lists per prediction: each a
    thread hop's worth of work for the workers, and objects the garbage collector walked again and again while
    they were queued (two full collections, a sixth of the run, for 20,000 queued puts). Copied here, the
    predictions put while the workers are busy become one batch, encoded as the rows of one array.
    """

    __slots__ = ("array", "count", "ids", "keys", "kind")

    def __init__(self, sample: np.ndarray) -> None:
        capacity = max(1, min(ROWS_MAX, ROWS_BYTES // max(1, sample.nbytes)))
        self.kind = (sample.dtype, sample.shape)
        self.array = np.empty((capacity, *sample.shape), sample.dtype)
        self.count = 0
        self.ids: list[str] = []
        self.keys: list[str] = []

    def batch(self) -> Batch:
        rows = self.array[: self.count]
        if self.count * 4 < len(self.array):
            rows = rows.copy()  # (a mostly empty array would hold more memory than the queue's bound counts)
        values = torch.from_numpy(rows)
        return Batch(self.ids, self.keys, HostBatch(values, self.count, values.nbytes))


class Handoff:
    """The queue between the caller and the loop, bounded in host bytes, with the run's first error.

    Every field is guarded by :attr:`cond` (a reentrant condition): the caller's thread, the waker and the loop's
    workers all take it, briefly.
    """

    def __init__(self, url: str, max_queue_bytes: int, key: KeyTemplate) -> None:
        self.url = url
        self.max_queue_bytes = max_queue_bytes
        self.key = key
        self.cond = threading.Condition()
        self.pool = BufferPool()  # staging buffers of stored batches, for later puts to copy into
        self.held_bytes = 0
        self.held_items = 0
        self.pending = 0
        self.high_water = 0
        self.stall = 0.0
        self.batches = 0
        self.failed_count = 0
        self.skipped = 0
        self.error: BaseException | None = None
        self.open_error: BaseException | None = None  # the url could not be prepared (a deferred open)
        self._error_count = 0
        self._failed_ids: list[str] = []
        self._stopping = ""  # why put refuses batches from now on: "aborted" or "committing"
        # The keys put in this run, for ids that are checked: the latest with their ids (a dict, a lookup in C),
        # older ones moved into a compact set once there are _RECENT_KEYS of them, so that a run of ten million
        # checked ids holds megabytes, not a gigabyte, until its commit.
        self._seen: dict[str, str] = {}  # key -> the id put under it
        self._older: IdSet | None = None
        self.stored: IdSet | None = None  # resume: the keys whose object is recorded already
        # Batches put but not yet on the event loop. While a hand-over is scheduled and the loop is busy, puts
        # only append here, so one loop wake-up carries many batches and put never waits for the loop.
        self._outbox: list[Batch] = []
        self._hand_over_scheduled = False
        # Whether a worker waits for batches. Only then does a put wake the loop: a busy worker takes the outbox
        # itself once done, so that a stream of single puts does not wake two threads (the waker, the loop) for
        # every batch or two, each wake-up a trip of the interpreter lock between threads.
        self._wanted = False
        self._rows: _Rows | None = None  # the small single predictions put since the last batch: still growing
        self._wakes: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._waker: threading.Thread | None = None

    # ------------------------------------------------------------------ ids

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
        older = self._older
        if older is not None:
            taken = older.positions(keys)
            if taken:
                identifier, key = ids[taken[0]], keys[taken[0]]
                raise self._collision(identifier if self.key.injective else None, identifier, key)
        if not self.key.injective and len(set(keys)) != len(keys):
            first: dict[str, str] = {}
            for identifier, key in zip(ids, keys, strict=True):
                owner = first.setdefault(key, identifier)
                if owner != identifier:
                    raise self._collision(owner, identifier, key)

    def _collision(self, owner: str | None, identifier: str, key: str) -> IdentifierError:
        """``owner``: the id put earlier under ``key``, None when only the key is remembered."""
        if owner == identifier:
            return IdentifierError(f"identifier {identifier!r} was already put in this run; ids must be unique")
        if owner is None:
            return IdentifierError(
                f"identifier {identifier!r} gives the key {key!r}, which an id put earlier in this run has (key "
                f"template {self.key.template!r}); each id needs a key of its own"
            )
        return IdentifierError(
            f"identifiers {owner!r} and {identifier!r} both give the key {key!r} (key template "
            f"{self.key.template!r}); each id needs a key of its own"
        )

    def claim(self, ids: Sequence[str], keys: Sequence[str]) -> None:
        seen = self._seen
        seen.update(zip(keys, ids, strict=True))
        if len(seen) >= _RECENT_KEYS:
            if self._older is None:
                self._older = IdSet()
            self._older.add(list(seen))
            seen.clear()

    def split_stored(self, keys: Sequence[str]) -> list[int]:
        """Resume: the positions whose object is not stored yet (all of them in the other modes)."""
        stored = self.stored
        if stored is None:
            return list(range(len(keys)))
        write = stored.positions(keys, added=False)
        with self.cond:
            self.skipped += len(keys) - len(write)
        return write

    # ------------------------------------------------------------------ the hand-off

    def submit(self, batch: Batch) -> None:
        """Wait for room, then add ``batch`` to the outbox and wake the loop if a worker waits for batches."""
        nbytes = batch.host.nbytes
        with self.cond:
            self._wait_for_room(nbytes, len(batch.ids))
            self._close_rows()
            self.held_bytes += nbytes
            self.held_items += len(batch.ids)
            self.pending += 1
            self.batches += 1
            self.high_water = max(self.high_water, self.held_bytes)
            self._outbox.append(batch)
            if not self._schedule_hand_over():
                return
        # The waker thread wakes the loop: the caller's thread never gives up the GIL here. Waking the loop
        # itself (call_soon_threadsafe writes to a socket) releases the GIL for the system call, and on a busy
        # machine the caller then waited milliseconds to get it back from the loop and the encoders.
        self._wakes.put(True)

    def submit_row(self, identifier: str, key: str, sample: np.ndarray) -> None:
        """:meth:`submit` of one small prediction (``sample``: at most :data:`ROW_FROM` bytes, its memory still
        the caller's), copied into the array of the predictions of its kind put since the last batch."""
        nbytes = sample.nbytes
        with self.cond:
            self._wait_for_room(nbytes, 1)
            rows = self._rows
            if rows is None or rows.kind != (sample.dtype, sample.shape) or rows.count == len(rows.array):
                self._close_rows()
                rows = self._rows = _Rows(sample)
            rows.array[rows.count] = sample
            rows.count += 1
            rows.ids.append(identifier)
            rows.keys.append(key)
            self.held_bytes += nbytes
            self.held_items += 1
            self.batches += 1
            self.high_water = max(self.high_water, self.held_bytes)
            if not self._schedule_hand_over():
                return
        self._wakes.put(True)

    def _wait_for_room(self, nbytes: int, items: int) -> None:
        """Under :attr:`cond`: wait while the queue holds ``max_queue_bytes`` or :data:`MAX_QUEUED_ITEMS`
        predictions (an empty queue takes any batch); raise if the run stopped or failed."""
        waited_from = None
        while (
            self.error is None
            and not self._stopping
            and self.held_items > 0  # (an empty queue takes any batch; bytes are queued only with predictions)
            and (self.held_bytes + nbytes > self.max_queue_bytes or self.held_items + items > MAX_QUEUED_ITEMS)
        ):
            if waited_from is None:
                waited_from = time.perf_counter()
            self.cond.wait(WAKE_EVERY)
        if waited_from is not None:
            self.stall += time.perf_counter() - waited_from
        if self._stopping:
            raise SinkStateError(
                f"put() raced {'abort' if self._stopping == 'aborted' else 'commit'}(): {self.url} is "
                f"{self._stopping}; the batch was not queued"
            )
        self.raise_if_failed()

    def _close_rows(self) -> bool:
        """Under :attr:`cond`: the growing batch of single predictions, if any, to the outbox."""
        rows, self._rows = self._rows, None
        if rows is None:
            return False
        self._outbox.append(rows.batch())
        self.pending += 1
        return True

    def _schedule_hand_over(self) -> bool:
        """Under :attr:`cond`: whether to wake the loop (a worker waits, and no hand-over is pending yet)."""
        if self._hand_over_scheduled or not self._wanted:
            return False
        self._hand_over_scheduled = True
        return True

    def take(self) -> list[Batch]:
        """On the loop: every batch handed over so far (the next put schedules a new hand-over if a worker waits)."""
        with self.cond:
            self._close_rows()
            batches, self._outbox = self._outbox, []
            self._hand_over_scheduled = False
            if batches:  # (a worker gets them: the one that waited, or the one that took them)
                self._wanted = False
        return batches

    def want(self) -> bool:
        """On the loop, from a worker about to wait for batches: whether it may (nothing is in the outbox); from
        now on a put wakes the loop."""
        with self.cond:
            if self._outbox or self._rows is not None:
                return False
            self._wanted = True
            return True

    def start_waker(self, loop: asyncio.AbstractEventLoop, hand_over: Callable[[], None]) -> None:
        """Start the waker thread: one ``hand_over`` call on ``loop`` per hand-over that :meth:`submit` scheduled."""

        def wake() -> None:
            while self._wakes.get():
                try:
                    # Not portal.start_task_soon: it waits for the loop to accept the task. This only wakes it.
                    loop.call_soon_threadsafe(hand_over)
                except RuntimeError as exc:  # the loop is closed: nothing queued can be written any more
                    self.fail(exc, [])
                    return

        self._waker = threading.Thread(target=wake, name="lighter-sink-waker", daemon=True)
        self._waker.start()

    def stop_waker(self) -> None:
        """Every hand-over scheduled so far reaches the loop before this returns."""
        waker, self._waker = self._waker, None
        if waker is not None:
            self._wakes.put(False)
            while waker.is_alive():
                waker.join(WAKE_EVERY)

    def stop(self, reason: str) -> None:
        """Refuse every later put (``reason``: "aborted" or "committing"), waking one that waits for room."""
        with self.cond:
            self._stopping = reason
            self.cond.notify_all()

    def release(self, nbytes: int, items: int, recycle: list[np.ndarray] | None = None, batches: int = 1) -> None:
        """Free the place of ``batches`` batches (``nbytes`` and ``items`` predictions in all) in the queue, at
        once. ``recycle``: their staging buffers, given only once every object made from them was stored at the
        first attempt (a write that failed or timed out may still read them)."""
        with self.cond:
            self.held_bytes -= nbytes
            self.held_items -= items
            self.pending -= batches
            if recycle is not None:  # (pooled and queued bytes together stay within max_queue_bytes)
                self.pool.give_back(recycle, self.max_queue_bytes - self.held_bytes)
            self.cond.notify_all()

    def drop_all(self) -> None:
        """The loop's workers were cancelled: what was queued will never be written; wake any put waiting."""
        with self.cond:
            self.held_bytes = self.held_items = self.pending = 0
            self._rows = None
            self.cond.notify_all()

    def wait_drained(self) -> None:
        with self.cond:
            # single predictions still gathering: a batch now, for a worker to take (woken if one waits)
            if self._close_rows() and self._schedule_hand_over():
                self._wakes.put(True)
            while self.pending and self.error is None:
                self.cond.wait(WAKE_EVERY)
        self.raise_if_failed()

    # ------------------------------------------------------------------ errors

    def fail(self, exc: BaseException, keys: Sequence[str]) -> None:
        with self.cond:
            self.failed_count += len(keys)
            if len(self._failed_ids) < _FAILED_IDS_KEPT:
                self._failed_ids.extend(keys[: _FAILED_IDS_KEPT - len(self._failed_ids)])
            if self.error is None:
                self.error = exc
                # Not an error record: the raised WriteError is where the user sees it, once (this only says when)
                logger.debug("writing to %s failed: %s: %s", self.url, type(exc).__name__, exc)
            else:
                self._error_count += 1
            self.cond.notify_all()

    def raise_if_failed(self) -> None:
        error = self.error
        if error is None:
            return
        if self.open_error is not None:
            raise self.open_error  # the url could not be prepared: that error, as the caller would have had it
        reason = f"{type(error).__name__}: {error}"
        raise WriteError(self.url, self._failed_ids, reason, failures=1 + self._error_count) from error
