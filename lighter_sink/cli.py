"""``lighter-sink``: a thin command line over the public API.

Commands: ``demo`` (write predictions of a small model), ``verify`` (check an output against its manifest),
``inspect`` (summarise an output) and ``bench`` (a quick throughput measurement). Exit status: 0 when all is
well, 1 when an output is absent, incomplete or corrupt (``verify``) or absent or altered (``inspect``), 2 for
usage errors and for storage that cannot be read.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

__all__ = ["main"]

_STORAGE_OPTION_HELP = (
    "fsspec storage option, repeatable (e.g. endpoint_url=http://127.0.0.1:9000). VALUE is read as JSON when it "
    "is JSON (true, 8, {...}), else kept as text, as fsspec does for FSSPEC_* variables. Credentials are best "
    "left to the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...), where s3fs finds them."
)


def _demo(args: argparse.Namespace) -> int:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lighter_sink import PredictionSink
    from lighter_sink._demo import SyntheticImages, check_destination, demo_model, mark_demo_output, remove_if_empty

    storage_options = _storage_options(args)
    if not args.verbose:
        # Lightning's start-up banners and tips would bury the figures the demo is there to show.
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", module="lightning")
    sink = PredictionSink(args.url, format=args.format, storage_options=storage_options)
    model, what = demo_model(sink.format, args.size)
    made = check_destination(args.url, storage_options, overwrite=args.overwrite)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=[sink],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(SyntheticImages(args.n, size=args.size), batch_size=args.batch_size)
    print(f"lighter-sink demo: {args.n} predictions of {what} -> {args.url} ({args.format})")
    started = time.perf_counter()
    try:
        trainer.predict(model, loader, return_predictions=False)
    except BaseException:
        if made:
            remove_if_empty(args.url)
        raise
    wall = time.perf_counter() - started
    assert sink.sink is not None
    stats = sink.sink.stats
    summary = sink.sink.summary or {}
    mark_demo_output(args.url, storage_options, summary.get("run"))
    print(f"  wrote     {summary.get('count', stats.items)} predictions, {stats.bytes / 1e6:.1f} MB")
    print(f"  speed     {stats.mb_per_second:.1f} MB/s, {stats.items / wall:.0f} predictions/s (wall {wall:.2f}s)")
    print(
        f"  stalled   {stats.stall_seconds * 1000:.1f} ms in total "
        f"(queue high-water {stats.queue_high_water_bytes / 2**20:.1f} MiB)"
    )
    print(f"  where     {sink.sink.url}  (_manifest.jsonl, _SUCCESS)")
    return 0


# ---------------------------------------------------------------------------------------------------- verify


def _verify(args: argparse.Namespace) -> int:
    from lighter_sink._verify import verify

    def progress(done: int, total: int) -> None:
        print(f"verify: {done:,}/{total:,} objects checked ({done / total:.0%})", file=sys.stderr, flush=True)

    result = verify(
        args.url,
        _storage_options(args),
        concurrency=args.concurrency,
        progress=progress if args.progress_every > 0 else None,
        progress_every=max(1, args.progress_every),
    )
    print(f"lighter-sink verify: {result.url}")
    if not result.found:
        print(f"FAILED: nothing at {result.url}: no _SUCCESS, no manifest, no object (is the url right?)")
        return 1
    if result.summary is not None:
        summary = result.summary
        print(
            f"  marker    _SUCCESS: {_count(summary.get('count'))} predictions, {_size(summary.get('bytes'))}, "
            f"format {summary.get('format', '?')}, world size {summary.get('world_size', '?')}"
        )
    print(
        f"  checked   {result.checked:,} of {result.records:,} recorded objects, {_size(result.bytes_read)} "
        f"in {result.seconds:.2f}s"
    )
    if result.ok:
        print("OK: complete, and every object matches its size and crc32 in the manifest")
        return 0
    print(f"FAILED: {len(result.problems)} problem{'s' if len(result.problems) != 1 else ''}")
    width = max(len(p.kind) for p in result.problems)
    for problem in result.problems:
        which = f"{problem.path} (id {problem.id!r})" if problem.id is not None else problem.path
        print(f"  {problem.kind:<{width}}  {which}: {problem.detail}")
    return 1


# ---------------------------------------------------------------------------------------------------- inspect


def _inspect(args: argparse.Namespace) -> int:
    from lighter_sink._inspect import inspect_output

    info = inspect_output(args.url, _storage_options(args))
    if args.json:
        print(
            json.dumps({**asdict(info), "complete": info.complete, "altered": info.altered}, indent=2, sort_keys=True)
        )
        return 1 if info.empty or info.altered else 0
    if info.empty:
        print(f"lighter-sink inspect: nothing at {info.url}: no _SUCCESS, no manifest, no object")
        return 1
    summary = info.summary or {}
    if info.altered:
        counted = f"_SUCCESS vouches for {_count(summary.get('count'))} predictions"
        found = f"the manifest lists {info.count:,}" if info.manifest_found else "_manifest.jsonl is gone"
        status = f"ALTERED: {counted}, but {found}; run lighter-sink verify for the details"
    elif info.complete:
        status = f"complete (_SUCCESS written {summary.get('finished_at', 'at an unknown time')})"
    else:
        source = "the manifest" if info.manifest_found else "per-rank parts"
        status = f"INCOMPLETE: no _SUCCESS, the run did not finish (records below come from {source})"
    extensions = ", ".join(f"{n:,} {ext or '(none)'}" for ext, n in info.extensions) or "none"
    if info.shards:
        extensions = f"{len(info.shards):,} shards"
    rows: list[tuple[str, str]] = [
        ("url", info.url),
        ("status", status),
        ("format", f"{summary.get('format', '?')}  (objects: {extensions})"),
        ("world size", str(summary.get("world_size", "?"))),
        ("written by", f"lighter-sink {summary.get('version', '?')}"),
        ("predictions", f"{info.count:,}"),
        (
            "bytes",
            f"{_size(info.bytes)}  ({_size(info.min_nbytes)} to {_size(info.max_nbytes)} per "
            f"{'prediction' if info.shards else 'object'})",
        ),
    ]
    if info.shards:
        counts = [n for n, _ in info.shards]
        extents = [extent for _, extent in info.shards]
        rows.append(
            (
                "shards",
                f"{len(info.shards):,}, {min(counts):,} to {max(counts):,} predictions and {_size(min(extents))} to "
                f"{_size(max(extents))} each",
            )
        )
    shown = 8
    for index, (shape, dtype, n) in enumerate(info.shapes[:shown]):
        rows.append(("shapes" if index == 0 else "", f"{n:,} x {_shape(shape)} {dtype}"))
    if len(info.shapes) > shown:
        rows.append(("", f"... and {len(info.shapes) - shown} more shape/dtype combinations"))
    if not info.complete or not info.manifest_found:  # listed: what a resume or an overwrite would find
        rows.append(("stored", f"{info.objects:,} objects, {info.unrecorded:,} not recorded (control objects aside)"))
        rows.append(("lease", _lease(info.lease)))
    if info.complete:
        rows.append(("timings", _timings(summary)))
    for name, value in rows:
        print(f"{name:<12} {value}")
    return 1 if info.altered else 0


def _lease(lease: Mapping[str, Any] | None) -> str:
    if lease is None:
        return "none (no run owns the output)"
    holder = f"run {lease.get('run')} (host {lease.get('host')}, pid {lease.get('pid')})"
    if lease.get("released"):
        return f"released by {holder}: it ended without committing (an error, or Ctrl-C)"
    age = f"renewed {time.time() - float(lease.get('renewed_at', 0.0)):.0f} s ago"
    if lease.get("live"):
        return f"{lease.get('state')}, held by {holder}, {age}: it may still be writing"
    return f"{lease.get('state')}, not released by {holder}, {age}: it was killed (resume it with mode='resume')"


def _timings(summary: Mapping[str, Any]) -> str:
    seconds = summary.get("seconds")
    parts = [f"{seconds:.2f}s from open to commit" if isinstance(seconds, int | float) else "total time unknown"]
    stats = summary.get("rank0_stats")
    if isinstance(stats, dict):
        parts.append(f"rank 0: {stats.get('mb_per_second', 0.0):.1f} MB/s")
        parts.append(f"stalled {stats.get('stall_seconds', 0.0) * 1000:.1f} ms")
        p50, p99 = stats.get("write_seconds_p50"), stats.get("write_seconds_p99")
        if isinstance(p50, int | float) and isinstance(p99, int | float):
            parts.append(f"write p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    return "; ".join(parts)


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")" if len(shape) != 1 else f"({shape[0]},)"


def _count(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def _size(nbytes: object) -> str:
    if not isinstance(nbytes, int | float):
        return "? bytes"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


# ---------------------------------------------------------------------------------------------------- bench

_OVERLAP_BENCHMARK = "benchmarks.overlap"


def _bench(args: argparse.Namespace) -> int:
    extra = args.benchmark_args[1:] if args.benchmark_args[:1] == ["--"] else args.benchmark_args
    root = None if args.builtin else _benchmarks_root()
    if root is None:
        if extra:
            reason = "with --builtin" if args.builtin else f"{_OVERLAP_BENCHMARK} is not importable here"
            print(f"lighter-sink bench: {reason}; ignoring {' '.join(extra)}", file=sys.stderr)
        return _bench_builtin(args.n, args.dir)
    # A child process: the benchmark owns its argv, its output and its exit status.
    command = [sys.executable, "-m", _OVERLAP_BENCHMARK, "--quick", *extra]
    print(f"lighter-sink bench: python -m {' '.join(command[2:])}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    return subprocess.run(command, env=env, check=False).returncode


def _benchmarks_root() -> str | None:
    """The directory holding the project's ``benchmarks`` package when it is importable (a source checkout)."""
    try:
        spec = importlib.util.find_spec(_OVERLAP_BENCHMARK)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return str(Path(spec.origin).resolve().parent.parent)


def _bench_builtin(n: int, scratch: str | None) -> int:
    import numpy as np
    import torch

    from lighter_sink import Sink

    def raw(directory: Path, values: torch.Tensor) -> tuple[float, int]:
        started = time.perf_counter()
        for i, value in enumerate(values):
            np.save(directory / f"{i}.npy", value.numpy())
        seconds = time.perf_counter() - started
        return seconds, sum(f.stat().st_size for f in directory.iterdir())

    def put(directory: Path, values: torch.Tensor) -> tuple[float, int]:
        started = time.perf_counter()
        with Sink(directory) as sink:
            for i, value in enumerate(values):
                sink.put(i, value)
        return time.perf_counter() - started, sink.stats.bytes

    def put_batch(directory: Path, values: torch.Tensor) -> tuple[float, int]:
        started = time.perf_counter()
        with Sink(directory) as sink:
            for start in range(0, len(values), 64):
                sink.put_batch(range(start, min(start + 64, len(values))), values[start : start + 64])
        return time.perf_counter() - started, sink.stats.bytes

    generator = torch.Generator().manual_seed(0)
    tiny = torch.randn(n, 4, generator=generator)
    images = torch.randn(max(1, n // 10), 128, 128, generator=generator)
    plan: list[tuple[str, str, Callable[[Path, torch.Tensor], tuple[float, int]], torch.Tensor]] = [
        ("tiny", "np.save loop (no manifest)", raw, tiny),
        ("tiny", "Sink.put", put, tiny),
        ("tiny", "Sink.put_batch(64)", put_batch, tiny),
        ("64 KiB", "np.save loop (no manifest)", raw, images),
        ("64 KiB", "Sink.put_batch(64)", put_batch, images),
    ]
    print(
        f"lighter-sink bench: local throughput, {n:,} predictions of 4 float32 (tiny) and "
        f"{len(images):,} of 128x128 float32 (64 KiB); one run each, so expect noise on shared machines"
    )
    rows: list[tuple[str, str, float, float, float]] = []
    baseline: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="lighter-sink-bench-", dir=scratch) as root:
        for index, (workload, name, run, values) in enumerate(plan):
            directory = Path(root) / str(index)
            directory.mkdir()
            seconds, nbytes = run(directory, values)
            rate = len(values) / seconds
            baseline.setdefault(workload, rate)
            rows.append((workload, name, rate, nbytes / 1e6 / seconds, rate / baseline[workload]))
    print(f"  {'workload':<8}  {'variant':<28}  {'predictions/s':>13}  {'MB/s':>8}  {'vs np.save':>10}")
    for workload, name, rate, mb_per_second, ratio in rows:
        print(f"  {workload:<8}  {name:<28}  {rate:>13,.0f}  {mb_per_second:>8.1f}  {ratio:>9.2f}x")
    return 0


# ---------------------------------------------------------------------------------------------------- parser


def _storage_option(text: str) -> tuple[str, Any]:
    # The text may hold a secret: error messages describe it without repeating it.
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError("expected KEY=VALUE (e.g. endpoint_url=http://127.0.0.1:9000)")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(args.storage_option or [])


def _add_storage_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-option", action="append", type=_storage_option, metavar="KEY=VALUE", help=_STORAGE_OPTION_HELP
    )


def _int_at_least(minimum: int, expected: str) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum``; errors say it expected ``expected``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


_positive = _int_at_least(1, "a positive integer")
_non_negative = _int_at_least(0, "an integer >= 0")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lighter-sink",
        description="Asynchronous prediction sink for PyTorch and Lightning.",
        epilog="Exit status: 0 all well; 1 output incomplete, corrupt or absent; 2 usage or storage error.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the sink does; show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run a small model through Trainer.predict on the CPU and write its predictions",
        description="Run a small convolutional model through Lightning's Trainer.predict on the CPU and write its "
        "predictions with PredictionSink; print what was written, the speed and the time the loop stalled. Images "
        "for formats of objects and arrays, a few scores per image for tables (csv, jsonl). Writes to "
        "./predictions unless --url says otherwise.",
    )
    demo.add_argument(
        "--url",
        default="./predictions",
        help="where to write: a local path or fsspec url (default: ./predictions). An earlier demo's output there is "
        "replaced; a place holding anything else is refused unless --overwrite is given",
    )
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an output at --url that no demo wrote: the objects the format would write and an earlier "
        "run's output (manifest, _SUCCESS); other files stay",
    )
    demo.add_argument("--format", default="npy", help="format name (default: npy)")
    demo.add_argument("-n", type=int, default=1000, help="number of predictions (default: 1000)")
    demo.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    demo.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    _add_storage_option(demo)
    demo.set_defaults(func=_demo)

    verify = commands.add_parser(
        "verify",
        help="check that an output is complete and every object matches the manifest",
        description="Read URL/_SUCCESS and URL/_manifest.jsonl, then every recorded object, and compare its size "
        "and crc32 with the manifest. Exit 0 when the output is complete and intact; exit 1 listing every "
        "missing or corrupt object (and when _SUCCESS is absent: the run did not finish; when nothing is at URL at "
        "all, it says so).",
    )
    verify.add_argument("url", metavar="URL", help="the output: a local directory or fsspec url (s3://bucket/...)")
    _add_storage_option(verify)
    verify.add_argument(
        "--concurrency", type=_positive, default=16, help="objects read at once (default: 16)", metavar="N"
    )
    verify.add_argument(
        "--progress-every",
        type=_non_negative,
        default=1000,
        metavar="N",
        help="print progress to stderr every N objects; 0 for none (default: 1000)",
    )
    verify.set_defaults(func=_verify)

    inspect = commands.add_parser(
        "inspect",
        help="summarise an output: count, bytes, format, shapes, timings, world size",
        description="Summarise the output at URL from its _SUCCESS marker and manifest, without reading the "
        "objects: count, bytes, format, shapes and dtypes, timings and world size. An incomplete output is "
        "described from the per-rank manifest parts, with the objects stored and the lease of the run that wrote "
        "them. Exit 1 when nothing is there, or when _SUCCESS vouches for a manifest that is gone or lists another "
        "count (the output was altered).",
    )
    inspect.add_argument("url", metavar="URL", help="the output: a local directory or fsspec url (s3://bucket/...)")
    _add_storage_option(inspect)
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(func=_inspect)

    bench = commands.add_parser(
        "bench",
        help="a quick throughput measurement",
        description="From a source checkout, run the project's overlap benchmark (python -m benchmarks.overlap "
        "--quick, about a minute; arguments after -- are passed on to it). Otherwise, or with --builtin, time "
        "small local runs of np.save against Sink.put and Sink.put_batch and print a table of predictions/s and "
        "MB/s (seconds).",
    )
    bench.add_argument("--builtin", action="store_true", help="always run the built-in local measurement")
    bench.add_argument(
        "-n",
        type=_positive,
        default=5000,
        metavar="N",
        help="tiny predictions per built-in variant; a tenth as many 64 KiB ones (default: 5000)",
    )
    bench.add_argument("--dir", default=None, help="where the built-in measurement writes (default: system temp)")
    bench.add_argument(
        "benchmark_args",
        nargs=argparse.REMAINDER,
        metavar="-- ARGS",
        help="passed on to benchmarks.overlap (e.g. -- --storages local)",
    )
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        code: int = args.func(args)
    except Exception as exc:
        if args.verbose:
            raise
        # Storage errors (OSError, botocore's own) and bad arguments (ValueError) end the command with their
        # message, which names the url and the cause, never the storage options; --verbose shows the traceback.
        print(f"lighter-sink {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
