"""How many tiny predictions per second a Sink stores to a local directory.

Side by side in one run (the machines are shared and noisy, so only ratios within a run are meaningful):
  * raw:        a plain Python loop writing each array with np.save (no atomicity, no manifest)
  * put:        Sink.put, one call per prediction
  * put_batch:  Sink.put_batch, one call per batch of 64

Usage: python -m benchmarks.tiny_local [-n 20000] [--repeat 3] [--dir PARENT] [--durable on|off|both] [--json out.json]

``--dir /dev/shm`` writes to memory (tmpfs): the sink's own cost per prediction, without the disk's noise.
``--durable both`` runs each Sink variant with ``durable=True`` and ``durable=False`` in turn, in the same run:
the cost of making the run durable before ``_SUCCESS`` (one ``syncfs``, fsyncs of the manifest and the marker).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lighter_sink import Sink


def _raw(directory: Path, values: torch.Tensor) -> float:
    started = time.perf_counter()
    for i, value in enumerate(values):
        np.save(directory / f"{i}.npy", value.numpy())
    return time.perf_counter() - started


def _put(directory: Path, values: torch.Tensor, durable: bool = True) -> float:
    started = time.perf_counter()
    with Sink(directory, durable=durable) as sink:
        for i, value in enumerate(values):
            sink.put(i, value)
    return time.perf_counter() - started


def _put_batch(directory: Path, values: torch.Tensor, durable: bool = True, batch: int = 64) -> float:
    started = time.perf_counter()
    with Sink(directory, durable=durable) as sink:
        for start in range(0, len(values), batch):
            sink.put_batch(range(start, min(start + batch, len(values))), values[start : start + batch])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=20_000, help="predictions per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant (the best is reported)")
    parser.add_argument("--dir", type=Path, help="where to create the run's directories (default: the temp dir)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--durable", choices=("on", "off", "both"), default="on", help="the sinks' durable option")
    args = parser.parse_args()
    values = torch.randn(args.n, 4)  # 16 bytes of data, 144-byte .npy files
    variants: list[tuple[str, Callable[[Path, torch.Tensor], float]]] = [("raw np.save loop", _raw)]
    for name, run in (("Sink.put", _put), ("Sink.put_batch(64)", _put_batch)):
        for durable in {"on": (True,), "off": (False,), "both": (True, False)}[args.durable]:
            label = name if args.durable == "on" else f"{name} durable={durable}"
            variants.append((label, functools.partial(run, durable=durable)))
    best = dict.fromkeys((name for name, _ in variants), float("inf"))
    # Variants interleaved, and directories removed only at the end: deleting tens of thousands of files
    # (with online discard on ext4) slows the file creations that follow it, which would skew the next variant.
    root = Path(tempfile.mkdtemp(prefix="lighter-sink-bench-", dir=args.dir))
    try:
        for round_ in range(args.repeat):
            for index, (name, run) in enumerate(variants):
                directory = root / f"{round_}-{index}"
                directory.mkdir()
                best[name] = min(best[name], run(directory, values))
    finally:
        shutil.rmtree(root)
    results = {name: args.n / seconds for name, seconds in best.items()}
    print(
        f"{args.n} predictions of 4 float32 under {root.parent} ({platform.node()}, {platform.processor() or 'cpu'}):"
    )
    for name, rate in results.items():
        print(f"  {name:<33} {rate:>9,.0f} predictions/s   ({rate / results['raw np.save loop']:.2f}x raw)")
    if args.json:
        args.json.write_text(
            json.dumps({"n": args.n, "directory": str(root.parent), "predictions_per_second": results}, indent=2)
        )


if __name__ == "__main__":
    main()
