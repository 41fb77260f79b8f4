"""Skipping the compute of a resumed run: which samples have no stored prediction yet."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from fsspec.core import url_to_fs
from torch.utils.data import Dataset, Subset

from lighter_sink._ids import KeyTemplate
from lighter_sink._manifest import MANIFEST, PARTS, decode_records
from lighter_sink._store import is_local_url, local_path
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
        format: the sink's format (it decides the extension).
        key: the sink's key template.
        storage_options: passed to fsspec.
    """
    fmt = get_format(format)
    template = KeyTemplate(key)
    total = len(dataset)  # type: ignore[arg-type]
    if is_local_url(url):
        fs, root = url_to_fs(local_path(url))
    else:
        fs, root = url_to_fs(url, **dict(storage_options or {}))
    root = root.rstrip("/")
    try:
        found = fs.find(root, withdirs=False)
    except FileNotFoundError:
        found = []
    stored = {path[len(root) + 1 :] for path in found if path.startswith(root + "/")}
    if fmt.per_item_objects:
        missing = [i for i in range(total) if template.render(i) + fmt.extension not in stored]
    else:
        # rows of an array or a table: what the manifest and its parts record
        recorded: set[str] = set()
        for name in sorted(k for k in stored if k == MANIFEST or (k.startswith(PARTS + "/") and k.endswith(".jsonl"))):
            recorded.update(record.id for record in decode_records(fs.cat_file(f"{root}/{name}")))
        missing = [i for i in range(total) if str(i) not in recorded]
    return RemainingSubset(dataset, missing)
