"""One run of a sink: its state, the event loop's thread, and opening, flushing, committing and aborting it.

Threads: the caller's thread runs ``put`` (:mod:`lighter_sink._handoff`); one background thread runs an asyncio
event loop through an anyio blocking portal, where the engine's workers encode (in worker threads, off the loop)
and write (:mod:`lighter_sink._engine`); a waker thread wakes that loop for each hand-over. Every wait of the
caller's thread is bounded or interruptible, and an abort cancels what the loop still does.

The run, not the user's :class:`~lighter_sink.Sink`, is what the loop references: a sink dropped while open is
garbage-collected, warns and aborts.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any

import anyio
from anyio.abc import TaskStatus
from anyio.from_thread import BlockingPortal, start_blocking_portal

from lighter_sink._commit import Ownership, default_all_ok
from lighter_sink._config import SinkConfig
from lighter_sink._engine import Engine
from lighter_sink._errors import CommitError, DestinationError, SinkStateError
from lighter_sink._handoff import Handoff, wait_for
from lighter_sink._layout import ControlKeys, new_token
from lighter_sink._stats import SinkProgress, SinkStats, percentile
from lighter_sink._store import check_local_destination, is_local_url, local_path, open_store
from lighter_sink._version import __version__
from lighter_sink.formats import WriterContext

__all__ = ["Run", "SinkState"]

logger = logging.getLogger(__name__)


class SinkState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    COMMITTING = "committing"
    COMMITTED = "committed"
    ABORTED = "aborted"


# Every move a run's state may make; an abort of an ended run leaves it as it is.
_MOVES: dict[SinkState, frozenset[SinkState]] = {
    SinkState.NEW: frozenset({SinkState.RUNNING, SinkState.ABORTED}),
    SinkState.RUNNING: frozenset({SinkState.COMMITTING, SinkState.ABORTED}),
    SinkState.COMMITTING: frozenset({SinkState.COMMITTED, SinkState.ABORTED}),
    SinkState.COMMITTED: frozenset(),
    SinkState.ABORTED: frozenset(),
}


class Run:
    """The machinery behind one :class:`~lighter_sink.Sink`: hand-off, engine, ownership and the portal thread."""

    def __init__(
        self, url: str, config: SinkConfig, rank: int, world_size: int, all_ok: Callable[[bool], bool] | None
    ) -> None:
        self.url = url
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.all_ok = all_ok
        self.state = SinkState.NEW
        self.summary: dict[str, Any] | None = None
        fmt = config.format
        key = config.key_template
        self.keys = ControlKeys(fmt.namespace)
        self.token = new_token()  # this run's name
        self.handoff = Handoff(url, config.max_queue_bytes, key)
        self.engine = Engine(self.handoff, fmt, config.concurrency, keys=self.keys, run=self.token, rank=rank)
        self.ownership = Ownership(
            url, fmt, key, config.mode, keys=self.keys, run=self.token, rank=rank, handoff=self.handoff
        )
        self._opened_at = 0.0
        self._closed_at: float | None = None
        self._portal_cm: contextlib.AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._service: Future[None] | None = None
        self._worker_scope: anyio.CancelScope | None = None
        self._deferred_open = False
        self._opened: anyio.Event | None = None  # set once a deferred open finished (made on the loop)
        self._open_scope: anyio.CancelScope | None = None

    def _move(self, to: SinkState) -> None:
        if to is not self.state and to not in _MOVES[self.state]:
            raise SinkStateError(f"a {self.state.value} sink cannot become {to.value}")
        self.state = to

    def check_running(self, what: str) -> None:
        if self.state is not SinkState.RUNNING:
            hint = " (use the sink as a context manager or call open())" if self.state is SinkState.NEW else ""
            raise SinkStateError(f"{what}() needs a running sink; this one is {self.state.value}{hint}")

    # ------------------------------------------------------------------ the caller's thread

    def open(self) -> None:
        self.all_ok = self.all_ok or default_all_ok(self.world_size)
        self._opened_at = time.perf_counter()
        self._portal_cm = start_blocking_portal(backend="asyncio")
        self._portal = self._portal_cm.__enter__()
        try:
            self._start(self._portal, self.all_ok)
        except BaseException:
            self._shutdown(abort=True)
            self._move(SinkState.ABORTED)
            raise
        self._move(SinkState.RUNNING)

    def _start(self, portal: BlockingPortal, all_ok: Callable[[bool], bool]) -> None:
        self._loop = self._call(asyncio.get_running_loop)
        # A single process overwriting needs no agreement and no answer before compute starts: the store is
        # created (a client's start-up costs a few hundred milliseconds on S3) and the url prepared while the
        # model computes its first batches. Refusing a url (mode="error"), resuming and several ranks need
        # the answer first.
        self._deferred_open = self.world_size == 1 and self.config.mode == "overwrite"
        if self._deferred_open:
            if is_local_url(self.url):
                check_local_destination(local_path(self.url))  # microseconds: a bad path fails right here
        else:
            error: BaseException | None = None
            try:
                self._call(self._aopen)
                if self.rank == 0:
                    self._call(self.ownership.prepare)
            except BaseException as exc:
                error = exc
            # Nobody writes before rank 0 removed a stale marker; nobody runs if any rank could not open.
            if not all_ok(error is None) or error is not None:
                raise error or DestinationError(f"another rank could not open {self.url}; see its error")
            self._call(self._join)
        self._service, _ = portal.start_task(self._serve)
        assert self._loop is not None
        self.handoff.start_waker(self._loop, self.engine.hand_over)

    def abort(self, *, vote: bool = True) -> None:
        running = self.state is SinkState.RUNNING
        self.handoff.stop("aborted")  # a put on another thread, even one waiting for room, raises from here on
        if self.state in (SinkState.RUNNING, SinkState.COMMITTING):
            self._shutdown(abort=True)
        if self.state is not SinkState.COMMITTED:
            self._move(SinkState.ABORTED)
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
        return wait_for(self._portal.start_task_soon(func, *args))

    def flush(self) -> None:
        self.handoff.wait_drained()
        self._call(self._flush_rank)

    def commit(self) -> None:
        self.handoff.stop("committing")  # a put racing the commit on another thread raises instead of being left out
        self._move(SinkState.COMMITTING)
        assert self.all_ok is not None
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
            self._move(SinkState.COMMITTED if committed else SinkState.ABORTED)
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
            "format": self.config.format.name,
            "world_size": self.world_size,
            "version": __version__,
            "manifest": self.keys.manifest,
            "marker": self.keys.success,
            "seconds": round(stats.elapsed_seconds, 6),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "mode": self.config.mode,
            "key": self.config.key,
            "run": self.token,
            "generation": self.ownership.generation,
            "rank0_stats": stats.as_dict(),
        }

    def _elapsed(self) -> float:
        end = self._closed_at if self._closed_at is not None else time.perf_counter()
        return (end - self._opened_at) if self._opened_at else 0.0

    def progress(self) -> SinkProgress:
        elapsed = self._elapsed()
        handoff = self.handoff
        with handoff.cond:
            mb_per_second = self.engine.bytes / 1e6 / elapsed if elapsed > 0 else 0.0
            return SinkProgress(handoff.held_bytes, mb_per_second, handoff.stall)

    def stats(self) -> SinkStats:
        elapsed = self._elapsed()
        engine, handoff = self.engine, self.handoff
        latencies = list(engine.latencies)
        store = engine.store
        with handoff.cond:
            return SinkStats(
                items=engine.items,
                bytes=engine.bytes,
                batches=handoff.batches,
                stall_seconds=handoff.stall,
                queue_bytes=handoff.held_bytes,
                queue_high_water_bytes=handoff.high_water,
                write_seconds_p50=percentile(latencies, 0.5),
                write_seconds_p99=percentile(latencies, 0.99),
                retries=store.retries if store is not None else 0,
                failed=handoff.failed_count,
                skipped=handoff.skipped,
                elapsed_seconds=elapsed,
            )

    def _shutdown(self, *, abort: bool) -> None:
        portal = self._portal
        if portal is None:
            return
        cond = self.handoff.cond
        # A KeyboardInterrupt raised right after this thread took the lock, inside Condition.__enter__ and so
        # before its `with` block began, leaves the lock held for good (a CPython limitation of Python-level
        # __enter__); the loop's workers need it to wind down. Release what this thread holds; the lock is
        # reentrant, and releasing one this thread does not hold raises RuntimeError.
        with contextlib.suppress(RuntimeError):
            while True:
                cond.release()
        try:
            self.handoff.stop_waker()  # every hand-over scheduled so far reaches the loop before the stop does
            self._call(self._stop, abort)
            if self._service is not None:
                with contextlib.suppress(Exception):
                    wait_for(self._service)
            store = self.engine.store
            if abort and store is not None:
                # The workers and the open are over or abandoned: a thread stuck in a write and woken later
                # makes nothing appear, not even once the lease below is given up and another run writes.
                store.fence()
            with contextlib.suppress(Exception):
                self._call(self._aclose_store)
        finally:
            self.handoff.pool.close()
            with cond:
                cond.notify_all()
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
        config = self.config
        store = await open_store(
            self.url,
            config.storage_options,
            concurrency=config.concurrency,
            retry=config.retry,
            backend=config.backend,
            upload_checksums=config.upload_checksums,
            run=self.token,
            temp_prefix=self.keys.temp_prefix,
            durable=config.durable,
            # (one object per prediction: requests by the thousand, whose client must not hold the predict loop)
            upload_process=config.format.per_item_objects,
        )
        self.engine.store = self.ownership.store = store
        if not config.format.per_item_objects:
            context = WriterContext(
                store=store,
                rank=self.rank,
                world_size=self.world_size,
                num_samples=config.num_samples,
                mode=config.mode,
                scratch=self.keys.scratch,
                run=self.token,
                shard_bytes=config.shard_bytes,
            )
            self.engine.writer = config.format.open_writer(context)

    async def _join(self) -> None:
        await self.ownership.join()
        self.engine.generation = self.ownership.generation

    async def _wait_opened(self) -> None:
        if self._deferred_open:
            assert self._opened is not None
            await self._opened.wait()
            if self.handoff.open_error is not None:
                raise self.handoff.open_error

    async def _flush_rank(self) -> None:
        await self._wait_opened()
        await self.engine.flush(self.config.durable)

    async def _commit_rank0(self, summary: dict[str, Any]) -> dict[str, Any]:
        return await self.ownership.commit(self.engine.writer, summary, durable=self.config.durable)

    async def _serve(self, *, task_status: TaskStatus[None]) -> None:
        receive = self.engine.streams()
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
                        await self.ownership.prepare()
                        await self._join()
                except Exception as exc:
                    self.handoff.open_error = exc
                    self.handoff.fail(exc, [])
                finally:
                    self._opened.set()
            background: list[Callable[[], Coroutine[Any, Any, None]]] = []
            if self.ownership.lease is not None:
                background.append(self.ownership.keep_lease)
            await self.engine.serve(receive, background)

    async def _stop(self, abort: bool) -> None:
        self.ownership.stop_renewing()
        if abort and self._open_scope is not None:
            self._open_scope.deadline = anyio.current_time() + (self.config.timeout or 60.0)
        if abort and self._worker_scope is not None:
            self._worker_scope.cancel()
        self.engine.close_input()

    async def _aclose_store(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.ownership.release_briefly(self.config.timeout)
                if self.engine.writer is not None:
                    await self.engine.writer.aclose()
            finally:  # (its connections and its upload process, whatever failed before)
                if self.engine.store is not None:
                    await self.engine.store.aclose()
