"""The contract every backend keeps: :class:`Store`, and the :class:`RetryPolicy` it writes under.

The base class owns what must behave the same on every backend (bounded retries of transient errors, the fence
an aborting sink raises, bounded waits on worker threads, statistics), so that a backend only says how one
object is put, read, listed and deleted. Capabilities are class flags the sink reads, not ``isinstance`` checks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import anyio
import anyio.to_thread

from lighter_sink._errors import ConfigurationError, SinkStateError
from lighter_sink._store._deadline import bounded
from lighter_sink._store._retry import is_transient
from lighter_sink._types import Buffer, KeyPages, Output

__all__ = ["LIST_PAGE", "PART_SIZE", "RetryPolicy", "Retrying", "Store", "check_listing"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: The parts an object store's streamed output uploads (S3 takes 5 MiB at least, all parts but the last).
PART_SIZE = 8 * 2**20
#: Keys in one page of :meth:`Store.iter_list` (what one S3 listing request returns at most).
LIST_PAGE = 1000
#: A store's retry loop: ``retrying(what, call)`` awaits ``call()`` under its policy and counts its retries.
Retrying = Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]]


def check_listing(page_size: int, begins: str) -> None:
    """Raises ValueError unless :meth:`Store.iter_list`'s ``page_size`` (keys in a page) is at least 1 and its
    ``begins`` (how the names listed begin) names no folder."""
    if page_size < 1:
        raise ValueError(f"page_size must be at least 1, got {page_size}")
    if "/" in begins:
        raise ValueError(f"begins is the start of a name in the folder listed, without '/', got {begins!r}")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently one object is written.

    Attributes:
        attempts: tries per object, the first included; only transient errors are retried.
        base_delay: first back-off in seconds; doubles each attempt, with full jitter.
        max_delay: ceiling of one back-off.
        timeout: seconds one attempt may take before it counts as a transient failure (``None``: no bound).
    """

    attempts: int = 5
    base_delay: float = 0.1
    max_delay: float = 5.0
    timeout: float | None = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigurationError(f"attempts must be >= 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ConfigurationError("retry delays must be >= 0")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigurationError(f"timeout must be > 0 or None, got {self.timeout}")

    def delay(self, attempt: int) -> float:
        """Back-off before retry number ``attempt`` (1-based): full jitter, as AWS recommends."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))

    def bound(self) -> float | None:
        """The longest one operation may take over all its attempts: each attempt's timeout, the longest back-offs."""
        if self.timeout is None:
            return None
        pauses = sum(min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1)) for attempt in range(1, self.attempts))
        return float(self.timeout * self.attempts + pauses)


class Store(ABC):
    """Bytes under one url. Keys are relative, '/'-separated and already validated.

    Capabilities are class flags (as zarr's ``Store.supports_writes``), so that the sink picks its write path
    without knowing the backend:

    * ``supports_write_many``: :meth:`write_many` works, a thread-safe synchronous batch write for callers already
      on a worker thread (they save a thread hop per group); without it, writes go through :meth:`put_many`.
    * ``contiguous_writes``: writes want one contiguous buffer (object stores send one body); callers that can
      join buffers off the event loop should do so.
    * ``is_local``: a directory of this machine (or a mount): temporary files to sweep, fsync, no PUT.
    """

    supports_write_many: ClassVar[bool] = False
    contiguous_writes: ClassVar[bool] = False
    is_local: ClassVar[bool] = False

    def __init__(self, url: str, retry: RetryPolicy) -> None:
        self.url = url.rstrip("/")
        self.retry = retry
        self.retries = 0  # transient failures that were retried, for stats

    def __repr__(self) -> str:
        # storage options (credentials) are deliberately absent
        return f"<{type(self).__name__} {self.url!r}>"

    #: Bounds the worker threads this store's I/O may occupy.
    limiter: anyio.CapacityLimiter | None = None

    #: Objects this store finished writing (advanced by worker threads): how a bounded thread call tells a
    #: store that is slow from one that is stuck.
    completed: int = 0
    _fence_epoch: int = 0

    def fence(self) -> None:
        """Let no write of this store complete from now on; synchronous, callable from any thread.

        An aborting sink calls it first: a worker thread stuck in a write (a dead mount) that wakes up later,
        long after its wait was abandoned, must not make an object or a control object appear. A write checks
        the fence right before it makes its object visible (a rename, a request); one already past that point
        (inside the system call) cannot be stopped.
        """
        self._fence_epoch += 1

    @property
    def fence_epoch(self) -> int:
        """Taken when a write begins, and given back to the check before it completes: a write begun before the
        latest :meth:`fence` never completes; one the sink begins afterwards on purpose (giving up its lease)
        does."""
        return self._fence_epoch

    def _check_fence(self, key: str, since: int) -> None:
        if since != self._fence_epoch:
            raise SinkStateError(f"{key} was not written to {self.url}: the sink was aborted")

    def write_many(
        self,
        items: Sequence[tuple[str, Sequence[Buffer]]],
        since: int | None = None,
        timed: Callable[[float], None] | None = None,
    ) -> list[BaseException | None]:
        """Write ``items`` from the calling (worker) thread; return each one's error (``None`` when stored).

        Only where ``supports_write_many`` says so. ``since`` is the :attr:`fence_epoch` taken when the caller's
        work began (default: when this call began). ``timed`` is called with each object's seconds, stored or not.

        Raises:
            NotImplementedError: the store has no synchronous batch write; use :meth:`put_many`.
        """
        raise NotImplementedError(f"{type(self).__name__} has no write_many; writes go through put_many")

    async def sync(self) -> None:  # noqa: B027 - optional hook: object stores acknowledge durable writes
        """Make everything this store wrote so far durable. Object stores answer a write once it is durable."""

    async def run_bounded(self, func: Callable[[], T], what: str) -> T:
        """Run ``func`` (writes through :meth:`write_many`) in one of this store's worker threads, bounded.

        The wait ends with a :class:`TimeoutError` once ``timeout`` seconds passed in which no object of this
        store was completed: a batch that keeps making progress is slow, not stuck. The thread itself cannot be
        stopped: it is abandoned (the fence keeps it from completing a write once the sink aborted).
        """
        timeout = self.retry.timeout
        call = anyio.to_thread.run_sync(func, limiter=self.limiter, abandon_on_cancel=True)
        if timeout is None:
            return await call
        task = asyncio.ensure_future(call)
        try:
            seen = self.completed
            while True:
                done, _ = await asyncio.wait((task,), timeout=timeout)
                if done:
                    return task.result()
                if self.completed == seen:
                    raise TimeoutError(f"{what}: no write finished within {timeout:g} s")
                seen = self.completed
        finally:
            if not task.done():
                task.cancel()  # the thread is abandoned; the task ends at once
                task.add_done_callback(_consume)

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]], first_attempt: int = 1) -> T:
        attempt = first_attempt
        timeout = self.retry.timeout
        while True:
            try:
                if timeout is None:
                    return await call()
                # Not anyio.fail_after (a cancel scope per object cost about an eighth of the event loop's time
                # on small objects), nor asyncio.timeout (a timer armed and cancelled per object, a fifth): one
                # lazily re-armed timer per task (the sink's loop is asyncio by design).
                return await bounded(call, timeout)
            except Exception as exc:
                error = exc
                if type(exc) is TimeoutError and not exc.args:  # asyncio's own, which says nothing
                    error = TimeoutError(f"{what}: no answer within {timeout:g} s")
                if attempt >= self.retry.attempts or not is_transient(error):
                    if error is exc:
                        raise
                    raise error from None
                self.retries += 1
                pause = self.retry.delay(attempt)
                logger.debug("transient error on %s (attempt %d), retrying in %.2fs: %r", what, attempt, pause, error)
                attempt += 1
                await anyio.sleep(pause)

    async def put(self, key: str, buffers: Sequence[Buffer], crc32: int | None = None) -> None:
        """Store one object under ``key``; it becomes visible whole or not at all.

        ``crc32`` is the body's CRC-32 when the caller computed it already: a store that sends an upload checksum
        sends this one instead of computing its own.
        """
        await self._retrying(key, lambda: self._put_once(key, buffers, crc32))

    async def retry_failed(
        self, items: Sequence[tuple[str, Sequence[Buffer]]], results: list[BaseException | None]
    ) -> list[BaseException | None]:
        """Give objects whose first attempt failed transiently the rest of their attempts."""
        for index, error in enumerate(results):
            if error is not None and is_transient(error) and self.retry.attempts > 1:
                key, buffers = items[index]
                self.retries += 1
                try:
                    await self._retrying(key, functools.partial(self._put_once, key, buffers, None), first_attempt=2)
                    results[index] = None
                except Exception as exc:
                    results[index] = exc
        return results

    async def put_many(self, items: Sequence[tuple[str, Sequence[Buffer]]]) -> list[BaseException | None]:
        """Store several objects concurrently; return each one's error (``None`` when stored)."""
        results: list[BaseException | None] = [None] * len(items)

        async def one(index: int, key: str, buffers: Sequence[Buffer]) -> None:
            try:
                await self.put(key, buffers)
            except Exception as exc:
                results[index] = exc

        async with anyio.create_task_group() as tg:
            for index, (key, buffers) in enumerate(items):
                tg.start_soon(one, index, key, buffers)
        return results

    @abstractmethod
    async def _put_once(self, key: str, buffers: Sequence[Buffer], crc32: int | None) -> None: ...

    @abstractmethod
    async def get(self, key: str) -> bytes:
        """Read a whole object; raises ``FileNotFoundError`` when absent."""

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes of an object from ``start`` (fewer at its end); raises ``FileNotFoundError`` when absent.

        Stores that can read a range without the whole object (every backend of this package) override it.
        """
        return (await self.get(key))[start : start + length]

    @abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abstractmethod
    async def delete(self, keys: Sequence[str]) -> None:
        """Remove objects; missing ones are ignored."""

    @abstractmethod
    async def list(self, prefix: str = "") -> list[str]:
        """Keys of every object below ``prefix`` (recursively), relative to the url."""

    async def iter_list(self, prefix: str = "", *, page_size: int = LIST_PAGE, begins: str = "") -> KeyPages:
        """:meth:`list` a page at a time (at most ``page_size`` keys each, in no particular order), below the folder
        ``prefix``: a url of ten million objects is listed without holding its keys. Stores that cannot page list
        whole, then hand the keys out in pages.

        ``begins``: only the keys below ``prefix`` whose name there (a file's or a folder's) begins so; object
        stores ask the server for just those (every control object's key begins with ``_``: finding them costs a
        request, not a walk of the url).
        """
        check_listing(page_size, begins)
        keys = await self.list(prefix)
        if begins:
            folder = prefix.strip("/")
            wanted = (folder + "/" if folder else "") + begins
            keys = [key for key in keys if key.startswith(wanted)]
        for start in range(0, len(keys), page_size):
            yield keys[start : start + page_size]

    async def remove_incomplete(self) -> int:
        """Remove what interrupted writes left behind; return how many. Object stores leave nothing."""
        return 0

    async def create(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` only if no object is there; return whether this call created it.

        Atomic where the store can do it (an exclusive link locally, a conditional PUT on S3 and GCS); elsewhere
        a check then a write, which two writers racing within milliseconds can both pass.
        """
        if await self.exists(key):
            return False
        await self.put(key, [data])
        return True

    async def delete_prefix(self, prefix: str) -> None:
        await self.delete(await self.list(prefix))

    def open_output(self, key: str, *, part_size: int = PART_SIZE) -> Output:
        """An object written piece by piece: held in memory and stored in one PUT (object stores have no append).

        Stores that stream (a local file, S3's multipart and GCS's resumable uploads) send ``part_size`` bytes a
        request, and hold a few parts at most.
        """
        return _HeldOutput(self, key)

    async def aclose(self) -> None:  # noqa: B027 - optional hook: most stores hold no connection
        """Release connections."""


class _HeldOutput:
    """Object stores: the pieces are held and stored in one PUT of the whole object (no append, no rename)."""

    def __init__(self, store: Store, key: str) -> None:
        self._store = store
        self._key = key
        self._pieces: list[Buffer] = []

    async def write(self, data: Buffer) -> None:
        self._pieces.append(data)

    async def finish(self) -> None:
        pieces, self._pieces = self._pieces, []
        await self._store.put(self._key, [b"".join(pieces)])

    async def discard(self) -> None:
        self._pieces = []


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned task's outcome, so that asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()
