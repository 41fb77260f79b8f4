"""Summarising an output from its marker and manifest, without reading its objects (``lighter-sink inspect``)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import anyio

from lighter_sink._layout import ControlKeys
from lighter_sink._lease import read_lease
from lighter_sink._store import Store, open_store
from lighter_sink._verify import READ_RETRY, get_optional, parse_summary, stored_records

__all__ = ["OutputInfo", "inspect_output"]


@dataclass(frozen=True, slots=True)
class OutputInfo:
    """What :func:`inspect_output` found: the marker's summary and an account of the manifest.

    Attributes:
        url: the output described.
        summary: the parsed ``_SUCCESS`` marker, or ``None`` when it is absent (the output is incomplete).
        manifest_found: whether ``_manifest.jsonl`` exists (without it, records come from per-rank parts).
        count: predictions recorded.
        bytes: their bytes, as recorded.
        min_nbytes: the smallest object, in bytes (0 when there is none).
        max_nbytes: the largest object, in bytes (0 when there is none).
        extensions: object file extensions and how many objects have each, most common first.
        shapes: ``(shape, dtype, count)`` for every distinct shape and dtype, most common first.
        objects: objects stored besides control objects, listed when the output is incomplete or its manifest is
            absent (0 otherwise: a complete output is not listed).
        unrecorded: how many of those no record names (a killed run's objects that resume records or rewrites).
        lease: ``_lease.json``'s fields when it is there (a run that owns the output, or one that gave it up), and
            ``live``: whether that run may still be writing.
        shards: for packed outputs (``tar``, ``parquet``), ``(predictions, extent)`` of each shard the records
            name, largest first: its predictions, and the bytes up to the end of its last one (a shard's size
            but for its trailer), from the records alone.
    """

    url: str
    summary: Mapping[str, Any] | None
    manifest_found: bool
    count: int
    bytes: int
    min_nbytes: int
    max_nbytes: int
    extensions: tuple[tuple[str, int], ...]
    shapes: tuple[tuple[tuple[int, ...], str, int], ...]
    objects: int = 0
    unrecorded: int = 0
    lease: Mapping[str, Any] | None = None
    shards: tuple[tuple[int, int], ...] = ()

    @property
    def complete(self) -> bool:
        """Whether the ``_SUCCESS`` marker is present."""
        return self.summary is not None

    @property
    def altered(self) -> bool:
        """Whether ``_SUCCESS`` vouches for what is not there: its manifest is absent or lists another count."""
        expected = None if self.summary is None else self.summary.get("count")
        return self.summary is not None and (not self.manifest_found or expected not in (None, self.count))

    @property
    def empty(self) -> bool:
        """Whether nothing of an output was found at the url (no marker, manifest, record, object nor lease)."""
        found = self.manifest_found or self.count or self.objects or self.lease is not None
        return self.summary is None and not found


def inspect_output(url: str, storage_options: Mapping[str, Any] | None = None) -> OutputInfo:
    """Summarise the output at ``url`` from its marker and manifest, without reading the objects.

    Raises:
        OSError: the marker or the manifest could not be read for another reason than being absent.
        ValueError: the marker or a manifest record cannot be parsed.
    """
    options = dict(storage_options or {})

    async def run() -> OutputInfo:
        store = await open_store(url, options, retry=READ_RETRY)
        try:
            return await _inspect(store)
        finally:
            await store.aclose()

    return anyio.run(run, backend="asyncio")


async def _inspect(store: Store) -> OutputInfo:
    keys = ControlKeys()
    marker = await get_optional(store, keys.success)
    summary = None if marker is None else parse_summary(marker)
    manifest = await get_optional(store, keys.manifest)
    records = await stored_records(store, keys, manifest)
    objects: list[str] = []
    lease = None
    if summary is None or manifest is None:  # unfinished or altered: what is stored, and who owns it
        objects = [key for key in await store.list() if not key.startswith("_")]
        lease = await read_lease(store, keys)
    paths = {r.path for r in records}
    sizes = [r.nbytes for r in records]
    extensions = Counter(_extension(r.path) for r in records if r.offset is None)
    shapes = Counter((tuple(r.shape), r.dtype) for r in records)
    shards: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        if r.offset is not None:
            shard = shards[r.path]
            shard[0] += 1
            shard[1] = max(shard[1], r.offset + r.nbytes)
    return OutputInfo(
        url=store.url,
        summary=summary,
        manifest_found=manifest is not None,
        count=len(records),
        bytes=sum(sizes),
        min_nbytes=min(sizes, default=0),
        max_nbytes=max(sizes, default=0),
        extensions=tuple(extensions.most_common()),
        shapes=tuple((shape, dtype, n) for (shape, dtype), n in shapes.most_common()),
        objects=len(objects),
        unrecorded=sum(key not in paths for key in objects),
        lease=None if lease is None else {**asdict(lease), "live": lease.live()},
        shards=tuple(sorted(((n, extent) for n, extent in shards.values()), key=lambda s: (-s[1], -s[0]))),
    )


def _extension(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    dot = name.rfind(".")
    return name[dot:] if dot > 0 else ""
