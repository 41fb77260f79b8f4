"""What ``SinkStats`` reports, measured against what happened: the write latencies are those of writes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from lighter_sink import Sink
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
