"""Skipping the compute of a resumed run: which samples have no stored prediction yet."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import anyio
from torch.utils.data import Dataset, Subset

from lighter_sink._commit import orphan_records
from lighter_sink._ids import KeyTemplate
from lighter_sink._layout import ControlKeys
from lighter_sink._lease import read_lease, stored_generation
from lighter_sink._manifest import read_records
from lighter_sink._store import open_store
from lighter_sink.formats import Format, get_format

__all__ = ["RemainingSubset", "remaining"]

T = TypeVar("T")


class RemainingSubset(Subset[T]):
    """The samples of ``dataset`` whose predictions are not stored yet.

    :class:`~lighter_sink.PredictionSink` numbers the samples of such a subset by their index in the full
    dataset, so a resumed run writes exactly the objects the first run would have written.
    """

    def __init__(self, dataset: Dataset[T], indices: Sequence[int]) -> None:
        super().__init__(dataset, indices)


def remaining(
    url: str,
    dataset: Dataset[T],
    *,
    format: str | Format = "npy",
    key: str = "{id}",
    storage_options: Mapping[str, Any] | None = None,
) -> RemainingSubset[T]:
    """The samples of ``dataset`` (indexed ``0..len-1``, the default counter ids) not yet stored at ``url``.

    Use it with ``mode="resume"`` to skip the compute of what a killed run already stored::

        todo = remaining(url, dataset)
        trainer.predict(model, DataLoader(todo, batch_size=32), return_predictions=False)

    Args:
        url: the sink's url.
        dataset: the full, sized dataset the first run predicted (unshuffled, one dataloader).
        format: the sink's format (it decides the extension, and where a named table's records are).
        key: the sink's key template.
        storage_options: passed to fsspec.
    """
    fmt = get_format(format)
    template = KeyTemplate(key)
    total = len(dataset)  # type: ignore[arg-type]
    keys = ControlKeys(fmt.namespace)

    async def stored() -> set[str]:
        store = await open_store(url, dict(storage_options or {}))
        try:
            lease = await read_lease(store, keys)
            if lease is not None and lease.state != "running":
                return set()  # the run died before it wrote (removing an earlier output, say): resume starts over
            generation = lease.generation if lease is not None else await stored_generation(store, keys)
            ids = set(await read_records(store, keys, generation))
            # what a killed run stored without recording it counts when the resumed sink can record it
            ids.update(r.id for r in await orphan_records(store, keys, generation, fmt, template))
        finally:
            await store.aclose()
        return ids

    done = anyio.run(stored, backend="asyncio")
    return RemainingSubset(dataset, [i for i in range(total) if str(i) not in done])
