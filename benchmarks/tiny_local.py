"""How many tiny predictions per second a Sink stores to a local directory, against a plain loop.

Side by side in one run (the machines are shared and noisy, so only ratios within a run are meaningful), on
tmpfs (``--tmpfs``, the sink's own cost without the disk's) and on disk (``--disk``):
  * loop:       a plain single-thread loop: ``np.save`` to a temporary name, then ``os.replace`` (atomic, as the
                sink's objects are; no manifest, no checksum, not durable)
  * put:        ``Sink.put``, one call per prediction (tmpfs only)
  * put_batch:  ``Sink.put_batch``, one call per ``--batch`` predictions

It reports the three ratios the per-object targets name: tmpfs put / loop (>= 1.0x), tmpfs put_batch / loop
(>= 1.5x), disk put_batch / loop (>= 1.0x). Each variant runs ``--repeat`` times, interleaved; the best counts.

Usage: python -m benchmarks.tiny_local [-n 20000] [--repeat 3] [--batch 256] [--tmpfs /dev/shm] [--disk DIR]
       [--durable on|off] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._runner import RESULTS, environment
from lighter_sink import Sink

#: (place, variant) -> the least ratio to the loop the per-object targets ask for.
TARGETS = {("tmpfs", "put"): 1.0, ("tmpfs", "put_batch"): 1.5, ("disk", "put_batch"): 1.0}


def _loop(directory: Path, values: torch.Tensor) -> float:
    started = time.perf_counter()
    for i, value in enumerate(values):
        temp = directory / f".{i}.tmp.npy"  # (np.save appends .npy to a name without it)
        np.save(temp, value.numpy())
        os.replace(temp, directory / f"{i}.npy")
    return time.perf_counter() - started


def _put(directory: Path, values: torch.Tensor, durable: bool) -> float:
    started = time.perf_counter()
    with Sink(directory, durable=durable) as sink:
        for i, value in enumerate(values):
            sink.put(i, value)
    return time.perf_counter() - started


def _put_batch(directory: Path, values: torch.Tensor, durable: bool, batch: int) -> float:
    started = time.perf_counter()
    with Sink(directory, durable=durable) as sink:
        for start in range(0, len(values), batch):
            sink.put_batch(range(start, min(start + batch, len(values))), values[start : start + batch])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=20_000, help="predictions per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant (the best is reported)")
    parser.add_argument("--batch", type=int, default=256, help="predictions per put_batch")
    parser.add_argument("--tmpfs", type=Path, default=Path("/dev/shm"), help="a directory on tmpfs")
    parser.add_argument("--disk", type=Path, default=Path(tempfile.gettempdir()), help="a directory on disk")
    parser.add_argument("--durable", choices=("on", "off"), default="on", help="the sinks' durable option")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where tiny_local.json and .md go")
    args = parser.parse_args()
    values = torch.randn(args.n, 4)  # 16 bytes of data, 144-byte .npy files
    durable = args.durable == "on"
    put = functools.partial(_put, durable=durable)
    put_batch = functools.partial(_put_batch, durable=durable, batch=args.batch)
    places: dict[str, tuple[Path, list[tuple[str, Callable[[Path, torch.Tensor], float]]]]] = {
        "tmpfs": (args.tmpfs, [("loop", _loop), ("put", put), ("put_batch", put_batch)]),
        "disk": (args.disk, [("loop", _loop), ("put_batch", put_batch)]),
    }
    best: dict[str, dict[str, float]] = {place: {} for place in places}
    for place, (parent, variants) in places.items():
        # Variants interleaved, and directories removed only at the end: deleting tens of thousands of files
        # (with online discard on ext4) slows the file creations that follow it, which would skew the next one.
        root = Path(tempfile.mkdtemp(prefix="lighter-sink-bench-", dir=parent))
        try:
            for round_ in range(args.repeat):
                for index, (name, run) in enumerate(variants):
                    directory = root / f"{round_}-{index}"
                    directory.mkdir()
                    seconds = run(directory, values)
                    best[place][name] = min(best[place].get(name, float("inf")), seconds)
        finally:
            shutil.rmtree(root)
    rates = {place: {name: args.n / seconds for name, seconds in times.items()} for place, times in best.items()}
    ratios = {f"{place} {name}": rates[place][name] / rates[place]["loop"] for place, name in TARGETS}
    env = environment()
    header = (
        f"{args.n} predictions of 4 float32 (144-byte .npy files), put_batch of {args.batch}, durable "
        f"{args.durable}, best of {args.repeat} interleaved rounds; tmpfs {args.tmpfs}, disk {args.disk}"
    )
    lines = [
        "# Tiny predictions to a local directory",
        "",
        f"{env['when']} · {env['cpus']} CPUs · commit {env['commit']} · `python -m benchmarks.tiny_local`",
        "",
        header,
        "",
        "| place | variant | predictions/s | vs loop | target |",
        "|---|---|--:|--:|--:|",
    ]
    for place, by_variant in rates.items():
        for name, rate in by_variant.items():
            target = TARGETS.get((place, name))
            lines.append(
                f"| {place} | {name} | {rate:,.0f} | {rate / by_variant['loop']:.2f}x | "
                f"{'' if target is None else f'>= {target:.1f}x'} |"
            )
    lines += ["", "Ratios: " + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    data: dict[str, Any] = {"header": header, "n": args.n, "predictions_per_second": rates, "ratios": ratios}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tiny_local.md").write_text(text)
    (args.out / "tiny_local.json").write_text(json.dumps({"environment": env, **data}, indent=2) + "\n")
    print(f"wrote {args.out / 'tiny_local.md'}")


if __name__ == "__main__":
    main()
