"""Does host memory grow with the number of predictions? Peak RSS for 2,000 vs 20,000 predictions.

Each count runs in its own fresh process: Trainer.predict(return_predictions=False) with PredictionSink to a
local directory, and the same loop with no writer (Lightning's own share: its memory grew until gc.collect() in
Lightning #19398). RSS is sampled along the way; growth = RSS at the end minus RSS after the first tenth.
The sink's queue is bounded (--max-queue-mib) below the total bytes, so a queue that filled up is not mistaken
for a leak.

Writes benchmarks/results/memory.{json,md,png}.

Usage: python -m benchmarks.memory [--counts 2000 20000] [--soak] [--item 4KiB] [--batch 32]
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
from benchmarks._spec import RunSpec, Workload, human_bytes, parse_size

SOAK = 100_000
_SAMPLES = 40  # RSS samples per run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[2_000, 20_000], help="predictions per run")
    parser.add_argument("--soak", action="store_true", help=f"also {SOAK:,} predictions")
    parser.add_argument("--item", default="4KiB", help="bytes per prediction (default %(default)s)")
    parser.add_argument("--batch", type=int, default=32, help="predictions per batch")
    parser.add_argument("--max-queue-mib", type=int, default=8, help="the sink's max_queue_bytes, in MiB")
    parser.add_argument("--variants", default="compute,sink", help="comma-separated: compute, sink, lighter, ...")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one run may take")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="memory")
    args = parser.parse_args(argv)
    counts = sorted(set(args.counts + ([SOAK] if args.soak else [])))
    item_bytes = parse_size(args.item)
    variants = [v for v in args.variants.split(",") if v]
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="lighter-sink-memory-"))
    try:
        with exit_cleanly_on_signals():
            for count in counts:
                workload = Workload(human_bytes(item_bytes).replace(" ", ""), item_bytes, count, args.batch, 0.0)
                every = max(1, workload.batches // _SAMPLES)
                for variant in variants:
                    directory = root / f"{count}-{variant}"
                    spec = RunSpec(
                        variant,
                        "local",
                        str(directory),
                        workload,
                        max_queue_bytes=args.max_queue_mib * 2**20,
                        rss_every=every,
                    )
                    drop_dirty_pages()
                    result = run_isolated(spec, args.timeout)
                    shutil.rmtree(directory, ignore_errors=True)
                    if result.get("ok") and variant != "compute" and result.get("stored") != count:
                        result = {**result, "ok": False, "error": f"{result.get('stored')} stored, {count} expected"}
                    if not result.get("ok"):
                        errors.append({"items": count, "variant": variant, **result})
                        print(f"{count:>8,} {variant:<9} FAILED: {result['error']}", flush=True)
                        print(result.get("traceback", ""), file=sys.stderr)
                        continue
                    rows.append(_row(count, variant, result))
                    row = rows[-1]
                    print(
                        f"{count:>8,} {variant:<9} {row['wall_s']:7.2f} s  peak RSS {row['rss_peak_mib']:6.0f} MiB  "
                        f"growth {row['growth_mib'] or 0:+6.1f} MiB",
                        flush=True,
                    )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    data = {
        "environment": environment(),
        "config": {
            "command": ["python", "-m", "benchmarks.memory", *(argv if argv is not None else sys.argv[1:])],
            "item": human_bytes(item_bytes),
            "batch": args.batch,
            "max_queue_mib": args.max_queue_mib,
            "seconds": time.perf_counter() - started,
        },
        "rows": rows,
        "errors": errors,
    }
    out = args.out / args.name
    markdown = _report.memory_markdown(data)
    write_results(out, data, markdown, _report.memory_plot)
    print()
    print(markdown)
    print(f"{time.perf_counter() - started:.0f} s; wrote {out}.json, .md and .png")
    return 1 if errors else 0


def _row(count: int, variant: str, result: dict[str, Any]) -> dict[str, Any]:
    trace = [tuple(point) for point in result.get("rss_trace", [])]
    early = trace[max(0, len(trace) // 10 - 1)][1] if trace else None
    end = trace[-1][1] if trace else None
    return {
        "items": count,
        "variant": variant,
        "wall_s": result["wall_s"],
        "predictions_per_s": count / result["wall_s"],
        "rss_start_mib": result["rss_start_mib"],
        "rss_early_mib": early,
        "rss_end_mib": end,
        "rss_after_mib": result.get("rss_after_mib"),
        "rss_peak_mib": result["rss_peak_mib"],
        "growth_mib": (end - early) if early is not None and end is not None else None,
        "queue_high_water_mib": result.get("queue_high_water_mib"),
        "stored": result.get("stored"),
        "rss_trace": trace,
    }


if __name__ == "__main__":
    sys.exit(main())
