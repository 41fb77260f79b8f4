"""Skipping the compute of a resumed run: which samples have no stored prediction yet."""

from __future__ import annotations

import array
import contextlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import anyio
import numpy as np
from torch.utils.data import Dataset, Subset

from lighter_sink._commit import orphan_records
from lighter_sink._errors import ConfigurationError
from lighter_sink._ids import KeyTemplate
from lighter_sink._idset import IdSet
from lighter_sink._layout import CONTROL_BEGINS, ControlKeys, OutputInfo
from lighter_sink._lease import read_lease, stored_generation
from lighter_sink._manifest import recorded_sets
from lighter_sink._store import Store, open_store
from lighter_sink.formats import Format, get_format

__all__ = ["RemainingSubset", "remaining"]

T = TypeVar("T")
_BLOCK = 2**20  # indices tested at a time


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
    format: str | Format | None = None,
    key: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> RemainingSubset[T]:
    """The samples of ``dataset`` (indexed ``0..len-1``, the default counter ids) not yet stored at ``url``.

    Use it with ``mode="resume"`` to skip the compute of what a killed run already stored::

        todo = remaining(url, dataset)
        trainer.predict(model, DataLoader(todo, batch_size=32), return_predictions=False)

    The sink records how it writes an output (its format and key template) before it writes any of it, so
    ``remaining`` learns them from the url. A url that holds nothing yet leaves every sample.

    Args:
        url: the sink's url.
        dataset: the full, sized dataset the first run predicted (unshuffled, one dataloader).
        format: the sink's format; needed only when the url holds several outputs (a table beside one object
            per prediction: pass that output's format, a named table's with its ``filename``), or when nothing
            there says how the output was written (a run of an earlier version killed before its commit).
        key: the sink's key template; needed only when nothing at the url says.
        storage_options: passed to fsspec.

    Raises:
        ConfigurationError: ``format`` or ``key`` contradicts how the output was written, or one is needed and
            was not given (the message says which and why).
    """
    total = len(dataset)  # type: ignore[arg-type]

    async def stored() -> IdSet:
        store = await open_store(url, dict(storage_options or {}))
        ids = IdSet()
        try:
            outputs: set[ControlKeys] = set()
            async for page in store.iter_list(begins=CONTROL_BEGINS):  # (what outputs the url holds)
                outputs.update(k for k in map(ControlKeys.owning, page) if k is not None)
            keys = _output_keys(url, outputs, format)
            if keys is None:
                return ids  # nothing was written here yet
            lease = await read_lease(store, keys)
            if lease is not None and lease.state != "running":
                return ids  # the run died before it wrote (removing an earlier output, say): resume starts over
            fmt, template = await _written_with(store, keys, format, key)
            generation = lease.generation if lease is not None else await stored_generation(store, keys)
            extension = fmt.extension if fmt.per_item_objects else ""
            recorded, ids = await recorded_sets(store, keys, generation, suffix=extension, ids=True)
            # what a killed run stored without recording it counts when the resumed sink can record it
            orphans = await orphan_records(store, keys, generation, fmt, template, recorded=recorded)
            ids.add(r.id for r in orphans)
        finally:
            await store.aclose()
        return ids

    done = anyio.run(stored, backend="asyncio")
    left = array.array("q")  # (8 bytes an index: a list of ten million ints holds 360 MB)
    for start in range(0, total, _BLOCK):  # (a block at a time: a search's positions cost 8 bytes an index)
        indices = np.arange(start, min(total, start + _BLOCK), dtype=np.int64)
        left.frombytes(indices[~done.contains_ints(indices)].tobytes())
    return RemainingSubset(dataset, left)


def _output_keys(url: str, found: set[ControlKeys], format: str | Format | None) -> ControlKeys | None:
    """The control keys of the output ``remaining`` counts: ``format``'s, else the url's only output's; None when
    the url holds no output at all (``found``: the outputs whose control objects the url holds)."""
    outputs = sorted(found, key=lambda k: k.name)
    names = ", ".join(f"{k.name!r} (under {k.base})" if k.name else "the url's own" for k in outputs)
    if format is not None:
        fmt = get_format(format)
        keys = ControlKeys(fmt.namespace)
        if outputs and keys not in outputs:
            raise ConfigurationError(
                f"{url} holds no output of the format {fmt!r}; its outputs: {names}. Pass the "
                "format of the output to count (a named table's with its filename=)"
            )
        return keys
    if len(outputs) > 1:
        raise ConfigurationError(
            f"{url} holds {len(outputs)} outputs ({names}): pass format= (and key=) of the one whose samples "
            "remain to be computed; a named table's format with its filename= (CsvFormat(filename='scores.csv'))"
        )
    return outputs[0] if outputs else None


async def _written_with(
    store: Store, keys: ControlKeys, format: str | Format | None, key: str | None
) -> tuple[Format, KeyTemplate]:
    """The format and key template the output at ``keys`` was written with: recorded by its sink (the
    description an unfinished run leaves, else the marker's summary), checked against those given."""
    info = await _recorded_info(store, keys)
    if info is None:
        if format is None:
            raise ConfigurationError(
                f"nothing at {store.url} says how its output was written: pass format= and key= as the sink had "
                "them (it was written by an earlier version of lighter-sink, or its control objects were removed)"
            )
        return get_format(format), KeyTemplate(key or "{id}")
    recorded, recorded_key, extension = info
    if key is not None and key != recorded_key:
        raise ConfigurationError(f"{store.url} was written with key={recorded_key!r}, not {key!r}")
    if format is not None:
        fmt = get_format(format)
        if fmt.name != recorded:
            raise ConfigurationError(f"{store.url} was written with format={recorded!r}, not {fmt.name!r}")
        return fmt, KeyTemplate(recorded_key)
    try:
        fmt = get_format(recorded)
    except ConfigurationError:
        raise ConfigurationError(
            f"{store.url} was written with the format {recorded!r}, which is not registered here: pass format= "
            "(the Format the sink had)"
        ) from None
    if extension is not None and fmt.per_item_objects and fmt.extension != extension:
        raise ConfigurationError(
            f"{store.url} was written by a format {recorded!r} whose objects end in {extension!r}; the format "
            f"registered as {recorded!r} writes {fmt.extension!r}: pass format= (the Format the sink had)"
        )
    return fmt, KeyTemplate(recorded_key)


async def _recorded_info(store: Store, keys: ControlKeys) -> tuple[str, str, str | None] | None:
    """``(format, key, extension)`` as the output's sink recorded them (the extension only in a description);
    None when nothing says."""
    with contextlib.suppress(FileNotFoundError, ValueError):
        info = OutputInfo.from_bytes(await store.get(keys.description))
        return info.format, info.key, info.extension
    with contextlib.suppress(FileNotFoundError, ValueError):
        summary = json.loads(await store.get(keys.success))
        if isinstance(summary, dict) and isinstance(summary.get("format"), str):
            return summary["format"], str(summary.get("key", "{id}")), None
    return None
