"""A plain-loop job run as a real process and killed hard (``os._exit``) by the commit tests.

``python tests/_killed_run.py URL --ids 0,1,2 --value 2.0 [--format npy] [--key T] [--mode M] [--num-samples N]
[--shard-bytes B] [--flush]``
puts one prediction per id (a 2x2 tensor filled with ``value``); with ``--flush`` it records them in a manifest
part first. Then it dies without closing the sink: no commit, no clean-up, no atexit. ``max_queue_bytes=1``
makes every put wait until the one before it is stored, so every id but the last is stored when it dies.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lighter_sink import Sink


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--ids", required=True, help="comma-separated ids")
    parser.add_argument("--value", type=float, default=1.0)
    parser.add_argument("--format", default="npy")
    parser.add_argument("--key", default="{id}")
    parser.add_argument("--mode", default="overwrite")
    parser.add_argument("--num-samples", type=int, help="for zarr")
    parser.add_argument("--shard-bytes", type=int, help="for tar and parquet")
    parser.add_argument("--flush", action="store_true", help="record what was put before dying")
    args = parser.parse_args()
    sink = Sink(
        args.url,
        format=args.format,
        key=args.key,
        mode=args.mode,
        num_samples=args.num_samples,
        shard_bytes=args.shard_bytes,
        max_queue_bytes=1,
    ).open()
    for identifier in args.ids.split(","):
        sink.put(identifier, torch.full((2, 2), args.value))
    if args.flush:
        sink.flush()
    print("PUT", flush=True)
    os._exit(9)


def run_killed(url: Path | str, ids: Iterable[object], *args: str) -> subprocess.CompletedProcess[str]:
    """Run this script in a process of its own: put ``ids`` at ``url`` (with ``args``), and die as it does."""
    done = subprocess.run(
        [sys.executable, __file__, str(url), "--ids", ",".join(map(str, ids)), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 9, done.stderr[-3000:]
    return done


if __name__ == "__main__":
    main()
