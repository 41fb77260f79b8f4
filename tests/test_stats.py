"""What ``SinkStats`` reports, measured against what happened: the write latencies are those of writes."""

from __future__ import annotations

import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from lighter_sink import Sink
from lighter_sink._stats import Samples
from tests.conftest import S3Server


def _burst(url: str | Path, n: int, **options: object) -> tuple[float, float, float]:
    """Put ``n`` objects of 140 bytes in one burst; return the write p50, p99 and the burst's wall time."""
    values = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)  # 128 bytes of npy header + 12 of data
    started = time.perf_counter()
    with Sink(url, **options) as sink:  # type: ignore[arg-type]
        for start in range(0, n, 256):
            sink.put_batch(range(start, min(n, start + 256)), values[start : start + 256])
    wall = time.perf_counter() - started
    assert sink.stats.items == n
    p50, p99 = sink.stats.write_seconds_p50, sink.stats.write_seconds_p99
    assert p50 is not None and p99 is not None
    return p50, p99, wall


def test_write_latency_of_a_local_burst_is_that_of_one_write(tmp_path: Path) -> None:
    p50, p99, wall = _burst(tmp_path / "preds", 4096)
    assert (tmp_path / "preds" / "140.npy").stat().st_size == 140
    # One small file written and renamed takes tens of microseconds; the burst, thousands of them.
    assert p50 < wall / 100, (p50, wall)
    assert p50 <= p99 < wall


@pytest.mark.s3
def test_write_latency_of_an_s3_burst_is_that_of_one_write(s3_server: S3Server, s3_bucket: str) -> None:
    p50, p99, wall = _burst(f"s3://{s3_bucket}/preds", 2048, storage_options=s3_server.storage_options)
    # 16 PUTs in flight: one PUT waits for at most the 15 others, the burst for all 1,024.
    assert p50 < wall / 10, (p50, wall)
    assert p50 <= p99 < wall


def test_samples_keep_the_last_values_appended() -> None:
    samples = Samples(4)
    assert len(samples) == 0 and list(samples) == []
    for value in (1.0, 2.0, 3.0):
        samples.append(value)
    assert sorted(samples) == [1.0, 2.0, 3.0]
    for value in (4.0, 5.0, 6.0):
        samples.append(value)
    assert len(samples) == 4 and sorted(samples) == [3.0, 4.0, 5.0, 6.0]
    with pytest.raises(ValueError, match="at least 1"):
        Samples(0)


def test_samples_hold_no_object_per_value() -> None:
    """Write times are taken for every batch of a run: a deque of float objects held thousands of small objects,
    scattered through the allocator's memory (which then could not give it back)."""
    samples = Samples(4096)
    tracemalloc.start()
    try:
        for value in range(20_000):
            samples.append(value / 7)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 1024, held
    assert len(samples) == 4096 and max(samples) == 19_999 / 7


def test_samples_appended_from_several_threads_are_all_kept() -> None:
    samples = Samples(10_000)
    threads = [threading.Thread(target=lambda k=k: [samples.append(k) for _ in range(2000)]) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(samples) == sorted([float(k) for k in range(4) for _ in range(2000)])
