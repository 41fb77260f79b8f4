"""Zarr through the sink's store: zarr's own ``Store`` interface implemented on top of an :class:`ObjectStore`.

zarr reads and writes metadata and chunks by key; this adapter hands every call to the store the sink opened, so
a zarr array gets the sink's retries, per-attempt timeouts, statistics and backends (fsspec or obstore) and needs
no client of its own (zarr-python's ``storage/`` package shows the shape: ``MemoryStore``, ``FsspecStore``).
It imports zarr at import: import it only once zarr is known to be installed.

What it does, and what it does not:

* ``get`` reads the whole object in one request (the sink's stores read whole objects); a byte range is sliced
  from it. zarr asks for ranges only to read inside shards, which the zarr format does not write (one row, one
  chunk, one object).
* No partial writes (``supports_partial_writes`` is false, as in every zarr store); writes, deletes and listing
  are supported.
* ``exists`` answers as the sink's store does: locally and through fsspec a key where a directory stands exists,
  as in zarr's ``FsspecStore``.
* ``list_prefix`` takes directory prefixes (``"c/"``, ``"a/b"``), as zarr's ``LocalStore`` and ``FsspecStore`` do.
* It is not picklable: it wraps a store that is open on one event loop, with its connections.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import anyio
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype

from lighter_sink._types import ObjectStore

__all__ = ["ZarrObjectStore"]

# A key where no object can be is absent to zarr: a directory stands there, or a file stands above it (locally).
_ABSENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def _directory(prefix: str) -> str:
    """``prefix`` as a directory prefix: ``""`` (everything) or ending in one ``/``."""
    prefix = prefix.rstrip("/")
    return f"{prefix}/" if prefix else ""


def _span(size: int, byte_range: ByteRequest | None) -> tuple[int, int]:
    if byte_range is None:
        return 0, size
    if isinstance(byte_range, RangeByteRequest):
        return byte_range.start, byte_range.end
    if isinstance(byte_range, OffsetByteRequest):
        return byte_range.offset, size
    return max(0, size - byte_range.suffix), size


class ZarrObjectStore(Store):
    """A zarr store whose keys are objects of the sink's ``store`` (see the module docstring).

    Args:
        store: the sink's store; keys are relative to its url, as zarr's are relative to the array's root.
        read_only: refuse writes and deletes (zarr's ``ValueError``), for readers such as ``verify``.
    """

    supports_writes: bool = True
    supports_deletes: bool = True
    supports_listing: bool = True

    def __init__(self, store: ObjectStore, *, read_only: bool = False) -> None:
        super().__init__(read_only=read_only)
        self.object_store = store

    def with_read_only(self, read_only: bool = False) -> ZarrObjectStore:
        return type(self)(self.object_store, read_only=read_only)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ZarrObjectStore)
            and other.object_store is self.object_store
            and other.read_only == self.read_only
        )

    def __hash__(self) -> int:
        return hash((id(self.object_store), self.read_only))

    def __repr__(self) -> str:
        return f"ZarrObjectStore({self.object_store!r}, read_only={self.read_only})"

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        if byte_range is not None and not isinstance(
            byte_range, (RangeByteRequest, OffsetByteRequest, SuffixByteRequest)
        ):
            # zarr's contract: its stores refuse a request they do not know with this message
            raise TypeError(f"Unexpected byte_range, got {byte_range!r}")
        await self._ensure_open()
        try:
            data = await self.object_store.get(key)
        except _ABSENT:
            return None
        if byte_range is None:
            return prototype.buffer.from_bytes(data)
        start, stop = _span(len(data), byte_range)
        return prototype.buffer.from_bytes(memoryview(data)[start:stop])

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        requests = list(key_ranges)
        values: list[Buffer | None] = [None] * len(requests)

        async def one(index: int, key: str, byte_range: ByteRequest | None) -> None:
            values[index] = await self.get(key, prototype, byte_range)

        # (the sink's store bounds how many requests are in flight at once)
        async with anyio.create_task_group() as tg:
            for index, (key, byte_range) in enumerate(requests):
                tg.start_soon(one, index, key, byte_range)
        return values

    async def exists(self, key: str) -> bool:
        return await self.object_store.exists(key)

    async def set(self, key: str, value: Buffer) -> None:
        self._check_writable()
        await self._ensure_open()
        await self.object_store.put(key, [value.to_bytes()])

    async def delete(self, key: str) -> None:
        self._check_writable()
        await self.object_store.delete([key])

    async def delete_dir(self, prefix: str) -> None:
        # one bulk delete of what the listing found (zarr's default deletes key after key)
        self._check_writable()
        await self.object_store.delete([key async for key in self.list_prefix(_directory(prefix))])

    async def list(self) -> AsyncIterator[str]:
        for key in await self.object_store.list():
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for key in await self.object_store.list(prefix):
            if key.startswith(prefix):
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        base = _directory(prefix)
        keys = await self.object_store.list(base)
        children = {key[len(base) :].split("/", 1)[0] for key in keys if key.startswith(base)}
        for child in sorted(children):
            yield child
