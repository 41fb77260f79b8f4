"""Does writing predictions overlap with compute? The same work, side by side, in one run.

For each storage and workload, each in a fresh process:
  (a) compute only       Trainer.predict with no writer
  I/O only               raw writes of the same bytes at the same concurrency, no Lightning, no sink (the ceiling;
                         on S3 from a fresh client, whose start-up every writer also pays)
  (b) Lighter-style      a callback that writes every prediction synchronously in on_predict_batch_end
  (c) BasePredictionWriter   Lightning's write_on_batch_end doing the same synchronous writes
  (d) PredictionSink     lighter-sink

Storage: a local directory, and S3 on loopback servers each in its own process: a null endpoint that discards
what it gets (the client side alone), rclone serve s3 (disk-backed) and moto's server (in memory). Accelerator
time is simulated by sleeping in predict_step (the host idles while a GPU computes); one workload runs a real
conv net on the CPU instead. Workloads are SIZE:ITEMS:BATCH:STEP_MS, e.g. 1MiB:128:8:60, or conv:ITEMS:BATCH.

Writes benchmarks/results/overlap.{json,md,png} (overlap-quick.* with --quick). The machines are shared and
noisy: compare ratios within one run, not absolute times across runs.

``--copy both`` adds (d') PredictionSink with ``copy=False`` next to (d), in the same rotation: what the sink's
copy of each batch at put costs (``--copy off`` runs (d') in place of (d)).

Usage: python -m benchmarks.overlap [--quick] [--storages local,null,rclone,moto] [--workloads SPEC ...]
       [--copy on|off|both]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _report
from benchmarks._runner import (
    RESULTS,
    drop_dirty_pages,
    environment,
    exit_cleanly_on_signals,
    run_isolated,
    write_results,
)
from benchmarks._servers import S3_SERVERS, Server, admin_fs, s3_servers
from benchmarks._spec import RunSpec, Workload, parse_workload

STORAGES = ("local", *S3_SERVERS)
# 2-4 s of simulated accelerator time per workload (64 batches for the per-batch stall percentiles), so that
# fixed costs (a client's start-up, the commit) do not dominate; two rounds take about 15 minutes on 2 cores.
FULL = {
    "workloads": ["4KiB:2048:32:30", "1MiB:512:8:60", "16MiB:16:2:120"],
    "model": "conv:192:8",
    "repeat": 2,
    "compute_per_storage": True,
}
QUICK = {
    "workloads": ["4KiB:256:32:20", "1MiB:32:8:40", "16MiB:6:2:60"],
    "model": "conv:32:8",
    "repeat": 1,
    "compute_per_storage": False,
}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts: about a minute")
    parser.add_argument("--storages", default=",".join(STORAGES), help="comma-separated: %(default)s")
    parser.add_argument("--workloads", nargs="+", metavar="SPEC", help="SIZE:ITEMS:BATCH:STEP_MS each")
    parser.add_argument("--model", metavar="SPEC", help="conv:ITEMS:BATCH (the real CPU model), or 'none'")
    parser.add_argument("--model-storages", default="local,rclone", help="storages for the model workload")
    parser.add_argument("--concurrency", type=int, default=16, help="sink concurrency = raw-write tasks/threads")
    parser.add_argument(
        "--backend",
        choices=("fsspec", "obstore"),
        default="fsspec",
        help="the sink's S3 backend (default: %(default)s)",
    )
    parser.add_argument(
        "--copy",
        choices=("on", "off", "both"),
        default="on",
        help="the sink's copy at put: (d) copy=True, (d') copy=False, or both side by side (default: %(default)s)",
    )
    parser.add_argument("--repeat", type=int, help="rounds (default 2, 1 with --quick); the fastest run is kept")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one run may take")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default: %(default)s)")
    parser.add_argument("--name", help="file stem of the results (default: overlap, or overlap-quick)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.workloads = args.workloads or preset["workloads"]
    args.model = args.model or preset["model"]
    args.repeat = args.repeat or preset["repeat"]
    args.compute_per_storage = preset["compute_per_storage"]
    args.name = args.name or ("overlap-quick" if args.quick else "overlap")
    args.storages = [s for s in args.storages.split(",") if s]
    args.model_storages = [s for s in args.model_storages.split(",") if s in args.storages]
    unknown = set(args.storages) - set(STORAGES)
    if unknown:
        parser.error(f"unknown storage {', '.join(sorted(unknown))}; known: {', '.join(STORAGES)}")
    return args


def _plan(args: argparse.Namespace, workloads: list[Workload]) -> list[tuple[str, Workload, str]]:
    """(storage, workload, variant) in run order. Compute only (storage "-") runs next to the writers it is
    compared with, once per storage (once per workload with --quick): its fastest run is the reference. Writer
    order rotates between rounds, so that none always runs right after the ceiling's writeback."""
    sinks = {"on": ["sink"], "off": ["sink-nocopy"], "both": ["sink", "sink-nocopy"]}[args.copy]
    writers = ["ceiling", "lighter", "lightning", *sinks]
    plan = []
    for round_ in range(args.repeat):
        order = writers[round_ % len(writers) :] + writers[: round_ % len(writers)]
        for workload in workloads:
            storages = args.model_storages if workload.model == "conv" else args.storages
            for position, storage in enumerate(storages):
                if position == 0 or args.compute_per_storage:
                    plan.append(("-", workload, "compute"))
                plan += [(storage, workload, variant) for variant in order]
    return plan


def _count_local(directory: Path) -> int:
    return sum(1 for p in directory.rglob("*.npy") if not p.name.startswith((".", "_"))) if directory.exists() else 0


def _count_s3(server: Server, prefix: str) -> int:
    with admin_fs(server) as fs:
        try:
            found = fs.find(server.url(prefix).removeprefix("s3://"))
        except FileNotFoundError:
            return 0
    return sum(1 for p in found if p.endswith(".npy") and not p.rsplit("/", 1)[-1].startswith("_"))


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    workloads = [parse_workload(w) for w in args.workloads]
    if args.model and args.model.lower() != "none" and args.model_storages:
        workloads.append(parse_workload(args.model))
    plan = _plan(args, workloads)
    print(f"{len(plan)} runs over {', '.join(args.storages)}; each in a fresh process. Workloads:")
    for workload in workloads:
        print(f"  {workload.label:<10} {workload.describe()}")
    runs: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    started = time.perf_counter()
    local_root = Path(tempfile.mkdtemp(prefix="lighter-sink-overlap-"))
    try:
        with exit_cleanly_on_signals(), s3_servers([s for s in args.storages if s != "local"]) as servers:
            print(f"servers up: {', '.join(f'{n} {s.endpoint}' for n, s in servers.items()) or 'none'}")
            for index, (storage, workload, variant) in enumerate(plan, 1):
                prefix = f"{index:03d}-{storage}-{workload.label.replace(' ', '_')}-{variant}"
                server = servers.get(storage)
                if server is not None:
                    url, options = server.url(prefix), server.storage_options
                else:
                    url, options = str(local_root / prefix), None
                spec = RunSpec(
                    variant, storage, url, workload, options, concurrency=args.concurrency, backend=args.backend
                )
                drop_dirty_pages()
                result = run_isolated(spec, args.timeout)
                if result.get("ok") and variant != "compute":
                    found = _count_local(Path(url)) if server is None else _count_s3(server, prefix)
                    if found != workload.items:
                        result = {**result, "ok": False, "error": f"{found} objects stored, {workload.items} expected"}
                if server is not None:
                    server.remove(prefix)
                else:
                    shutil.rmtree(url, ignore_errors=True)
                where = {"storage": storage, "workload": workload.label, "variant": variant}
                runs.append({**where, "spec": spec.as_dict(), "result": result})
                status = f"{result['wall_s']:7.2f} s" if result.get("ok") else f"FAILED: {result['error']}"
                print(f"[{index:3d}/{len(plan)}] {storage:<6} {workload.label:<10} {variant:<11} {status}", flush=True)
                if not result.get("ok"):
                    errors.append({**where, **result})
                    if result.get("traceback"):
                        print(result["traceback"], file=sys.stderr)
    finally:
        shutil.rmtree(local_root, ignore_errors=True)
    described = {w.label: {**w.__dict__, "npy_bytes": w.npy_bytes, "describe": w.describe()} for w in workloads}
    data = {
        "environment": environment(),
        "config": {
            "command": ["python", "-m", "benchmarks.overlap", *(argv if argv is not None else sys.argv[1:])],
            "storages": args.storages,
            "concurrency": args.concurrency,
            "backend": args.backend,
            "copy": args.copy,
            "repeat": args.repeat,
            "seconds": time.perf_counter() - started,
        },
        "workloads": described,
        "cells": _report.cells(runs, described),
        "runs": runs,
        "errors": errors,
    }
    out = args.out / args.name
    markdown = _report.overlap_markdown(data)
    write_results(out, data, markdown, _report.overlap_plot)
    print()
    print(markdown.split("\n## ")[0])
    print(f"{time.perf_counter() - started:.0f} s; wrote {out}.json, .md and .png")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
