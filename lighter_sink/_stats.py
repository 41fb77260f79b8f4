"""What a sink reports: a consistent snapshot of its counters, and the three figures a progress bar shows."""

from __future__ import annotations

import itertools
import math
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

__all__ = ["Samples", "SinkProgress", "SinkStats", "percentile"]


@dataclass(frozen=True, slots=True)
class SinkStats:
    """A snapshot of what the sink did so far.

    Attributes:
        items: predictions stored.
        bytes: encoded bytes stored.
        batches: batches handed to ``put``/``put_batch``.
        stall_seconds: time ``put`` spent blocked because the queue was full.
        queue_bytes: host bytes queued or being written right now.
        queue_high_water_bytes: the most host bytes ever held at once.
        write_seconds_p50: median time one write took once started, not counting its wait in the queue: one
            object (an upload with its retries, or a local file written and renamed), or for formats of rows
            (tables, arrays) one batch's rows. Over the last 4,096 writes.
        write_seconds_p99: 99th percentile of the same.
        retries: transient storage errors that were retried.
        failed: predictions that could not be stored.
        skipped: predictions not written because an earlier run stored them (``mode="resume"``).
        elapsed_seconds: time since the sink was opened.
    """

    items: int
    bytes: int
    batches: int
    stall_seconds: float
    queue_bytes: int
    queue_high_water_bytes: int
    write_seconds_p50: float | None
    write_seconds_p99: float | None
    retries: int
    failed: int
    skipped: int
    elapsed_seconds: float

    @property
    def mb_per_second(self) -> float:
        return self.bytes / 1e6 / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mb_per_second": self.mb_per_second}


class SinkProgress(NamedTuple):
    """What a progress bar shows, cheaply (no latency percentiles): see :meth:`~lighter_sink.Sink.progress`."""

    queue_bytes: int
    mb_per_second: float
    stall_seconds: float


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


class Samples:
    """The last ``size`` values appended (write times), in one array of doubles; appended from any thread.

    A ``deque(maxlen=size)`` of floats held one float object per value, each allocated among the objects of
    whatever was being written when its time was taken and kept for the next ``size`` writes: thousands of small
    objects, each able to keep its pool of the allocator's memory (and the arena around it) from being given
    back. An array holds the values, no objects.
    """

    __slots__ = ("_added", "_counter", "_values")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self._values = array("d", bytes(8 * size))
        self._counter = itertools.count()  # (its next() is atomic: threads that append at once take two places)
        self._added = 0

    def append(self, value: float) -> None:
        index = next(self._counter)
        self._values[index % len(self._values)] = value
        self._added = max(self._added, index + 1)

    def __len__(self) -> int:
        return min(self._added, len(self._values))

    def __iter__(self) -> Iterator[float]:
        return iter(self._values[: len(self)])
