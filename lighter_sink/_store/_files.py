"""File-level steps of the local store: gathered writes, an exclusive atomic create, fsync and ``syncfs``, and
the output streamed to a temporary file (:class:`FileOutput`) that the store renames into place.

System calls and no store state: kept out of :mod:`._local`, which is about what the local store promises
(atomic, fenced, durable objects), not about how a file gets its bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import anyio
import anyio.to_thread

from lighter_sink._types import Buffer, KeyPage

__all__ = ["FileOutput", "Renaming", "create_file", "fsync_path", "key_pages", "libc_syncfs", "write_all"]

_SMALL = 64 * 2**10  # below this, one joined write beats a gathered one


def write_all(fd: int, buffers: Sequence[Buffer]) -> None:
    """Write every buffer to ``fd``, in order, whatever the kernel accepts per call."""
    if len(buffers) == 1 and isinstance(buffers[0], bytes | bytearray):  # the common case: one call
        written = os.write(fd, buffers[0])
        if written == len(buffers[0]):
            return
        buffers = (memoryview(buffers[0])[written:],)
    if len(buffers) > 1 and sum(b.nbytes if isinstance(b, memoryview) else len(b) for b in buffers) <= _SMALL:
        buffers = (b"".join(buffers),)
    pending = [memoryview(b).cast("B") for b in buffers]
    while pending:
        written = os.writev(fd, pending) if len(pending) > 1 else os.write(fd, pending[0])
        while pending and written >= pending[0].nbytes:
            written -= pending[0].nbytes
            pending.pop(0)
        if pending and written:
            pending[0] = pending[0][written:]


@functools.cache
def libc_syncfs() -> Callable[[int], int] | None:
    """Linux's ``syncfs(fd)``, which makes one filesystem's written data durable in one call; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):  # a C library without it (musl before 1.1.10, old glibc)
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def fsync_path(path: str, *, directory: bool = False) -> None:
    """fsync a file or a directory by path; a file deleted since is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems cannot fsync a directory (EINVAL); their entries are durable by other means.
        if not (directory and exc.errno == errno.EINVAL):
            raise
    finally:
        os.close(fd)


def _write_and_close(fd: int, data: bytes, *, durable: bool) -> None:
    try:
        write_all(fd, [data])
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def create_file(path: str, data: bytes, *, durable: bool) -> bool:
    """Create ``path`` holding ``data`` unless it exists, atomically: written aside, then hard-linked into place
    (a link fails if the name exists, and a reader never sees the file half written)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    # (a name no sweep of temporary files matches: another output's sink sweeping this directory must not
    # remove it between the write and the link)
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".lsink-create")
    try:
        _write_and_close(fd, data, durable=durable)
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
        except OSError as exc:  # a filesystem without hard links: an exclusive create, then the bytes
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            try:
                target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                return False
            _write_and_close(target, data, durable=durable)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


class Renaming(Protocol):
    """What a :class:`FileOutput` needs of the local store: its temporary names, its fenced rename."""

    @property
    def fence_epoch(self) -> int: ...

    def temp_path(self, key: str) -> str: ...

    def replace(self, temp: str, key: str, since: int) -> None: ...


_OUTPUT_PIECE = 1 << 20  # a local output is written in pieces of this size


class FileOutput:
    """A local object streamed to a hidden temporary file and renamed into place when complete."""

    def __init__(self, store: Renaming, key: str) -> None:
        self._store = store
        self._key = key
        # a temporary name of the store's own (bounded whatever the key; swept after a crash)
        self._temp = store.temp_path(key)
        self._since = store.fence_epoch  # (a write stuck from before an abort never replaces the object)
        self._file: Any = None
        self._pieces: list[Buffer] = []
        self._size = 0

    async def write(self, data: Buffer) -> None:
        self._pieces.append(data)
        self._size += memoryview(data).nbytes
        if self._size >= _OUTPUT_PIECE:
            await self._spill()

    async def _spill(self) -> None:
        pieces, self._pieces, self._size = self._pieces, [], 0

        def write() -> None:
            if self._file is None:
                os.makedirs(os.path.dirname(self._temp), exist_ok=True)
                self._file = open(self._temp, "wb")  # noqa: SIM115 - closed in finish() or discard()
            self._file.writelines(pieces)

        # (an abort does not wait for a write stuck on a dead mount; the store's fence keeps it from landing)
        await anyio.to_thread.run_sync(write, abandon_on_cancel=True)

    async def finish(self) -> None:
        await self._spill()

        def close() -> None:
            self._file.close()
            self._store.replace(self._temp, self._key, self._since)  # fenced and, where asked, durable

        await anyio.to_thread.run_sync(close, abandon_on_cancel=True)

    async def discard(self) -> None:
        def remove() -> None:
            if self._file is not None:
                self._file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._temp)

        await anyio.to_thread.run_sync(remove)


def key_pages(
    root: str, base: str, page_size: int, temporary: Callable[[str], bool], begins: str = ""
) -> Iterator[KeyPage]:
    """The keys (relative to ``root``, with ``/``) of the files below ``base``, ``page_size`` at a time, read
    entry by entry (``os.scandir``): a folder of ten million files is never held. A generator stepped in worker
    threads, one step at a time; files whose name ``temporary`` accepts (unfinished atomic writes) are left out,
    and in ``base`` itself the entries whose name does not begin with ``begins``."""
    if os.path.isfile(base):
        yield [os.path.relpath(base, root).replace(os.sep, "/")]
        return
    cut = len(os.path.join(root, ""))  # (paths below base start with root and a separator: os.path.relpath,
    # which normalises both paths, cost seconds a million files)
    page: KeyPage = []
    folders = [base]
    while folders:
        folder = folders.pop()
        try:
            entries = os.scandir(folder)
        except (FileNotFoundError, NotADirectoryError):
            continue  # (removed meanwhile, or nothing there)
        wanted = begins if folder is base else ""
        with entries:
            for entry in entries:
                if wanted and not entry.name.startswith(wanted):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif not temporary(entry.name):
                    page.append(entry.path[cut:] if os.sep == "/" else entry.path[cut:].replace(os.sep, "/"))
                    if len(page) == page_size:
                        yield page
                        page = []
    if page:
        yield page
