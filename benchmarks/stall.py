"""What the sink costs the predict loop's thread, per batch, while uploads run: the callback stall, measured apart.

A loop that sleeps STEP ms (the host idles while a GPU computes), then puts a batch with ``Sink.put_batch``,
against each storage in turn, all in one process (no Lightning: the sink alone). Reported per storage:

  * put p50 / p99 / max, and how many puts took more than 2 ms: time the loop's thread spent in ``put_batch``;
  * wake-up lateness (mean, p99): how late the loop's thread got going again after each sleep, beyond the
    sleep itself: the wait to re-take the interpreter lock from the sink's threads, and for a core;
  * the same lateness with no sink at all, first, as the reference.

``--copy both`` measures the sink's copy at put: each storage runs with ``copy=True`` and ``copy=False``
(reported as "STORAGE no-copy"), in halves of ``--batches`` alternated on, off, off, on, so that a shared
machine's drift falls on both alike. The benchmark puts one tensor again and again, a reused buffer, which only
``copy=True`` stores as it was at each put.

Usage: python -m benchmarks.stall [--storages null,rclone,moto] [--batches 400] [--size 4KiB] [--batch 32]
       [--step-ms 30] [--backend fsspec|obstore] [--copy on|off|both] [--json out.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks._runner import environment, write_json
from benchmarks._servers import S3_SERVERS, s3_servers
from benchmarks._spec import parse_size
from lighter_sink import Sink

_SLOW = 0.002


def _loop(batches: int, step: float, put: Callable[[int], None] | None) -> tuple[list[float], list[float]]:
    """Seconds late after each sleep, and seconds in each put."""
    stalls: list[float] = []
    late: list[float] = []
    for index in range(batches):
        before = time.perf_counter()
        time.sleep(step)
        woke = time.perf_counter()
        late.append(woke - before - step)
        if put is not None:
            put(index)
            stalls.append(time.perf_counter() - woke)
    return late, stalls


def _figures(late: list[float], stalls: list[float]) -> dict[str, float]:
    late = sorted(late)
    figures = {"late_mean_ms": 1e3 * sum(late) / len(late), "late_p99_ms": 1e3 * late[int(0.99 * len(late))]}
    if stalls:
        stalls = sorted(stalls)
        figures |= {
            "put_p50_ms": 1e3 * stalls[len(stalls) // 2],
            "put_p99_ms": 1e3 * stalls[int(0.99 * len(stalls))],
            "put_max_ms": 1e3 * stalls[-1],
            "puts_over_2ms": sum(s > _SLOW for s in stalls),
        }
    return figures


def _with_sink(
    url: str, options: dict[str, Any], args: argparse.Namespace, elements: int, *, copy: bool, batches: int
) -> tuple[list[float], list[float]]:
    base = torch.randn(args.batch, elements)
    backend = args.backend if "://" in url else "fsspec"
    with Sink(url, storage_options=options, backend=backend, copy=copy) as sink:

        def put(index: int) -> None:
            start = index * args.batch
            sink.put_batch(range(start, start + args.batch), base)

        return _loop(batches, args.step_ms / 1e3, put)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storages", default="local," + ",".join(S3_SERVERS), help="local and S3 servers")
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--size", default="4KiB", help="bytes per prediction")
    parser.add_argument("--batch", type=int, default=32, help="predictions per batch")
    parser.add_argument("--step-ms", type=float, default=30.0, help="simulated accelerator time per batch")
    parser.add_argument("--backend", choices=["fsspec", "obstore"], default="fsspec", help="the sink's S3 backend")
    parser.add_argument(
        "--copy", choices=["on", "off", "both"], default="on", help="the sink's copy at put: copy=True, False, or both"
    )
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/stall.json"))
    args = parser.parse_args()
    storages = args.storages.split(",")
    elements = max(1, parse_size(args.size) // 4)  # float32
    results: dict[str, dict[str, float]] = {"no sink": _figures(*_loop(args.batches, args.step_ms / 1e3, None))}
    servers_wanted = [s for s in storages if s != "local"]
    # (copy, batches) runs per storage; with both, halves alternated on, off, off, on
    half = max(1, args.batches // 2)
    runs = {"on": [(True, args.batches)], "off": [(False, args.batches)]}.get(
        args.copy, [(True, half), (False, half), (False, half), (True, half)]
    )
    with s3_servers(servers_wanted) as servers, tempfile.TemporaryDirectory() as directory:
        for storage in storages:
            samples: dict[bool, tuple[list[float], list[float]]] = {}
            for copy, batches in runs:
                if storage == "local":
                    with tempfile.TemporaryDirectory(dir=directory) as where:
                        late, stalls = _with_sink(where, {}, args, elements, copy=copy, batches=batches)
                else:
                    server = servers[storage]
                    prefix = f"stall-{time.time_ns()}"
                    late, stalls = _with_sink(
                        server.url(prefix), server.storage_options, args, elements, copy=copy, batches=batches
                    )
                    server.remove(prefix)
                kept = samples.setdefault(copy, ([], []))
                kept[0].extend(late)
                kept[1].extend(stalls)
            for copy, (late, stalls) in samples.items():
                results[storage if copy or args.copy == "off" else f"{storage} no-copy"] = _figures(late, stalls)
    print(
        f"{args.batches} batches of {args.batch} x {args.size}, a put every {args.step_ms:g} ms, S3 through "
        f"{args.backend}, copy at put: {args.copy} (lateness: how late the loop woke after each sleep)"
    )
    for name, figures in results.items():
        line = f"  {name:14s} late mean {figures['late_mean_ms']:5.2f} ms  p99 {figures['late_p99_ms']:5.2f} ms"
        if "put_p50_ms" in figures:
            line += (
                f"   put p50 {figures['put_p50_ms']:.2f}  p99 {figures['put_p99_ms']:.2f}"
                f"  max {figures['put_max_ms']:.2f} ms  over 2 ms: {figures['puts_over_2ms']:.0f}"
            )
        print(line)
    write_json(args.json, {"environment": environment(), "arguments": vars(args), "results": results})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
