"""Identifiers: the rank-aware counter and the rules that make an identifier a safe object key."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from numbers import Integral

from lighter_sink._errors import IdentifierError

__all__ = ["RankCounter", "validate_identifier", "validate_identifiers"]


class RankCounter:
    """Hands out the ids Lighter's writers assign: rank ``r`` numbers its samples ``r, r + W, r + 2W, ...``.

    With Lightning's non-padding distributed sampler and one unshuffled dataloader, rank ``r`` sees dataset
    indices ``r, r + W, ...`` in that order, so the counter equals the dataset index.
    """

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.rank = rank
        self.world_size = world_size
        self._next = rank

    @property
    def next_id(self) -> int:
        """The id the next sample will get."""
        return self._next

    def take(self, count: int) -> range:
        """Reserve ``count`` consecutive ids of this rank and return them."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        start = self._next
        self._next += count * self.world_size
        return range(start, self._next, self.world_size)

    def reset(self) -> None:
        self._next = self.rank


def validate_identifier(identifier: object) -> str:
    """Return ``identifier`` as a relative object key, or raise :class:`IdentifierError`.

    Accepted: non-negative integers and strings made of path segments separated by ``/``. Refused: empty ids,
    absolute paths, ``.`` and ``..`` segments, backslashes, NUL and other control characters, and names that start
    with ``_`` at the top level (they are reserved for ``_manifest.jsonl``, ``_SUCCESS`` and ``_parts/``).
    """
    if isinstance(identifier, bool):
        raise IdentifierError(f"identifier must be an int or a str, got bool {identifier!r}")
    if isinstance(identifier, Integral):
        value = int(identifier)
        if value < 0:
            raise IdentifierError(f"identifier must be >= 0, got {value}")
        return str(value)
    if not isinstance(identifier, str):
        raise IdentifierError(f"identifier must be an int or a str, got {type(identifier).__name__} {identifier!r}")
    if not identifier:
        raise IdentifierError("identifier must not be empty")
    for char in identifier:
        if unicodedata.category(char) == "Cc":
            raise IdentifierError(f"identifier {identifier!r} contains the control character {char!r}")
    if "\\" in identifier:
        raise IdentifierError(f"identifier {identifier!r} contains a backslash; use '/' to separate segments")
    if identifier.startswith("/"):
        raise IdentifierError(f"identifier {identifier!r} is an absolute path; ids must be relative")
    segments = identifier.split("/")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise IdentifierError(
                f"identifier {identifier!r} has an empty, '.' or '..' segment; ids must stay inside the url"
            )
    if segments[0].startswith("_"):
        raise IdentifierError(
            f"identifier {identifier!r} starts with '_', which is reserved for the sink's own objects"
        )
    return identifier


def validate_identifiers(identifiers: Sequence[object]) -> list[str]:
    """Validate a batch of identifiers and refuse duplicates inside it."""
    keys = [validate_identifier(i) for i in identifiers]
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        for key in keys:
            if key in seen:
                raise IdentifierError(f"identifier {key!r} appears twice in one batch")
            seen.add(key)
    return keys
