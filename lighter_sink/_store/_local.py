"""A local (or mounted shared) directory: atomic, fenced and durable writes, batched per thread call.

Every object is written under a temporary name in its own directory, then renamed into place: a reader never
sees it half written, and a sweep after a crash knows what to remove. fsspec's own local transactions stage
files in the system temp directory, which may be another device, so local paths do not go through fsspec.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from lighter_sink._errors import ConfigurationError
from lighter_sink._store._base import PART_SIZE, RetryPolicy, Store, check_listing
from lighter_sink._store._deadline import bounded
from lighter_sink._store._files import FileOutput, create_file, fsync_path, key_pages, libc_syncfs, write_all
from lighter_sink._store._retry import is_transient
from lighter_sink._types import Buffer, KeyPages, Output

__all__ = ["TEMP_PREFIX", "LocalStore"]

logger = logging.getLogger(__name__)
#: Keys in one page of a local listing (about a megabyte of names).
LOCAL_PAGE = 10_000
T = TypeVar("T")

_temp_counter = itertools.count()
_DIR_FDS = 256  # directory descriptors a local store keeps open at most
# How long closing a store waits for writes it gave up on (an abort) to see the fence and remove their temporary files
_SETTLE_SECONDS = 5.0

TEMP_PREFIX = ".lsink."


def _new_run() -> str:
    return uuid.uuid4().hex[:16]


class LocalStore(Store):
    """A local (or mounted shared) directory, written atomically and in batches per thread call.

    Temporary files are ``{temp_prefix}{run}.{n}.tmp`` in the object's directory: a name of bounded length
    whatever the object's (a 245-byte name is legal; a name built from it would not be), in a namespace that
    says which run left it, so that a sweep removes only earlier runs' leftovers of its own prefix. ``run``
    must be unique per process (``n`` counts per process).

    ``durable``: control objects (keys starting with ``_``) are fsynced before their rename and their directory
    after it, and :meth:`sync` makes everything else durable.
    """

    supports_write_many = True
    is_local = True

    def __init__(
        self,
        url: str,
        retry: RetryPolicy,
        root: str,
        limiter: anyio.CapacityLimiter,
        *,
        temp_prefix: str = TEMP_PREFIX,
        run: str | None = None,
        durable: bool = False,
    ) -> None:
        super().__init__(url, retry)
        run = _new_run() if run is None else run
        for what, value in (("temp_prefix", temp_prefix), ("run", run)):
            if not value or "/" in value or os.sep in value or len(value.encode()) > 64:
                raise ConfigurationError(f"{what} must be 1 to 64 bytes without path separators, got {value!r}")
        self._root = os.path.abspath(root)
        self._limiter = self.limiter = limiter
        self._made_dirs: set[str] = set()
        self._dir_fds: dict[str, int] = {}
        self._dirs_lock = threading.Lock()
        self.temp_prefix = temp_prefix
        self.run = run
        self._temp_stem = f"{temp_prefix}{run}."
        self.durable = durable
        self._syncfs = libc_syncfs() if durable else None
        # What the next sync must make durable where syncfs is missing: files written, the directories they
        # were renamed into, and directories created (whose own entries live in their parents).
        self._track = durable and self._syncfs is None
        self._unsynced_files: set[str] = set()
        self._unsynced_dirs: set[str] = set()
        self._fresh_dirs: set[str] = set()
        self._abandoned = False  # a thread call was given up on: it may still use the directory descriptors
        self._writing = 0  # objects being written by threads right now (a temporary file may exist for each)
        self._written = threading.Condition()

    @property
    def root(self) -> str:
        return self._root

    async def _thread(self, func: Callable[..., T], *args: Any, limiter: anyio.CapacityLimiter | None = None) -> T:
        """Run ``func`` in a worker thread; on cancellation (a timeout, an abort) stop waiting for it at once."""
        try:
            return await anyio.to_thread.run_sync(func, *args, limiter=limiter, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            self._abandoned = True
            raise

    async def run_bounded(self, func: Callable[[], T], what: str) -> T:
        try:
            return await super().run_bounded(func, what)
        except (TimeoutError, anyio.get_cancelled_exc_class()):
            self._abandoned = True
            raise

    def _ensure_dir(self, directory: str) -> None:
        if directory in self._made_dirs:
            return
        os.makedirs(directory, exist_ok=True)
        with self._dirs_lock:
            self._made_dirs.add(directory)
            if self.durable:
                # a directory made by this run is durable only once its entry in its parent is
                while directory.startswith(self._root + os.sep):
                    self._fresh_dirs.add(directory)
                    directory = os.path.dirname(directory)

    def _directory_fd(self, directory: str) -> int | None:
        """An open descriptor of ``directory`` (created if needed), or None past the cache's bound.

        Paths relative to a directory descriptor spare the kernel a walk of the whole path twice per object
        (create and rename): about 30% more small files per second here. Descriptors are never evicted, since
        another thread may be using one; directories past the bound are written by absolute path.
        """
        fd = self._dir_fds.get(directory)
        if fd is not None:
            return fd
        self._ensure_dir(directory)
        with self._dirs_lock:
            fd = self._dir_fds.get(directory)
            if fd is None and len(self._dir_fds) < _DIR_FDS:
                fd = self._dir_fds[directory] = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        return fd

    def _write(self, key: str, buffers: Sequence[Buffer], since: int) -> None:
        with self._written:
            self._writing += 1
        try:
            self._write_one(key, buffers, since)
        finally:
            with self._written:
                self._writing -= 1
                if not self._writing:
                    self._written.notify_all()

    def _write_one(self, key: str, buffers: Sequence[Buffer], since: int) -> None:
        self._check_fence(key, since)
        if "/" in key:
            directory, name = os.path.split(os.path.join(self._root, key))
        else:
            directory, name = self._root, key
        dir_fd = self._directory_fd(directory)
        # A temporary name in the same directory: rename is atomic only within one filesystem.
        temp = f"{self._temp_stem}{next(_temp_counter)}.tmp"
        if dir_fd is None:
            name = os.path.join(directory, name)
            temp = os.path.join(directory, temp)
        durable = self.durable and key.startswith("_")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=dir_fd)
        try:
            try:
                write_all(fd, buffers)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            # A thread stuck above (a dead mount) may wake up long after the sink aborted: it must not make
            # its object appear then.
            self._check_fence(key, since)
            os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=dir_fd)
            raise
        # (from several threads at once an increment may be lost: it only has to move)
        self.completed += 1
        if durable:
            self._sync_entries(directory, dir_fd)
        elif self._track:
            self._unsynced_files.add(os.path.join(directory, name))
            self._unsynced_dirs.add(directory)

    def _sync_entries(self, directory: str, dir_fd: int | None) -> None:
        """Make the entries of ``directory`` durable, and its own entry (and its parents') if this run made it."""
        if dir_fd is None:
            fsync_path(directory, directory=True)
        else:
            os.fsync(dir_fd)
        with self._dirs_lock:
            fresh = []
            while directory in self._fresh_dirs:
                self._fresh_dirs.discard(directory)
                directory = os.path.dirname(directory)
                fresh.append(directory)
        for parent in fresh:
            fsync_path(parent, directory=True)

    def write_many(
        self,
        items: Sequence[tuple[str, Sequence[Buffer]]],
        since: int | None = None,
        timed: Callable[[float], None] | None = None,
    ) -> list[BaseException | None]:
        """Write ``items`` from the calling worker thread, one after another; return each one's error, and give
        ``timed`` each one's seconds."""
        if since is None:
            since = self.fence_epoch  # (a call stuck on its first object must not write the rest once woken)
        results: list[BaseException | None] = []
        clock = time.perf_counter
        for key, buffers in items:
            started = clock()
            try:
                self._write(key, buffers, since)
                results.append(None)
            except Exception as exc:
                results.append(exc)
            if timed is not None:
                timed(clock() - started)
        return results

    async def _put_once(self, key: str, buffers: Sequence[Buffer], crc32: int | None) -> None:
        await self._thread(self._write, key, buffers, self.fence_epoch, limiter=self._limiter)

    async def _write_bounded(self, items: Sequence[tuple[str, Sequence[Buffer]]]) -> list[BaseException | None]:
        """One thread call for ``items``; each fails with a :class:`TimeoutError` when the call is given up on."""
        try:
            return await self.run_bounded(functools.partial(self.write_many, items), f"writing {len(items)} objects")
        except TimeoutError as exc:
            return [exc] * len(items)

    async def put_many(self, items: Sequence[tuple[str, Sequence[Buffer]]]) -> list[BaseException | None]:
        # One thread hop per batch rather than per object: tiny predictions are dominated by hop costs.
        return await self.retry_failed(items, await self._write_bounded(items))

    async def retry_failed(
        self, items: Sequence[tuple[str, Sequence[Buffer]]], results: list[BaseException | None]
    ) -> list[BaseException | None]:
        """Retry the objects that failed transiently, together, one bounded thread call per attempt.

        Together: objects of a batch that timed out are retried in one call, so that a stuck disk fails the
        batch after ``attempts`` timeouts, not one object after another.
        """
        for attempt in range(2, self.retry.attempts + 1):
            failed = [index for index, error in enumerate(results) if error is not None and is_transient(error)]
            if not failed:
                break
            self.retries += len(failed)
            await anyio.sleep(self.retry.delay(attempt - 1))
            retried = await self._write_bounded([items[index] for index in failed])
            for index, error in zip(failed, retried, strict=True):
                results[index] = error
        return results

    def open_output(self, key: str, *, part_size: int = PART_SIZE) -> Output:
        """A local object written piece by piece: streamed to a temporary file, renamed into place whole."""
        return FileOutput(self, key)

    def temp_path(self, key: str) -> str:
        """The absolute path of a fresh temporary file next to ``key`` (no I/O: the caller makes the directory).

        The file output's (:meth:`open_output`) own steps, with :meth:`replace`; no part of :class:`Store`. A
        sweep treats the file as this run's, and :meth:`list` does not show it.
        """
        directory = os.path.dirname(os.path.join(self._root, key))
        return os.path.join(directory, f"{self._temp_stem}{next(_temp_counter)}.tmp")

    def replace(self, temp: str, key: str, since: int) -> None:
        """Make a finished temporary file (from :meth:`temp_path`) the object ``key``: fenced (``since`` is the
        :attr:`fence_epoch` taken when its writing began) and durable as the store's own writes. Synchronous:
        call it from a worker thread."""
        path = os.path.join(self._root, key)
        self._check_fence(key, since)
        if self.durable:
            fsync_path(temp)
        self._check_fence(key, since)
        os.replace(temp, path)
        self.completed += 1
        if self.durable:
            self._sync_entries(os.path.dirname(path), None)

    async def sync(self) -> None:
        """Make everything this store wrote durable (nothing to do unless ``durable``).

        Linux: one ``syncfs`` of the root's filesystem (every file and directory at once, and only that
        filesystem). Elsewhere: an fsync of each file and directory written or made since the last sync.
        Bounded by the retry policy (its timeout times its attempts), in one attempt: a second sync would wait
        on the same disk.
        """
        if not self.durable:
            return
        bound = self.retry.bound()
        call = self._thread(self._sync_now)
        if bound is None:
            await call
            return
        try:
            async with asyncio.timeout(bound) as scope:
                await call
        except TimeoutError:
            if not scope.expired():
                raise
            raise TimeoutError(f"making the objects under {self.url} durable took more than {bound:g} s") from None

    def _sync_now(self) -> None:
        with self._dirs_lock:
            files, self._unsynced_files = self._unsynced_files, set()
            dirs, self._unsynced_dirs = self._unsynced_dirs, set()
            fresh, self._fresh_dirs = self._fresh_dirs, set()
        # (copies: a write finishing right now may still add to the old sets; it is not promised to this sync)
        files, dirs, fresh = set(files), set(dirs), set(fresh)
        try:
            syncfs = self._syncfs
            if syncfs is not None:
                fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    if syncfs(fd) != 0:
                        code = ctypes.get_errno()
                        raise OSError(code, f"syncfs failed: {os.strerror(code)}", self._root)
                finally:
                    os.close(fd)
                return
            for path in files:
                fsync_path(path)
            for directory in dirs | {os.path.dirname(d) for d in fresh}:
                fsync_path(directory, directory=True)
        except BaseException:
            with self._dirs_lock:  # still to be made durable: the next sync tries again
                self._unsynced_files |= files
                self._unsynced_dirs |= dirs
                self._fresh_dirs |= fresh
            raise

    async def aclose(self) -> None:
        if self._abandoned:
            # Writes given up on (an abort does not wait for them) find the fence before their rename and remove
            # their temporary files: wait for that, briefly, so that a closed sink leaves none behind; one stuck
            # on a dead mount is left to the next run's sweep.
            def settle() -> None:
                with self._written:
                    self._written.wait_for(lambda: not self._writing, timeout=_SETTLE_SECONDS)

            await anyio.to_thread.run_sync(settle, abandon_on_cancel=True)
        with self._dirs_lock:
            fds, self._dir_fds = list(self._dir_fds.values()), {}
        if self._abandoned:
            # A thread given up on may still write relative to these descriptors: closing them could let a
            # reused number point it at another file. They are few and close with the process.
            return
        for fd in fds:
            os.close(fd)

    def _is_temporary(self, name: str) -> bool:
        """Whether ``name`` is a temporary file of this store's prefix, whichever run wrote it."""
        return name.startswith(self.temp_prefix) and name.endswith(".tmp")

    async def remove_incomplete(self) -> int:
        """Remove temporary files of this store's prefix that another run left (an earlier, killed one).

        This run's own are kept: they may be writes in flight. Other prefixes are other outputs' namespaces.
        """
        own = self._temp_stem

        def sweep() -> int:
            removed = 0
            for directory, _dirs, files in os.walk(self._root):
                for name in files:
                    if self._is_temporary(name) and not name.startswith(own):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(directory, name))
                            removed += 1
            return removed

        removed = await self._retrying("removing temporary files", lambda: self._thread(sweep))
        if removed:
            logger.info("removed %d temporary files left by an interrupted run under %s", removed, self.url)
        return removed

    async def get(self, key: str) -> bytes:
        path = os.path.join(self._root, key)

        def read() -> bytes:
            with open(path, "rb") as f:
                return f.read()

        return await self._retrying(key, lambda: self._thread(read, limiter=self._limiter))

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        path = os.path.join(self._root, key)

        def read() -> bytes:
            with open(path, "rb") as f:
                return os.pread(f.fileno(), length, start)

        return await self._retrying(key, lambda: self._thread(read, limiter=self._limiter))

    async def exists(self, key: str) -> bool:
        path = os.path.join(self._root, key)
        return await self._retrying(key, lambda: self._thread(os.path.exists, path))

    async def create(self, key: str, data: bytes) -> bool:
        path = os.path.join(self._root, key)
        since = self.fence_epoch

        def create() -> bool:
            self._check_fence(key, since)
            return create_file(path, data, durable=self.durable)

        return await self._retrying(key, lambda: self._thread(create))

    async def delete(self, keys: Sequence[str]) -> None:
        def remove() -> None:
            parents = set()
            for key in keys:
                path = os.path.join(self._root, key)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                parents.add(os.path.dirname(path))
            # Object stores have no directories: leave no empty ones behind either (the _parts/ tree).
            for deepest in sorted(parents, key=len, reverse=True):
                directory = deepest
                while directory.startswith(self._root + os.sep):
                    try:
                        os.rmdir(directory)
                    except OSError:  # not empty, or already gone
                        break
                    with self._dirs_lock:
                        self._made_dirs.discard(directory)
                        self._fresh_dirs.discard(directory)
                        stale = self._dir_fds.pop(directory, None)
                    if stale is not None:
                        os.close(stale)
                    directory = os.path.dirname(directory)

        await self._retrying("delete", lambda: self._thread(remove, limiter=self._limiter))

    async def list(self, prefix: str = "") -> list[str]:
        base = os.path.join(self._root, prefix)

        def walk() -> list[str]:
            if os.path.isfile(base):
                return [prefix]
            keys = []
            for directory, _dirs, files in os.walk(base):
                for name in files:
                    if self._is_temporary(name):
                        continue  # an unfinished atomic write
                    full = os.path.join(directory, name)
                    keys.append(os.path.relpath(full, self._root).replace(os.sep, "/"))
            return sorted(keys)

        return await self._retrying("list", lambda: self._thread(walk, limiter=self._limiter))

    async def iter_list(self, prefix: str = "", *, page_size: int = LOCAL_PAGE, begins: str = "") -> KeyPages:
        """Directories are read entry by entry (``os.scandir``): a folder of ten million files is never held. Pages
        are larger than an object store's (a thread's round trip each, not a request). With ``begins``, the folder
        ``prefix`` is read once, and only its entries of such names walked."""
        check_listing(page_size, begins)
        pages = key_pages(self._root, os.path.join(self._root, prefix), page_size, self._is_temporary, begins)
        timeout = self.retry.timeout
        while True:
            # (not retried: a generator that raised is finished, and a retry would end the listing early)
            step = functools.partial(self._thread, next, pages, None, limiter=self._limiter)
            page = await (step() if timeout is None else bounded(step, timeout))
            if page is None:
                return
            yield page
