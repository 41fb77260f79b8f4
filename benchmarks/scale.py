"""Scale: a run of 10^5, 10^6 (and, as a long run, 10^7) tiny predictions; what the commit and a resume cost.

For each storage, format and count, three runs, each in a fresh process (its peak RSS its own):

  * write:  ``Sink(url).put_batch`` of COUNT predictions of 4 float32 (batches of ``--batch``), then the commit.
    Reported: predictions/s of the puts (until the last flush), the commit's seconds, the process's RSS before
    the commit and its peak during the commit (the kernel's high-water mark, reset just before it).
  * remaining: ``lighter_sink.remaining(url, dataset)`` of the committed url: seconds and peak RSS over the RSS
    before it (the resume scan a user runs to skip computed samples).
  * resume: ``Sink(url, mode="resume")`` opened and every prediction put again (all skipped), then committed:
    seconds and peak RSS growth (the sink learns what is recorded, checks each put against it, merges again).

``--storages local,moto``: a local directory (tmpfs ``/dev/shm`` where there is one: ``--dir``) and S3 servers
of :mod:`benchmarks._servers`. Formats: ``npy`` (one object per prediction) is local only unless named for S3 with
``--s3-formats``: a million PUTs take hours on a test server; ``tar`` packs them into shards.

Usage: python -m benchmarks.scale [--counts 100000 1000000] [--long] [--storages local,moto]
       [--formats npy,tar] [--s3-formats tar] [--batch 1024] [--dir DIR] [--timeout 3600]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._runner import RESULTS, environment, exit_cleanly_on_signals, run_isolated, write_json
from benchmarks._servers import s3_servers

LONG = 10_000_000
WIDTH = 4  # float32 values per prediction


@dataclass(frozen=True)
class Job:
    phase: str  # write, remaining, resume
    url: str
    options: dict[str, Any]
    format: str
    count: int
    batch: int


def _status(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Make VmHWM the current RSS again, so that it measures the step that follows."""
    Path("/proc/self/clear_refs").write_text("5")


class _Range:
    """A dataset of ``count`` samples (``remaining`` needs only its length)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> int:
        return index


def _put_all(sink: Any, job: Job) -> None:
    import torch

    values = torch.arange(job.batch * WIDTH, dtype=torch.float32).reshape(job.batch, WIDTH)
    for start in range(0, job.count, job.batch):
        stop = min(start + job.batch, job.count)
        sink.put_batch(range(start, stop), values[: stop - start])


def run(job: Job) -> dict[str, Any]:
    """One phase of one count, in its own process."""
    from lighter_sink import Sink, remaining

    gc.collect()
    before = _status("VmRSS")
    if job.phase == "remaining":
        _reset_peak()
        started = time.perf_counter()
        left = remaining(job.url, _Range(job.count), storage_options=job.options)
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "rss_before_mib": before, "peak_mib": _status("VmHWM"), "left": len(left)}
    mode = "resume" if job.phase == "resume" else "overwrite"
    sink = Sink(job.url, format=job.format, storage_options=job.options, mode=mode)
    _reset_peak()
    started = time.perf_counter()
    with sink:
        _put_all(sink, job)
        sink.flush()
        stored = time.perf_counter()
        at_commit = _status("VmRSS")
        peak_before_commit = _status("VmHWM")
        _reset_peak()
        sink.commit()
        committed = time.perf_counter()
    summary = sink.summary or {}
    stats = sink.stats
    return {
        "put_seconds": stored - started,
        "predictions_per_s": job.count / (stored - started),
        "commit_seconds": committed - stored,
        "rss_before_mib": before,
        "rss_at_commit_mib": at_commit,
        "peak_before_commit_mib": peak_before_commit,
        "peak_at_commit_mib": _status("VmHWM"),
        "count": summary.get("count"),
        "skipped": stats.skipped,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--long", action="store_true", help=f"also {LONG:,} predictions (local only)")
    parser.add_argument("--storages", default="local,moto")
    parser.add_argument("--formats", default="npy,tar", help="formats written to a local directory")
    parser.add_argument("--s3-formats", default="tar", help="formats written to S3 servers")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one run may take")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="scale")
    args = parser.parse_args(argv)
    storages = [s for s in args.storages.split(",") if s]
    counts = sorted(set(args.counts))
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="lighter-sink-scale-", dir=args.dir))
    try:
        with exit_cleanly_on_signals(), s3_servers([s for s in storages if s != "local"]) as servers:
            for storage in storages:
                formats = (args.formats if storage == "local" else args.s3_formats).split(",")
                wanted = counts + ([LONG] if args.long and storage == "local" else [])
                for fmt in [f for f in formats if f]:
                    for count in wanted:
                        if storage == "local":
                            url, options = str(root / f"{fmt}-{count}"), {}
                        else:
                            server = servers[storage]
                            prefix = f"scale-{uuid.uuid4().hex[:8]}"
                            url, options = server.url(prefix), dict(server.storage_options)
                        row: dict[str, Any] = {"storage": storage, "format": fmt, "count": count}
                        for phase in ("write", "remaining", "resume"):
                            result = run_isolated(Job(phase, url, options, fmt, count, args.batch), args.timeout, run)
                            if not result.pop("ok"):
                                errors.append({**row, "phase": phase, **result})
                                print(f"{storage} {fmt} {count:,} {phase} FAILED: {result['error']}", flush=True)
                                print(result.get("traceback", ""), file=sys.stderr)
                                break
                            row[phase] = result
                        rows.append(row)
                        _print_row(row)
                        if storage == "local":
                            shutil.rmtree(url, ignore_errors=True)
                        else:
                            servers[storage].remove(prefix)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    data = {
        "environment": environment(),
        "config": {
            "command": ["python", "-m", "benchmarks.scale", *(argv if argv is not None else sys.argv[1:])],
            "batch": args.batch,
            "width": WIDTH,
            "directory": str(args.dir),
            "seconds": time.perf_counter() - started,
        },
        "rows": rows,
        "errors": errors,
    }
    out = args.out / args.name
    write_json(out.with_suffix(".json"), data)
    markdown = _markdown(data)
    out.with_suffix(".md").write_text(markdown)
    print()
    print(markdown)
    print(f"{time.perf_counter() - started:.0f} s; wrote {out}.json and .md")
    return 1 if errors else 0


def _print_row(row: dict[str, Any]) -> None:
    write, left, resume = row.get("write"), row.get("remaining"), row.get("resume")
    line = f"{row['storage']:6s} {row['format']:7s} {row['count']:>11,}"
    if write:
        line += (
            f"  {write['predictions_per_s']:>9,.0f} pred/s  commit {write['commit_seconds']:6.2f} s, "
            f"peak {write['peak_at_commit_mib']:6.0f} MiB"
        )
    if left:
        line += f"  remaining {left['seconds']:6.2f} s +{left['peak_mib'] - left['rss_before_mib']:.0f} MiB"
    if resume:
        line += f"  resume {resume['put_seconds'] + resume['commit_seconds']:6.2f} s"
    print(line, flush=True)


def _resume_peak(resume: dict[str, Any]) -> float:
    return float(max(resume["peak_before_commit_mib"], resume["peak_at_commit_mib"]))


def _markdown(data: dict[str, Any]) -> str:
    env = data["environment"]
    config = data["config"]
    lines = [
        "# Scale: one run of many tiny predictions, its commit and its resume",
        "",
        f"{env['when']} · {env['cpus']} CPUs · commit {env['commit']} · `{' '.join(config['command'])}`",
        "",
        f"Predictions of {config['width']} float32, put_batch of {config['batch']}, one rank; local directory "
        f"{config['directory']}. Each phase in a fresh process. Peak at commit: the process's RSS high-water mark "
        "during `commit()` (reset just before it); growth: over the smallest count of the same storage and format.",
        "",
        "| storage | format | predictions | pred/s | RSS at commit MiB | peak at commit MiB | growth MiB "
        "| commit s | remaining s | remaining +MiB | resume s | resume peak +MiB |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    smallest: dict[tuple[str, str], float] = {}
    for row in data["rows"]:
        write, left, resume = row.get("write"), row.get("remaining"), row.get("resume")
        if write is None:
            continue
        peak = write["peak_at_commit_mib"]
        base = smallest.setdefault((row["storage"], row["format"]), peak)
        cells = [
            row["storage"],
            row["format"],
            f"{row['count']:,}",
            f"{write['predictions_per_s']:,.0f}",
            f"{write['rss_at_commit_mib']:.0f}",
            f"{peak:.0f}",
            f"{peak - base:+.0f}",
            f"{write['commit_seconds']:.2f}",
            f"{left['seconds']:.2f}" if left else "-",
            f"{left['peak_mib'] - left['rss_before_mib']:.0f}" if left else "-",
            f"{resume['put_seconds'] + resume['commit_seconds']:.2f}" if resume else "-",
            f"{_resume_peak(resume) - resume['rss_before_mib']:.0f}" if resume else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for error in data["errors"]:
        lines.append("")
        lines.append(
            f"FAILED: {error['storage']} {error['format']} {error['count']:,} {error['phase']}: {error['error']}"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
