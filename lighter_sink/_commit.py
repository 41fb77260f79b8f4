"""The commit protocol: prepare the output for a run, record what it stored, and commit it.

Rank 0 takes the output's lease (see :mod:`lighter_sink._lease`), makes the url what ``mode`` says before anything
is written, renews the lease while the run lives, and at the end (once every rank flushed) finishes the format's
output, merges the manifest parts and writes ``_SUCCESS`` last. Only the sink writes control objects.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.to_thread

from lighter_sink._checksum import crc32
from lighter_sink._errors import CommitError, ConfigurationError, DestinationError
from lighter_sink._handoff import Handoff
from lighter_sink._ids import KeyTemplate
from lighter_sink._idset import IdSet
from lighter_sink._layout import ControlKeys, OutputInfo
from lighter_sink._lease import (
    LEASE_SECONDS,
    RENEW_SECONDS,
    Lease,
    acquire_lease,
    check_lease,
    read_lease,
    renew_lease,
    stored_generation,
)
from lighter_sink._manifest import path_keys, recorded_ids, recorded_sets, write_success
from lighter_sink._merge import manifest_records, write_manifest
from lighter_sink._store import Store, check_local_destination, local_path
from lighter_sink._types import Record, encode_records
from lighter_sink.formats import Format, FormatWriter

__all__ = ["Ownership", "default_all_ok", "orphan_records", "owned_key"]

logger = logging.getLogger(__name__)
_RELEASE_SECONDS = 5.0


def default_all_ok(world_size: int) -> Callable[[bool], bool]:
    """The ranks' agreement: True on every rank only when every rank passed True (an all-reduce of a flag)."""
    if world_size == 1:
        return lambda ok: ok
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigurationError(
            f"world_size={world_size} needs torch.distributed to be initialised, or an all_ok callable "
            "that returns True only when every rank passed True"
        )

    def all_ok(ok: bool) -> bool:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1 if ok else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    return all_ok


class Ownership:
    """One rank's part in the commit protocol, on the sink's event loop.

    Rank 0 takes the output (:meth:`prepare`), keeps it (:meth:`keep_lease`), commits it (:meth:`commit`) and
    gives it up (:meth:`release`); every rank learns the generation it writes (:meth:`join`).
    """

    def __init__(
        self,
        url: str,
        fmt: Format,
        key: KeyTemplate,
        mode: str,
        *,
        keys: ControlKeys,
        run: str,
        rank: int,
        handoff: Handoff,
    ) -> None:
        self.url = url
        self.format = fmt
        self.key = key
        self.mode = mode
        self.keys = keys
        self.run = run
        self.rank = rank
        self.handoff = handoff
        self.store: Store | None = None
        self.generation: str | None = None
        self.lease: Lease | None = None  # rank 0's, while it holds the output
        self._lease_lock = anyio.Lock()
        self._renewal: anyio.CancelScope | None = None

    async def prepare(self) -> None:
        """Rank 0: take the output (its lease), then make it what ``mode`` says before anything is written."""
        try:
            await self._prepare()
        except DestinationError:
            raise
        except Exception as exc:
            raise DestinationError(f"cannot prepare {self.url}: {type(exc).__name__}: {exc}") from exc

    async def _prepare(self) -> None:
        store = self.store
        assert store is not None
        if store.is_local:
            await anyio.to_thread.run_sync(check_local_destination, local_path(self.url))
        keys = self.keys
        if self.mode == "error":
            async with contextlib.aclosing(store.iter_list(page_size=1)) as pages:
                async for existing in pages:  # (one object says enough: one request)
                    raise DestinationError(
                        f"{self.url} already holds objects (for example {existing[0]!r}) and "
                        "mode='error' refuses a non-empty url; use mode='overwrite' or mode='resume'"
                    )
        lease, previous = await acquire_lease(store, keys, self.run)
        self.lease = lease  # (held from here on: an abort releases it)
        # How the output is written, before anything of it is: what a killed or aborted run leaves tells a reader
        # (remaining()) which objects are its own.
        fmt = self.format
        info = OutputInfo(fmt.name, self.key.template, fmt.extension if fmt.per_item_objects else "", keys.name)
        await store.put(keys.description, [info.to_bytes()])
        if self.mode == "resume" and (previous is None or previous.state == "running"):
            # The generation resumed: the dead or finished run's, else the committed output's.
            if previous is not None:
                generation = previous.generation
            else:
                generation = await stored_generation(store, keys) or self.run
            lease = await self._set_lease(lease.renewed(generation=generation, state="running"))
            await store.delete([keys.success])  # a stale marker must never vouch for this run
            await store.remove_incomplete()
            if self.format.per_item_objects:
                await self._adopt_orphans(generation)
        else:
            # overwrite, error, or a resume of a run that died before it wrote (while it removed an earlier
            # output, say): a new generation, and nothing of the earlier one may stay reachable before it writes.
            lease = await self._set_lease(lease.renewed(generation=self.run, state="clearing"))
            await self._clear_output()
            lease = await self._set_lease(lease.renewed(state="running"))
        self.generation = lease.generation

    async def _set_lease(self, lease: Lease) -> Lease:
        assert self.store is not None
        await self.store.put(self.keys.lease, [lease.to_bytes()])
        self.lease = lease
        return lease

    async def _clear_output(self) -> None:
        """Overwrite: remove the earlier output (marker first), everything it recorded, and every object this
        output's format and key could have written, so that nothing of it can be adopted or listed later."""
        store = self.store
        assert store is not None
        keys = self.keys
        await store.delete([keys.success])
        suffix = self.format.extension if self.format.per_item_objects else ""
        recorded, _ = await recorded_sets(store, keys, None, suffix=suffix)
        control = (keys.parts + "/", keys.scratch + "/")
        removed = 0
        records: list[str] = []  # the manifest and parts go last: an interrupted clear leaves what they record known
        async for page in store.iter_list():  # a page at a time; the listing goes on past what was removed
            found = recorded.contains(path_keys(page, suffix)).tolist()
            doomed = []
            for key, listed in zip(page, found, strict=True):
                if key == keys.manifest or key.startswith(control):
                    records.append(key)
                elif listed or owned_key(key, self.format, self.key):
                    doomed.append(key)
            await store.delete(doomed)
            removed += len(doomed)
        await store.delete(records)
        removed += len(records)
        if removed:
            logger.info("overwrite: removed %d objects of an earlier run under %s", removed, self.url)
        await store.remove_incomplete()

    async def _adopt_orphans(self, generation: str) -> None:
        """Resume: record what the resumed run stored but could not record (see :func:`orphan_records`)."""
        assert self.store is not None
        records = await orphan_records(self.store, self.keys, generation, self.format, self.key)
        if records:
            await self.store.put(self.keys.part(generation, self.run, self.rank, 0), [encode_records(records)])

    async def join(self) -> None:
        """Every rank, once rank 0 prepared the output: learn its generation, and on resume what is recorded."""
        store = self.store
        assert store is not None
        if self.generation is None:
            lease = await read_lease(store, self.keys)
            if lease is None:
                raise DestinationError(f"rank 0's lease of {self.url} is missing; another run removed it")
            self.generation = lease.generation
        if self.mode == "resume":
            # The keys whose object is recorded: each recorded path less the format's extension (a key is stored
            # when its path is recorded), or for rows of an array or a table the key of each recorded id.
            if self.format.per_item_objects:
                stored, _ = await recorded_sets(store, self.keys, self.generation, suffix=self.format.extension)
            else:
                stored = IdSet()
                render = self.key.render
                async for ids, _paths in recorded_ids(store, self.keys, self.generation):
                    stored.add(ids if self.key.template == "{id}" else [render(i) for i in ids])
            self.handoff.stored = stored

    async def keep_lease(self) -> None:
        """Rank 0: renew the lease while the run lives; losing it fails the run (another run took the output)."""
        store = self.store
        assert store is not None
        renewed_at = time.monotonic()
        with anyio.CancelScope() as self._renewal:
            while True:
                await anyio.sleep(RENEW_SECONDS)
                async with self._lease_lock:
                    if self.lease is None:
                        return
                    try:
                        self.lease = await renew_lease(store, self.keys, self.lease)
                        renewed_at = time.monotonic()
                    except CommitError as exc:
                        self.handoff.fail(exc, [])
                        return
                    except Exception as exc:
                        if time.monotonic() - renewed_at > LEASE_SECONDS:
                            self.handoff.fail(CommitError(f"could not renew the lease of {self.url}: {exc!r}"), [])
                            return
                        logger.warning("renewing the lease of %s failed, trying again: %r", self.url, exc)

    def stop_renewing(self) -> None:
        """On the loop: end :meth:`keep_lease` (the run is ending; :meth:`release` gives the lease up)."""
        if self._renewal is not None:
            self._renewal.cancel()

    async def release(self, *, committed: bool) -> None:
        """Give the output up: delete the lease once the run committed, or aborted while writing (its parts say
        which generation a resumed run continues); an abort before that leaves it marked released, so that a
        resumed run knows the earlier output may be half removed and starts a new generation."""
        store = self.store
        if store is None:
            return
        async with self._lease_lock:
            lease, self.lease = self.lease, None
            if lease is None:
                return
            held = await read_lease(store, self.keys)
            if held is None or held.run != lease.run:
                return
            if committed or lease.state == "running":
                await store.delete([self.keys.lease])
            else:
                await store.put(self.keys.lease, [lease.renewed(released=True).to_bytes()])

    async def release_briefly(self, timeout: float | None) -> None:
        """Best effort, briefly: an abort is prompt, and a lease left behind runs out on its own."""
        with anyio.move_on_after(min(timeout or _RELEASE_SECONDS, _RELEASE_SECONDS)):
            await self.release(committed=False)  # (a no-op after a commit, which deleted it)

    async def commit(self, writer: FormatWriter | None, summary: Mapping[str, Any], *, durable: bool) -> dict[str, Any]:
        """Rank 0, once every rank flushed: merge the manifest, finish the format's output, write ``_SUCCESS``.

        The manifest is merged first (streamed: rank 0's memory does not grow with the predictions), and the
        format reads the records back from it in id order; the parts go only once both are written, so that a
        commit that fails on the way leaves what a resumed run needs (its merge takes a part that repeats a line
        of the manifest as one record).
        """
        store = self.store
        assert store is not None and self.generation is not None and self.lease is not None
        keys = self.keys
        merged = await write_manifest(store, keys, self.generation)
        if writer is not None:
            await writer.commit(manifest_records(store, keys))
            if durable:  # (what the format wrote at commit, a zarr array's metadata say; tables fsync their own)
                await store.sync()
        await store.delete(merged.parts)
        result = {**summary, "count": merged.count, "bytes": merged.nbytes}
        # Only the run that owns the output commits; the marker goes last (S3 has no rename), and then the
        # output is given up.
        await check_lease(store, keys, self.lease)
        await write_success(store, keys, result)
        try:
            await self.release(committed=True)
            await store.delete([keys.description])  # (_SUCCESS says the same)
        except Exception as exc:  # committed all the same: the lease runs out on its own
            logger.warning("committed %s, but its lease or description could not be removed: %r", self.url, exc)
        return result


def owned_key(key: str, fmt: Format, template: KeyTemplate) -> bool:
    """Whether ``key`` is an object that an output of ``fmt`` with key ``template`` could have written."""
    if key.startswith("_") or key.rsplit("/", 1)[-1].startswith("."):
        return False  # control objects, other outputs' and temporary files
    if not fmt.per_item_objects:
        return any(key == o or (o.endswith("/") and key.startswith(o)) for o in fmt.outputs)
    extension = fmt.extension
    if not key.endswith(extension):
        return False
    return template.parse(key[: len(key) - len(extension)] if extension else key) is not None


async def orphan_records(
    store: Store,
    keys: ControlKeys,
    generation: str | None,
    fmt: Format,
    template: KeyTemplate,
    *,
    recorded: IdSet | None = None,
) -> list[Record]:
    """Records of the objects ``generation`` stored but never recorded (a killed run's), from their bytes.

    Orphans are the objects this output could have written that no record mentions (an overwrite removes the
    earlier output before its generation writes anything, so they are this generation's). One whose id cannot
    be read back from its key, or whose format cannot describe it, gets no record: resume writes it again when
    its id is put, and :func:`~lighter_sink.remaining` counts it as missing. ``recorded``: ``generation``'s
    recorded paths as :func:`~lighter_sink._manifest.recorded_sets` gives them with the format's extension, when
    the caller read them already. The url is listed a page at a time; only the orphans are read.
    """
    if not fmt.per_item_objects:
        return []
    extension = fmt.extension
    if recorded is None:
        recorded, _ = await recorded_sets(store, keys, generation, suffix=extension)
    records: list[Record] = []
    async for page in store.iter_list():
        candidates = [path for path in page if owned_key(path, fmt, template)]
        found = recorded.contains(path_keys(candidates, extension)).tolist()
        for path, listed in zip(candidates, found, strict=True):
            if listed:
                continue
            identifier = template.parse(path[: len(path) - len(extension)] if extension else path)
            if identifier is None:
                continue
            data = await store.get(path)
            try:
                shape, dtype = await anyio.to_thread.run_sync(fmt.describe, data)
            except NotImplementedError:
                continue  # (png, txt, writer functions)
            except Exception as exc:
                logger.warning("%s/%s cannot be read back (%r); it is written again if put", store.url, path, exc)
                continue
            records.append(Record(identifier, path, len(data), f"{crc32(data, 0):08x}", shape, dtype))
    return records
