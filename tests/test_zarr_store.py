"""The zarr adapter (formats/_zarr_store.py): zarr's own store contract over the sink's stores, and zarr through it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from zarr.core.buffer import Buffer, cpu, default_buffer_prototype
from zarr.testing.store import StoreTests

from lighter_sink._store import Store, open_store
from lighter_sink.formats._zarr_store import ZarrObjectStore

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("anyio_backend")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _AdapterTests(StoreTests[ZarrObjectStore, cpu.Buffer]):
    """zarr's ``StoreTests`` for the adapter; subclasses say which sink store it wraps.

    ``set``/``get`` reach the objects through the sink's store, bypassing the adapter, as the contract asks.
    """

    store_cls = ZarrObjectStore
    buffer_cls = cpu.Buffer

    async def set(self, store: ZarrObjectStore, key: str, value: Buffer) -> None:
        await store.object_store.put(key, [value.to_bytes()])

    async def get(self, store: ZarrObjectStore, key: str) -> Buffer:
        return self.buffer_cls.from_bytes(await store.object_store.get(key))

    @pytest.fixture
    async def store_kwargs(self, sink_store: Store) -> dict[str, Any]:
        return {"store": sink_store}

    def test_store_repr(self, store: ZarrObjectStore) -> None:
        assert repr(store) == f"ZarrObjectStore({store.object_store!r}, read_only=False)"

    def test_store_supports_writes(self, store: ZarrObjectStore) -> None:
        assert store.supports_writes

    def test_store_supports_listing(self, store: ZarrObjectStore) -> None:
        assert store.supports_listing

    async def test_serializable_store(self, store: ZarrObjectStore) -> None:
        pytest.skip("the adapter wraps a store open on one event loop (its connections, its threads): not picklable")


class TestOverALocalDirectory(_AdapterTests):
    @pytest.fixture
    async def sink_store(self, tmp_path: Path) -> AsyncIterator[Store]:
        store = await open_store(str(tmp_path / "array"))
        yield store
        await store.aclose()


class TestOverMemory(_AdapterTests):
    @pytest.fixture
    async def sink_store(self) -> AsyncIterator[Store]:
        url = f"memory://zarr-adapter-{uuid.uuid4().hex}"
        store = await open_store(url)
        yield store
        await store.delete_prefix("")  # (fsspec's memory filesystem is shared by the whole process)
        await store.aclose()


async def test_zarr_writes_and_reads_an_array_through_the_adapter(tmp_path: Path) -> None:
    sink_store = await open_store(str(tmp_path))
    try:
        values = np.arange(24, dtype=np.float32).reshape(4, 6)
        array = await zarr.api.asynchronous.create_array(
            ZarrObjectStore(sink_store), shape=(4, 6), chunks=(1, 6), dtype="float32"
        )
        await array.setitem(slice(None), values)
        assert sorted(await sink_store.list()) == ["c/0/0", "c/1/0", "c/2/0", "c/3/0", "zarr.json"]
        reader = ZarrObjectStore(sink_store, read_only=True)
        stored = await zarr.api.asynchronous.open_array(store=reader, mode="r")
        np.testing.assert_array_equal(np.asarray(await stored.getitem(slice(None))), values)
        with pytest.raises(ValueError, match="read-only"):
            await reader.set("c/0/0", cpu.Buffer.from_bytes(b"x"))
    finally:
        await sink_store.aclose()
    # and what it wrote is a plain zarr array, as zarr's own local store reads it
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path), mode="r")[:], values)


async def test_a_key_where_a_directory_stands_reads_as_absent(tmp_path: Path) -> None:
    sink_store = await open_store(str(tmp_path))
    try:
        await sink_store.put("c/0/0", [b"chunk"])
        adapter = ZarrObjectStore(sink_store)
        assert await adapter.get("c/0", default_buffer_prototype()) is None  # a directory here
        assert await adapter.get("c/0/0/0", default_buffer_prototype()) is None  # a file above it
    finally:
        await sink_store.aclose()
