"""The event loop's side of a sink: workers encode batches off the loop, uploaders store objects, records follow.

Object stores: a few workers encode groups of batches in worker threads and hand each object to a fixed pool of
``concurrency`` uploaders. Local directories (stores that write many objects in one call): each worker encodes
and writes a group in one worker thread, bounded by the store's timeout. Formats that are not one object per
prediction (arrays, tables) get the rows through their writer. What was stored becomes records, written to a
manifest part (sorted by id) every :data:`PART_RECORDS` records and at flush; what failed fails the sink, through
the hand-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import torch
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from lighter_sink._checksum import crc32
from lighter_sink._handoff import Batch, Handoff
from lighter_sink._layout import ControlKeys
from lighter_sink._stats import Samples
from lighter_sink._store import Store
from lighter_sink._types import Buffer, Record, RecordColumns, encode_sorted
from lighter_sink.formats import Format, FormatWriter

__all__ = ["PART_RECORDS", "Engine"]

# Consecutive queued batches one worker takes at once: tiny predictions then cost one thread hop per group.
_GROUP_ITEMS = 1024
_GROUP_BYTES = 8 * 2**20
# Items of a group encoded for the uploaders: they wait for the whole group (a 480-item group of 4 KiB objects took
# 13-16 ms to encode while the uploaders had nothing, a tenth of a 512-object run); a thread hop per 64 objects costs
# them next to nothing.
_UPLOAD_GROUP_ITEMS = 64
# Workers that encode groups for object stores (CPU work in threads; the uploaders give the concurrency).
_ENCODERS = 2
#: Records per manifest part: a killed run loses at most this many records (the objects stay, resume re-lists).
PART_RECORDS = 1024
_LATENCY_SAMPLES = 4096
_GIL_FREE_COPY = 64 * 2**10
# Workers of a store that writes groups in its own threads, beyond its threads: one can settle its group on the
# loop while the others keep every thread busy.
_SPARE_WORKERS = 1

_Encoded = tuple[str, Record, tuple[Buffer, ...]]
# Objects of a group left unwritten because an earlier write failed: neither stored nor counted as failures.
_NOT_WRITTEN = Exception("not written: an earlier write failed")


@dataclass(slots=True, eq=False)
class _Upload:
    """A group whose objects the uploaders store one by one; the last one to finish settles the group."""

    group: Sequence[Batch]
    encoded: list[_Encoded]
    errors: list[BaseException | None]
    left: int
    retries: int = 0  # the store's retry count when the group was handed to it


class _Jobs:
    """The objects an encoder hands to the uploaders: a deque they drain, waiting only when it is empty.

    An ``asyncio.Queue(1)`` cost two futures and two wake-ups per object (a fifth of the loop's time per small
    object); here an encoder hands over a whole group at once and waits until the uploaders took every object of
    it (so encoders stay one group ahead, as before one object), and an uploader waits only when nothing is left.
    """

    def __init__(self) -> None:
        self._items: deque[tuple[_Upload, int] | None] = deque()
        self._takers: deque[asyncio.Future[None]] = deque()  # uploaders waiting for an object
        self._taken = asyncio.Event()  # set whenever the deque is empty
        self._taken.set()

    async def put_all(self, jobs: list[tuple[_Upload, int] | None]) -> None:
        """Hand over ``jobs``; return once every one of them was taken."""
        if not jobs:
            return
        self._items.extend(jobs)
        self._taken.clear()
        for _ in range(min(len(jobs), len(self._takers))):
            waiter = self._takers.popleft()
            if not waiter.done():
                waiter.set_result(None)
        await self._taken.wait()

    async def get(self) -> tuple[_Upload, int] | None:
        items = self._items
        while not items:
            waiter = asyncio.get_running_loop().create_future()
            self._takers.append(waiter)
            try:
                await waiter
            except BaseException:
                with contextlib.suppress(ValueError):
                    self._takers.remove(waiter)
                if waiter.done() and not waiter.cancelled() and items and self._takers:
                    self._takers.popleft().set_result(None)  # (woken, then cancelled: the object goes to another)
                raise
        job = items.popleft()
        if not items:
            self._taken.set()
        return job


class Engine:
    """The workers, the uploaders and the records of one rank; lives on the sink's event loop."""

    def __init__(
        self, handoff: Handoff, fmt: Format, concurrency: int, *, keys: ControlKeys, run: str, rank: int
    ) -> None:
        self.handoff = handoff
        self.format = fmt
        self.concurrency = concurrency
        self.keys = keys
        self.run = run
        self.rank = rank
        self.store: Store | None = None
        self.writer: FormatWriter | None = None
        self.generation: str | None = None  # known once the output is prepared (rank 0) or joined (the others)
        self.items = 0
        self.bytes = 0
        self.latencies = Samples(_LATENCY_SAMPLES)
        # records not yet in a part: lists of records, and columns of a format writer's (a shard's)
        self._records: list[Sequence[Record]] = []
        self._pending = 0
        self._part_seq = 0
        self._part_lock: anyio.Lock | None = None  # made on the loop, at the first part
        self._send: MemoryObjectSendStream[list[Batch]] | None = None
        self._input_closed = False

    def streams(self) -> MemoryObjectReceiveStream[list[Batch]]:
        """The loop's end of the hand-off (unbounded: the caller's side bounds it in bytes)."""
        send, receive = anyio.create_memory_object_stream[list[Batch]](float("inf"))
        self._send = send
        return receive

    def close_input(self) -> None:
        """No more groups: the workers finish what they have and end."""
        self._input_closed = True
        if self._send is not None:
            self._send.close()

    async def serve(
        self,
        receive: MemoryObjectReceiveStream[list[Batch]],
        background: Sequence[Callable[[], Coroutine[Any, Any, None]]],
    ) -> None:
        """Run the workers (and ``background`` tasks) until the input is closed and every group was settled."""
        try:
            async with anyio.create_task_group() as tg:
                for task in background:
                    tg.start_soon(task)
                store = self.store
                if self.writer is None and store is not None and not store.supports_write_many:
                    # Object stores: a few workers encode groups off the loop and hand each object to a fixed pool
                    # of `concurrency` uploaders (no task, no queueing under a timeout per object). Plain asyncio,
                    # not an anyio stream: the loop is asyncio by design, and anyio's checkpoints and events (each
                    # looking up the running library) were a quarter of the loop's time on tiny objects.
                    uploads = _Jobs()
                    for _ in range(self.concurrency):
                        tg.start_soon(self._uploader, store, uploads)
                    async with anyio.create_task_group() as encoders:
                        for _ in range(min(self.concurrency, _ENCODERS)):
                            encoders.start_soon(self._worker, receive.clone(), uploads)
                    await uploads.put_all([None] * self.concurrency)  # every group was handed over: they finish
                else:
                    workers = self.concurrency
                    if self.writer is None and store is not None and store.limiter is not None:
                        # Each group is written in one thread call: workers beyond the store's threads would only
                        # hold small groups waiting for a thread, which the busy ones could have taken together.
                        workers = min(workers, int(store.limiter.total_tokens) + _SPARE_WORKERS)
                    for _ in range(workers):
                        tg.start_soon(self._worker, receive.clone(), None)
        finally:
            self.handoff.drop_all()  # cancelled (abort): what was queued will never be written

    def hand_over(self) -> None:
        """On the loop (woken by the waker, or from a worker done with a group): the outbox, in groups, to the
        workers."""
        if self._input_closed:
            return  # (aborted: what is left is dropped with the workers)
        batches = self.handoff.take()
        assert self._send is not None
        # Groups bounded in items and bytes: small predictions share thread hops, big ones spread over workers.
        limit = self._group_items()
        group: list[Batch] = []
        items = size = 0
        for batch in batches:
            count = len(batch.ids)
            nbytes = batch.host.nbytes
            if group and (items + count > limit or size + nbytes > _GROUP_BYTES):
                self._send.send_nowait(group)
                group, items, size = [], 0, 0
            group.append(batch)
            items += count
            size += nbytes
        if group:
            self._send.send_nowait(group)

    def _group_items(self) -> int:
        """Items in a group: fewer where uploaders take its objects (they wait for it), more where one thread call
        writes it (local directories)."""
        store = self.store
        uploads = self.writer is None and store is not None and not store.supports_write_many
        return _UPLOAD_GROUP_ITEMS if uploads else _GROUP_ITEMS

    async def _worker(
        self,
        receive: MemoryObjectReceiveStream[list[Batch]],
        uploads: _Jobs | None,
    ) -> None:
        handoff = self.handoff
        async with receive:
            while True:
                self.hand_over()  # what was put since: the loop is woken for batches only while a worker waits
                try:
                    first = receive.receive_nowait()
                except anyio.WouldBlock:
                    if not handoff.want():
                        continue  # put meanwhile
                    try:
                        first = await receive.receive()
                    except anyio.EndOfStream:
                        return
                except anyio.EndOfStream:
                    return
                group = _gathered(receive, first, self._group_items())
                handed_over = stored = False
                try:
                    if handoff.error is None:
                        if uploads is None:
                            retries = _retries(self.store)
                            await self._write_group(group)
                            # (a failed object fails the sink, a retried one counts: either way no recycling)
                            stored = self.writer is None and handoff.error is None and _retries(self.store) == retries
                        else:
                            contiguous = self.store is not None and self.store.contiguous_writes
                            encoded = await anyio.to_thread.run_sync(self._encode, group, contiguous)
                            upload = _Upload(group, encoded, [None] * len(encoded), len(encoded))
                            upload.retries = _retries(self.store)
                            handed_over = bool(encoded)  # from here on, the upload of its last object releases it
                            await uploads.put_all([(upload, index) for index in range(len(encoded))])
                except Exception as exc:
                    handoff.fail(exc, [i for b in group for i in b.ids])
                finally:
                    if not handed_over:
                        _release(handoff, group, stored)

    async def _uploader(self, store: Store, uploads: _Jobs) -> None:
        while (job := await uploads.get()) is not None:
            upload, index = job
            path, record, buffers = upload.encoded[index]
            if self.handoff.error is None:
                try:
                    started = time.perf_counter()
                    await store.put(path, buffers, int(record.crc32, 16))  # the upload checksum, where sent
                    self.latencies.append(time.perf_counter() - started)  # one object's write, retries included
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
            await self._settle(upload.encoded, upload.errors)
            stored = self.handoff.error is None and _retries(self.store) == upload.retries
        except Exception as exc:
            self.handoff.fail(exc, [i for b in upload.group for i in b.ids])
        finally:
            _release(self.handoff, upload.group, stored)

    async def _settle(self, encoded: Sequence[_Encoded], errors: Sequence[BaseException | None]) -> None:
        stored = [record for (_, record, _), error in zip(encoded, errors, strict=True) if error is None]
        self.items += len(stored)
        self.bytes += sum(r.nbytes for r in stored)
        self._add_records(stored)
        failed = [
            (record.id, e) for (_, record, _), e in zip(encoded, errors, strict=True) if e not in (None, _NOT_WRITTEN)
        ]
        if failed:
            self.handoff.fail(failed[0][1], [i for i, _ in failed])
        elif self._pending >= PART_RECORDS:
            await self.write_part()

    def _encode(self, group: Sequence[Batch], contiguous: bool = False) -> list[_Encoded]:
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

    async def _write_rows(self, group: Sequence[Batch]) -> None:
        writer = self.writer
        assert writer is not None
        for batch in group:
            started = time.perf_counter()
            records = await writer.write_batch(batch.ids, batch.host.ready())
            self.latencies.append(time.perf_counter() - started)  # one batch's rows
            self.items += len(records)
            if isinstance(records, RecordColumns):
                self.bytes += records.total_bytes()
            else:
                self.bytes += sum(r.nbytes for r in records)
            self._add_records(records)
        if self._pending >= PART_RECORDS:
            await self.write_part()

    async def _write_group(self, group: Sequence[Batch]) -> None:
        if self.writer is not None:
            await self._write_rows(group)
            return
        store = self.store
        assert store is not None
        # Encode and write in the same worker thread: one hop per group instead of two.
        encoded: list[_Encoded] = []
        latencies = self.latencies

        since = store.fence_epoch  # (encoding may be what got stuck: a format's own writer function)

        def encode_and_write() -> list[BaseException | None]:
            encoded.extend(self._encode(group))
            # (one call for the group; the store times each object's write on its own)
            return store.write_many([(path, buffers) for path, _, buffers in encoded], since, latencies.append)

        try:  # bounded: a write stuck in the kernel (a dead mount) fails the group, retried as a timeout
            errors = await store.run_bounded(encode_and_write, f"writing {len(group)} batches of predictions")
        except TimeoutError as exc:
            if not encoded:
                raise  # still encoding: the group fails with its ids
            errors = [exc] * len(encoded)
        errors = await store.retry_failed([(path, buffers) for path, _, buffers in encoded], errors)
        await self._settle(encoded, errors)

    async def flush(self, durable: bool) -> None:
        """Record everything stored so far: the format writer's rows, then a part of the records not in one."""
        if self.writer is not None:
            self._add_records(await self.writer.flush())
        await self.write_part()
        if durable:  # what the parts record is on disk before anything can vouch for it
            assert self.store is not None
            await self.store.sync()

    async def write_part(self) -> None:
        """Store the records not yet in a part. They are let go only once stored: after a failed attempt they stay
        for the next one (a flush called again, the commit), which writes the same part key again."""
        assert self.store is not None
        if self._part_lock is None:
            self._part_lock = anyio.Lock()
        async with self._part_lock:
            if not self._records:
                return
            assert self.generation is not None
            count = len(self._records)  # (workers only append: the first `count` are this part's)
            chunks = self._records[:count]
            key = self.keys.part(self.generation, self.run, self.rank, self._part_seq + 1)
            # sorted by id: the commit merges the parts as sorted streams, a chunk of each at a time
            await self.store.put(key, encode_sorted(chunks))
            del self._records[:count]
            self._pending -= sum(map(len, chunks))
            self._part_seq += 1

    def _add_records(self, records: Sequence[Record]) -> None:
        if records:
            self._records.append(records)
            self._pending += len(records)


def _retries(store: Store | None) -> int:
    return store.retries if store is not None else -1


def _gathered(receive: MemoryObjectReceiveStream[list[Batch]], group: list[Batch], limit: int) -> list[Batch]:
    """``group`` and the groups queued behind it, up to about the group bounds: a worker that was busy takes the
    backlog in one thread call (the loop handed each wake-up's batches over as they came, in small groups)."""
    items = sum(len(batch.ids) for batch in group)
    size = sum(batch.host.nbytes for batch in group)
    while items < limit and size < _GROUP_BYTES:
        try:
            more = receive.receive_nowait()
        except (anyio.WouldBlock, anyio.EndOfStream):
            break
        group = [*group, *more]
        items += sum(len(batch.ids) for batch in more)
        size += sum(batch.host.nbytes for batch in more)
    return group


def _release(handoff: Handoff, group: Sequence[Batch], stored: bool) -> None:
    """Free a group's place in the queue in one call (one lock, one wake-up), recycling its buffers if ``stored``."""
    pooled = [buffer for batch in group if batch.host.pooled for buffer in batch.host.pooled] if stored else []
    nbytes = sum(batch.host.nbytes for batch in group)
    handoff.release(nbytes, sum(len(batch.ids) for batch in group), pooled or None, len(group))


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
