"""A compact set of ids (or object keys): ten million of them in megabytes, asked about a batch at a time.

A resumed run asks, for each batch put, which of its keys an earlier run stored; :func:`~lighter_sink.remaining`
asks which of a dataset's indices. A Python set of ten million strings holds about a gigabyte. Here the decimal
text of a number (:func:`~lighter_sink._types.is_numeric_id`) is kept as an int, in sorted intervals (a dense
range of counter ids costs a few bytes in all) and sorted single values (8 bytes each); any other text as its
128-bit BLAKE2b digest (16 bytes; two of ten million texts share one with a chance below 10^-24).

Values are gathered in a buffer and sorted into levels; a level is merged with the one below it once it is as
large (as in a log-structured merge tree), so adding ``n`` values costs ``O(n log n)`` and a lookup one binary
search per level (a few: their sizes halve at least).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from lighter_sink._types import is_numeric_id

__all__ = ["IdSet"]

#: Values gathered before they are sorted into a level.
BUFFER = 2**18
# Numbers of more digits are kept as text (an interval's end plus one must not overflow int64).
_INT_DIGITS = 18
_INT_LIMIT = 10**_INT_DIGITS

Bools = npt.NDArray[np.bool_]
Ints = npt.NDArray[np.int64]
Words = npt.NDArray[np.uint64]


class _Level(Protocol):
    size: int

    def merged(self: L, other: L) -> L: ...


L = TypeVar("L", bound=_Level)


class _IntLevel:
    """Sorted, disjoint, non-adjacent intervals ``[starts, ends]`` of two values or more, and the values alone."""

    __slots__ = ("ends", "singles", "size", "starts")

    def __init__(self, starts: Ints, ends: Ints) -> None:
        alone = starts == ends
        self.singles = starts[alone]
        self.starts = starts[~alone]
        self.ends = ends[~alone]
        self.size = len(self.singles) + 2 * len(self.starts)

    @classmethod
    def of(cls, values: Ints) -> _IntLevel:
        values = np.sort(values)  # (not np.unique: numpy 2 hashes first, ten times slower on a million ints)
        return cls(*_coalesce(values, values))

    def merged(self, other: _IntLevel) -> _IntLevel:
        starts = np.concatenate((self.singles, self.starts, other.singles, other.starts))
        ends = np.concatenate((self.singles, self.ends, other.singles, other.ends))
        order = np.argsort(starts, kind="stable")
        return _IntLevel(*_coalesce(starts[order], ends[order]))

    def contains(self, values: Ints) -> Bools:
        found = _sorted_contains(self.singles, values)
        if len(self.starts):
            at = np.searchsorted(self.starts, values, side="right") - 1
            found |= (at >= 0) & (values <= self.ends[np.maximum(at, 0)])
        return found


def _coalesce(starts: Ints, ends: Ints) -> tuple[Ints, Ints]:
    """Intervals sorted by start, overlapping or adjacent ones joined."""
    if not len(starts):
        return starts, ends
    reach = np.maximum.accumulate(ends)
    first = np.empty(len(starts), dtype=bool)
    first[0] = True
    np.greater(starts[1:], reach[:-1] + 1, out=first[1:])
    begins = np.flatnonzero(first)
    last = np.append(begins[1:] - 1, len(starts) - 1)
    return starts[begins], reach[last]


def _sorted_contains(values: npt.NDArray[np.generic], queries: npt.NDArray[np.generic]) -> Bools:
    if not len(values):
        return np.zeros(len(queries), dtype=bool)
    at = np.minimum(np.searchsorted(values, queries), len(values) - 1)
    return np.asarray(values[at] == queries)


class _DigestLevel:
    """128-bit digests as two 64-bit words, sorted by the first, then the second."""

    __slots__ = ("high", "low", "size")

    def __init__(self, high: Words, low: Words) -> None:
        order = np.lexsort((low, high))
        high, low = high[order], low[order]
        if len(high) > 1:  # (the same text added twice)
            keep = np.empty(len(high), dtype=bool)
            keep[0] = True
            keep[1:] = (high[1:] != high[:-1]) | (low[1:] != low[:-1])
            high, low = high[keep], low[keep]
        self.high = high
        self.low = low
        self.size = 2 * len(high)

    @classmethod
    def of(cls, digests: bytes) -> _DigestLevel:
        high, low = _words(digests)
        return cls(high.copy(), low.copy())

    def merged(self, other: _DigestLevel) -> _DigestLevel:
        return _DigestLevel(np.concatenate((self.high, other.high)), np.concatenate((self.low, other.low)))

    def contains(self, high: Words, low: Words) -> Bools:
        left = np.searchsorted(self.high, high, side="left")
        right = np.searchsorted(self.high, high, side="right")
        found: Bools = (right - left == 1) & (self.low[np.minimum(left, max(len(self.low) - 1, 0))] == low)
        # Two digests with one first word (a chance of 10^-5 among ten million): compare the second words of all
        for i in np.flatnonzero(right - left > 1):
            found[i] = bool((self.low[left[i] : right[i]] == low[i]).any())
        return found


class _Levels(Generic[L]):
    """Levels of one kind, merged as they are added so that each is at most half the one below it."""

    __slots__ = ("levels",)

    def __init__(self) -> None:
        self.levels: list[L] = []

    def add(self, level: L) -> None:
        levels = self.levels
        levels.append(level)
        while len(levels) > 1 and levels[-1].size * 2 > levels[-2].size:
            top = levels.pop()
            levels[-1] = levels[-1].merged(top)

    def single(self) -> L | None:
        """Every level merged into one (None when there is none)."""
        levels = self.levels
        while len(levels) > 1:
            top = levels.pop()
            levels[-1] = levels[-1].merged(top)
        return levels[0] if levels else None


class IdSet:
    """A set of strings (ids, or object keys) built once and asked about in batches; see the module docstring.

    Strings are added with :meth:`add` (or numbers with :meth:`add_ints`) and tested with :meth:`contains` (or
    :meth:`contains_ints`). A test sorts what was added since the last one into the levels first.
    """

    def __init__(self) -> None:
        self._ints: _Levels[_IntLevel] = _Levels()
        self._digests: _Levels[_DigestLevel] = _Levels()
        self._int_buffer: list[int] = []
        self._digest_buffer: list[bytes] = []

    def add(self, items: Iterable[str]) -> None:
        """Add ``items``: numbers' decimal text as ints, any other text as its digest."""
        ints, digests = self._int_buffer, self._digest_buffer
        if not isinstance(items, list):
            items = list(items)
        numbers = _numbers(items)
        if numbers is not None:
            ints.extend(numbers)
            items = []
        for item in items:
            if len(item) <= _INT_DIGITS and is_numeric_id(item):
                ints.append(int(item))
            else:
                digests.append(_digest(item))
        if len(ints) >= BUFFER:
            self._flush_ints()
        if len(digests) >= BUFFER:
            self._flush_digests()

    def add_ints(self, values: npt.ArrayLike) -> None:
        """Add the numbers ``values`` (ints from 0 on): what :meth:`add` of their decimal text adds."""
        array = np.asarray(values, dtype=np.int64).reshape(-1)
        if len(array) and (array.min() < 0 or array.max() >= _INT_LIMIT):
            self._flush_ints()
            self.add(str(v) for v in array.tolist())  # (negative: text ids; huge: kept as text, see add)
            return
        self._flush_ints()
        if len(array):
            self._ints.add(_IntLevel.of(array))

    def contains(self, items: Sequence[str]) -> Bools:
        """Whether each of ``items`` was added."""
        self._flush()
        numbers = _numbers(items)
        if numbers is not None:
            return self._contains_ints(np.array(numbers, dtype=np.int64))
        found = np.zeros(len(items), dtype=bool)
        numeric = [i for i, item in enumerate(items) if len(item) <= _INT_DIGITS and is_numeric_id(item)]
        if numeric:
            at = np.array(numeric, dtype=np.intp)
            found[at] = self._contains_ints(np.array([int(items[i]) for i in numeric], dtype=np.int64))
        if len(numeric) < len(items) and self._digests.levels:
            text = np.ones(len(items), dtype=bool)
            text[numeric] = False
            positions = np.flatnonzero(text)
            high, low = _words(b"".join(_digest(items[i]) for i in positions.tolist()))
            hits = np.zeros(len(positions), dtype=bool)
            for level in self._digests.levels:
                hits |= level.contains(high, low)
            found[positions] = hits
        return found

    def positions(self, items: Sequence[str], *, added: bool = True) -> list[int]:
        """The positions of ``items`` that were added (with ``added=False``: that were not); one item alone (a
        single ``put``) by scalar searches, a batch by :meth:`contains`."""
        if len(items) == 1:
            return [0] if (items[0] in self) is added else []
        found = self.contains(items)
        return np.flatnonzero(found if added else ~found).tolist()

    def contains_ints(self, values: npt.ArrayLike) -> Bools:
        """Whether the decimal text of each of the numbers ``values`` (ints from 0 on) was added."""
        array = np.asarray(values, dtype=np.int64).reshape(-1)
        if len(array) and (array.min() < 0 or array.max() >= _INT_LIMIT):
            return self.contains([str(v) for v in array.tolist()])
        self._flush()
        return self._contains_ints(array)

    def __contains__(self, item: object) -> bool:
        """One string (a single ``put`` of a resumed run): scalar searches, without the arrays of a batch."""
        if not isinstance(item, str):
            return False
        if self._int_buffer or self._digest_buffer:
            self._flush()
        if len(item) <= _INT_DIGITS and is_numeric_id(item):
            value = int(item)
            for level in self._ints.levels:  # (an empty array skipped: a search costs a microsecond)
                singles, starts = level.singles, level.starts
                if len(singles):
                    at = singles.searchsorted(value)
                    if at < len(singles) and singles[at] == value:
                        return True
                if len(starts):
                    at = starts.searchsorted(value, side="right") - 1
                    if at >= 0 and value <= level.ends[at]:
                        return True
            return False
        return any(level.contains(*_words(_digest(item))).any() for level in self._digests.levels)

    def __len__(self) -> int:
        """The number of distinct strings added (merges the levels into one of each kind)."""
        self._flush()
        count = 0
        ints, digests = self._ints.single(), self._digests.single()
        if ints is not None:
            count += len(ints.singles) + int((ints.ends - ints.starts + 1).sum())
        if digests is not None:
            count += len(digests.high)
        return count

    @property
    def nbytes(self) -> int:
        """Bytes held by the sorted levels (what was added since the last test aside)."""
        held = sum(a.nbytes for level in self._ints.levels for a in (level.singles, level.starts, level.ends))
        return int(held + sum(level.high.nbytes + level.low.nbytes for level in self._digests.levels))

    def _contains_ints(self, values: Ints) -> Bools:
        found = np.zeros(len(values), dtype=bool)
        for level in self._ints.levels:
            found |= level.contains(values)
        return found

    def _flush(self) -> None:
        self._flush_ints()
        self._flush_digests()

    def _flush_ints(self) -> None:
        if self._int_buffer:
            values = np.array(self._int_buffer, dtype=np.int64)
            self._int_buffer = []
            self._ints.add(_IntLevel.of(values))

    def _flush_digests(self) -> None:
        if self._digest_buffer:
            digests = b"".join(self._digest_buffer)
            self._digest_buffer = []
            self._digests.add(_DigestLevel.of(digests))


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _words(digests: bytes) -> tuple[Words, Words]:
    """The first and second 64-bit words of each of the 16-byte ``digests`` (views of the bytes)."""
    words = np.frombuffer(digests, dtype="<u8").reshape(-1, 2)
    return words[:, 0], words[:, 1]


def _numbers(items: Sequence[str]) -> list[int] | None:
    """The ints of ``items`` when every one is a number's decimal text below the int limit (counter ids, the
    common case: two conversions in C rather than a check per item); None when one is not."""
    try:
        numbers = list(map(int, items))
    except (ValueError, TypeError):
        return None
    # str(int(text)) == text: no sign, no leading zero, space, underscore or non-ASCII digit
    if not numbers or list(map(str, numbers)) != items or min(numbers) < 0 or max(numbers) >= _INT_LIMIT:
        return None
    return numbers
