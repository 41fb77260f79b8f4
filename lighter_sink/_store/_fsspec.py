"""fsspec filesystems: async ones (s3fs, gcsfs) used natively on the sink's loop, others from worker threads.

An async fsspec instance belongs to the loop that made it, so :func:`open_store` creates it inside the sink's
loop, and this room closes its client there too. Synchronous filesystems (``memory://`` and other fsspec
backends) block: their calls run in worker threads, abandoned (never awaited) once their wait is given up.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread

from lighter_sink._store._base import LIST_PAGE, PART_SIZE, RetryPolicy, Store, check_listing
from lighter_sink._store._multipart import RAW_BODY, GcsOutput, PartBody, S3Output
from lighter_sink._store._s3 import S3_DELETE_BATCH, S3_SINGLE_PUT, abort_s3_uploads, delete_objects
from lighter_sink._store._urls import protocol_of
from lighter_sink._types import Buffer, KeyPages, Output

__all__ = ["AsyncFsStore", "ThreadFsStore"]

T = TypeVar("T")
logger = logging.getLogger(__name__)


class _Client(Protocol):
    """A filesystem's connection: an aiobotocore client (s3fs) or an aiohttp session (gcsfs, http)."""

    async def close(self) -> Any: ...


def _join(root: str, key: str) -> str:
    return f"{root.rstrip('/')}/{key}" if key else root


def _relative(root: str, path: str) -> str:
    root = root.rstrip("/") + "/"
    return path[len(root) :] if path.startswith(root) else path


class AsyncFsStore(Store):
    """An async fsspec filesystem (s3fs, gcsfs) used natively on the sink's loop.

    With ``s3_crc32`` an upload whose CRC-32 the caller computed sends it as the object's checksum
    (``x-amz-checksum-crc32``): the server verifies the body, and botocore, seeing the header, computes none.
    """

    contiguous_writes = True

    def __init__(
        self,
        url: str,
        retry: RetryPolicy,
        fs: Any,
        root: str,
        limiter: anyio.CapacityLimiter,
        *,
        s3_crc32: bool = False,
        s3: bool = False,
    ) -> None:
        super().__init__(url, retry)
        self._fs = fs
        self._root = root.rstrip("/")
        self._limiter = limiter
        self._s3_crc32 = s3_crc32
        self._s3 = s3
        self._gcs = protocol_of(url) in ("gs", "gcs")
        self._uploads: set[str] = set()  # multipart uploads in progress, which remove_incomplete leaves alone
        self._clients: list[_Client] = []  # what connect() opened, for aclose() to close

    async def _put_once(self, key: str, buffers: Sequence[Buffer], crc32: int | None) -> None:
        # (no fence: an asyncio request is cancelled with its task, and nothing of it wakes up later)
        # botocore takes bytes, bytearray or a file, not a memoryview (a format's single buffer, as torch.save's)
        data = buffers[0] if len(buffers) == 1 and isinstance(buffers[0], bytes | bytearray) else b"".join(buffers)
        size = memoryview(data).nbytes
        extra: dict[str, str] = {}
        # (s3fs switches to a multipart upload from 100 MiB, whose parts each carry their own checksum)
        if crc32 is not None and self._s3_crc32 and size < S3_SINGLE_PUT:
            extra["ChecksumAlgorithm"] = "CRC32"
            extra["ChecksumCRC32"] = base64.b64encode(crc32.to_bytes(4, "big")).decode("ascii")
        body: bytes | bytearray | PartBody = data
        if self._s3 and RAW_BODY < size < S3_SINGLE_PUT:
            # aiohttp writes a larger bytearray in one call, warning that it blocks the loop (a ResourceWarning):
            # a stream is sent a chunk at a time, as botocore sends bytes (s3fs slices what it sends in parts)
            body = PartBody(memoryview(data))
        # One PUT of the whole encoded object: much faster than file-object writes, and atomic on S3/GCS.
        async with self._limiter:
            await self._fs._pipe_file(_join(self._root, key), body, **extra)

    async def get(self, key: str) -> bytes:
        async with self._limiter:
            data: bytes = await self._retrying(key, lambda: self._fs._cat_file(_join(self._root, key)))
            return data

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        path = _join(self._root, key)
        async with self._limiter:
            try:
                data: bytes = await self._retrying(
                    key, lambda: self._fs._cat_file(path, start=start, end=start + length)
                )
            except FileNotFoundError:
                raise
            except OSError:
                # S3 and GCS refuse a range that starts at the object's end (416): an empty read, as a file's
                if start >= await self._retrying(key, lambda: self._fs._size(path)):
                    return b""
                raise
            return data

    async def exists(self, key: str) -> bool:
        return bool(await self._retrying(key, lambda: self._fs._exists(_join(self._root, key))))

    async def delete(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        paths = [_join(self._root, k) for k in keys]
        if self._s3:
            for start in range(0, len(paths), S3_DELETE_BATCH):
                batch = paths[start : start + S3_DELETE_BATCH]
                await self._retrying("delete", functools.partial(delete_objects, self._fs, batch, self.url))
            return
        with contextlib.suppress(FileNotFoundError):
            await self._retrying("delete", lambda: self._fs._rm(paths))

    async def create(self, key: str, data: bytes) -> bool:
        path = _join(self._root, key)
        try:
            await self._retrying(key, lambda: self._fs._pipe_file(path, data, mode="create"))
        except FileExistsError:
            return False
        return True

    async def list(self, prefix: str = "") -> list[str]:
        base = _join(self._root, prefix.rstrip("/"))
        self._fs.invalidate_cache()
        try:
            found = await self._retrying("list", lambda: self._fs._find(base, withdirs=False))
        except FileNotFoundError:
            return []
        return sorted(_relative(self._root, p) for p in found)

    async def iter_list(self, prefix: str = "", *, page_size: int = LIST_PAGE, begins: str = "") -> KeyPages:
        """One listing request a page (``ListObjectsV2`` on S3, ``objects.list`` on GCS), each retried on its own,
        ``begins`` part of the request's prefix; other filesystems list whole."""
        if not (self._s3 or self._gcs):
            async for keys in super().iter_list(prefix, page_size=page_size, begins=begins):
                yield keys
            return
        check_listing(page_size, begins)
        fs = self._fs
        bucket, folder, _ = fs.split_path(_join(self._root, prefix.rstrip("/")))
        below = (folder + "/" if folder else "") + begins
        cut = len(fs.split_path(self._root)[1].rstrip("/") + "/") if "/" in self._root else 0
        token: str | None = None
        while True:
            if self._s3:
                more = {"ContinuationToken": token} if token else {}
                call = functools.partial(
                    fs._call_s3, "list_objects_v2", Bucket=bucket, Prefix=below, MaxKeys=page_size, **more
                )
            else:
                more = {"pageToken": token} if token else {}
                call = functools.partial(
                    fs._call, "GET", "b/{}/o", bucket, json_out=True, prefix=below, maxResults=page_size, **more
                )
            try:
                page = await self._retrying("list", call)
            except FileNotFoundError:  # no bucket: nothing listed, as list
                return
            names = (
                [c["Key"] for c in page.get("Contents", ())] if self._s3 else [i["name"] for i in page.get("items", ())]
            )
            keys = [name[cut:] for name in names if not name.endswith("/")]
            if keys:
                yield keys
            token = page.get("NextContinuationToken") if self._s3 else page.get("nextPageToken")
            if not token or (self._s3 and not page.get("IsTruncated")):
                return

    def open_output(self, key: str, *, part_size: int = PART_SIZE) -> Output:
        """Streamed to S3 (a multipart upload) and GCS (a resumable upload); held for one PUT elsewhere."""
        path = _join(self._root, key)
        if self._s3:
            return S3Output(
                self,
                key,
                part_size,
                fs=self._fs,
                path=path,
                retrying=self._retrying,
                limiter=self._limiter,
                checksum=self._s3_crc32,
                own=self._uploads,
            )
        if self._gcs:
            return GcsOutput(self, key, part_size, fs=self._fs, path=path, retrying=self._retrying)
        return super().open_output(key, part_size=part_size)

    async def remove_incomplete(self) -> int:
        """S3: abort the multipart uploads under the url that a killed run left (but this store's own)."""
        if not self._s3:
            return 0
        aborted = await abort_s3_uploads(self._fs, self._root, self._retrying, self._uploads)
        if aborted:
            logger.info("aborted %d multipart uploads left by an interrupted run under %s", aborted, self.url)
        return aborted

    async def connect(self) -> None:
        """Open the filesystem's client now, on the loop that owns it, and keep it for :meth:`aclose`.

        s3fs's ``set_session()`` returns its aiobotocore client (with ``cache_regions``, ``get_s3`` the bucket's
        regional one); gcsfs's ``_set_session()`` (fsspec's spelling of an async method) and fsspec's http
        ``set_session()`` return their aiohttp session. An asynchronous instance's library closes none of them
        (or only at garbage collection, where aiohttp warns of an unclosed session).
        """
        fs = self._fs
        connect = getattr(fs, "set_session", None) or getattr(fs, "_set_session", None)
        if connect is None:  # another async filesystem: it manages its connections itself
            return
        client = await connect()
        self._clients.append(client)
        if self._s3 and getattr(fs, "cache_regions", False):
            bucket = fs.split_path(self._root)[0]
            regional = await self._retrying("connecting", lambda: fs.get_s3(bucket))
            if regional is not client:
                self._clients.append(regional)

    async def aclose(self) -> None:
        clients, self._clients = self._clients, []
        for client in clients:
            await client.close()


class ThreadFsStore(Store):
    """A synchronous fsspec filesystem (``memory://`` and others) driven from worker threads."""

    def __init__(self, url: str, retry: RetryPolicy, fs: Any, root: str, limiter: anyio.CapacityLimiter) -> None:
        super().__init__(url, retry)
        self._fs = fs
        self._root = root.rstrip("/")
        self._limiter = limiter

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        # Abandoned on cancellation: a call stuck in the filesystem holds neither the loop nor a timeout up.
        return await anyio.to_thread.run_sync(func, *args, limiter=self._limiter, abandon_on_cancel=True)

    def _pipe(self, key: str, data: bytes, since: int) -> None:
        # (the fence is checked before the call only: a filesystem without renames has no later point to check)
        self._check_fence(key, since)
        self._fs.pipe_file(_join(self._root, key), data)

    async def _put_once(self, key: str, buffers: Sequence[Buffer], crc32: int | None) -> None:
        data = bytes(buffers[0]) if len(buffers) == 1 else b"".join(buffers)
        await self._run(self._pipe, key, data, self.fence_epoch)

    async def get(self, key: str) -> bytes:
        data: bytes = await self._retrying(key, lambda: self._run(self._fs.cat_file, _join(self._root, key)))
        return data

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        # (a ranged read, not the whole object each time: the commit reads a manifest part a chunk at a time)
        read = functools.partial(self._fs.cat_file, _join(self._root, key), start=start, end=start + length)
        data: bytes = await self._retrying(key, lambda: self._run(read))
        return data

    async def exists(self, key: str) -> bool:
        return bool(await self._retrying(key, lambda: self._run(self._fs.exists, _join(self._root, key))))

    async def create(self, key: str, data: bytes) -> bool:
        path = _join(self._root, key)
        try:
            await self._retrying(
                key, lambda: self._run(functools.partial(self._fs.pipe_file, path, data, mode="create"))
            )
        except FileExistsError:
            return False
        return True

    async def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            path = _join(self._root, key)
            with contextlib.suppress(FileNotFoundError):
                await self._retrying(key, functools.partial(self._run, self._fs.rm_file, path))

    async def list(self, prefix: str = "") -> list[str]:
        base = _join(self._root, prefix.rstrip("/"))
        try:
            found = await self._retrying("list", lambda: self._run(lambda: self._fs.find(base, withdirs=False)))
        except FileNotFoundError:
            return []
        return sorted(_relative(self._root, p) for p in found)
