"""Packed outputs (tar, Parquet shards) against one object per prediction, and large tar shards against a raw
multipart upload of the same bytes. Everything side by side in one run, repetitions interleaved (rounds outermost,
the order of the variants rotated each round), the fastest of each kept: shared machines are noisy, so compare
ratios within a run.

1. Small predictions (``--sizes``, 16 float32 and 1 KiB by default) through ``Sink`` as ``npy`` (one object
   each; to S3 ``--npy-items`` of them: each costs the same however many there are, and they are what makes a
   run long), ``tar`` and ``parquet`` (``--items`` of them, in shards of the default ``shard_bytes``), ``put_batch``
   of 64, to a local directory and to moto's and rclone's S3 servers (:mod:`benchmarks._servers`).
2. Large predictions (1 MiB each, ``--large-items`` of them), to the S3 servers of ``--large-servers``: ``Sink``
   as tar (``put_batch`` of 8) against the client's own upload of one object holding the predictions' ``.npy``
   bytes (the sink's shard holds these plus 512-byte tar headers): s3fs ``pipe`` (a multipart upload of 50 MiB
   parts from 100 MiB, 10 at once), boto3 ``upload_fileobj`` (its ``TransferConfig`` defaults: 8 MiB parts, 10
   threads), and with obstore installed ``Sink(backend="obstore")`` as tar against ``obstore.put_async`` (5 MiB
   parts, 12 at once). Upload checksums as the sink's (``--no-upload-checksums`` turns both off).

Times run from the first ``put`` (the client connected and the url prepared by a first ``flush``, as the raw
clients connect before their clock starts) to the end of the ``with`` block: every shard stored and the manifest
and ``_SUCCESS`` committed. MB/s counts the predictions' values (part 1) or ``.npy`` bytes (part 2), the same
bytes for every variant.

HTTP requests are counted by a proxy in front of the server (``tests/_proxy.py``'s ``FaultProxy``, with no faults
set: it counts every request by method, whichever client sends it). A proxy in the same process would slow the
timed runs, so each variant's requests are counted in one extra run through it, before the timed rounds (it is
also their warm-up). They are the whole run's, the sink's opening (the url's preparation) and commit included.
The objects stored are counted after every run.

Usage: python -m benchmarks.shards [--quick] [--storages local,moto,rclone] [--sizes 64B 1KiB] [--items 4000]
       [--npy-items 500] [--large-servers rclone] [--large-items 256] [--rounds 2] [--backend fsspec|obstore]
       [--no-upload-checksums] [--dir PARENT] [--out DIR]
The issue's check, 20,000 predictions of 16 float32: --sizes 64B --items 20000 --npy-items 20000 --large-servers ''
(long: one object per prediction runs at a few hundred a second on these servers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.util
import io
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._runner import RESULTS, environment, exit_cleanly_on_signals, write_json
from benchmarks._servers import BUCKET, Server, admin_fs, boto3_s3, obstore_s3, s3_servers
from benchmarks._spec import human_bytes, parse_size
from lighter_sink import Sink

FORMATS = ("npy", "tar", "parquet")
SMALL_BATCH = 64
LARGE_BATCH = 8
METHODS = ("PUT", "POST", "GET", "HEAD", "DELETE")


@dataclass
class Target:
    """Where a run writes: a local directory (``server`` None) or an S3 server, maybe through a counting proxy."""

    name: str
    server: Server | None
    local_root: Path
    admin: Any = None  # an s3fs client to count and remove what a run stored (servers without a directory)
    endpoint: str | None = None  # the counting proxy's, in place of the server's

    def url(self, prefix: str) -> str:
        return str(self.local_root / prefix) if self.server is None else self.server.url(prefix)

    @property
    def options(self) -> dict[str, Any] | None:
        if self.server is None:
            return None
        return {**self.server.storage_options, "endpoint_url": self.endpoint or self.server.endpoint}

    def stored(self, prefix: str) -> tuple[int, int]:
        """Objects (every one: data, manifest, markers) and bytes the run left under ``prefix``."""
        root = self.local_root / prefix if self.server is None else self.server.root
        if root is not None:
            if self.server is not None:
                root = root / BUCKET / prefix  # rclone's backing directory
            sizes = [f.stat().st_size for f in root.rglob("*") if f.is_file()]
            return len(sizes), sum(sizes)
        self.admin.invalidate_cache()
        found = self.admin.find(f"{BUCKET}/{prefix}", detail=True)
        return len(found), sum(int(info["size"]) for info in found.values())

    def remove(self, prefix: str) -> None:
        if self.server is None:
            return  # local directories go at the end: deleting many files slows the creations that follow
        if self.server.root is not None:
            self.server.remove(prefix)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.admin.rm(f"{BUCKET}/{prefix}", recursive=True)


@contextlib.contextmanager
def counting(target: Target) -> Iterator[tuple[Target, Any]]:
    """The target reached through a fresh request-counting proxy, and the proxy's stats once the block ends."""
    from tests._proxy import FaultProxy

    assert target.server is not None
    with FaultProxy(target.server.endpoint) as proxy:
        yield Target(target.name, target.server, target.local_root, target.admin, proxy.endpoint), proxy.stats


def sink_run(
    target: Target,
    prefix: str,
    values: torch.Tensor,
    batch: int,
    *,
    fmt: str,
    backend: str,
    checksums: bool,
) -> float:
    """Seconds from the first ``put_batch`` to the end of the ``with`` block (everything stored and committed)."""
    options: dict[str, Any] = {"backend": backend, "upload_checksums": checksums}
    if target.options is not None:
        options["storage_options"] = target.options
    with Sink(target.url(prefix), format=fmt, **options) as sink:
        sink.flush()  # the client connected and the url prepared: the raw clients' clocks start there too
        started = time.perf_counter()
        for start in range(0, len(values), batch):
            sink.put_batch(range(start, min(start + batch, len(values))), values[start : start + batch])
    return time.perf_counter() - started


def _sink_variant(target: Target, prefix: str, *, values: torch.Tensor, batch: int, **options: Any) -> float:
    return sink_run(target, prefix, values, batch, **options)


def _raw_s3fs(target: Target, prefix: str, payload: bytes, checksums: bool) -> float:
    import s3fs
    from fsspec.asyn import sync

    assert target.options is not None
    config = {} if checksums else {"request_checksum_calculation": "when_required"}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs=config, **target.options)
    try:
        fs.ls(BUCKET)  # connected before the clock starts
        started = time.perf_counter()
        fs.pipe(f"{BUCKET}/{prefix}/data.bin", payload)
        return time.perf_counter() - started
    finally:
        creator = getattr(fs, "_s3creator", None)
        if creator is not None:  # closed on its own loop (see benchmarks._servers.admin_fs)
            sync(fs.loop, creator.__aexit__, None, None, None)


def _raw_boto3(target: Target, prefix: str, payload: bytes, checksums: bool) -> float:
    options = target.options
    assert options is not None
    client = boto3_s3(options, request_checksum_calculation="when_supported" if checksums else "when_required")
    try:
        client.head_bucket(Bucket=BUCKET)
        started = time.perf_counter()
        client.upload_fileobj(io.BytesIO(payload), BUCKET, f"{prefix}/data.bin")  # TransferConfig defaults
        return time.perf_counter() - started
    finally:
        client.close()


def _raw_obstore(target: Target, prefix: str, payload: bytes, checksums: bool) -> float:
    import obstore

    options = target.options
    assert options is not None
    store = obstore_s3(BUCKET, prefix, options, checksums)

    async def put() -> float:
        await obstore.list(store).collect_async()  # connected before the clock starts
        started = time.perf_counter()
        await obstore.put_async(store, "data.bin", payload)  # multipart: 5 MiB parts, 12 at once
        return time.perf_counter() - started

    return asyncio.run(put())


Variant = Callable[[Target, str], float]


def _measure(
    target: Target, variants: dict[str, Variant], rounds: int, tag: str, errors: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Each variant once through the counting proxy (S3), then ``rounds`` timed rounds, order rotated each round."""
    began = time.perf_counter()
    figures: dict[str, dict[str, Any]] = {name: {"seconds": []} for name in variants}
    names = list(variants)
    safe = tag.replace(" ", "_").replace("(", "").replace(")", "").replace("/", "")

    def one(name: str, into: Target, round_: str) -> float | None:
        prefix = f"shards-{safe}-{name.replace(' ', '_').replace('(', '').replace(')', '')}-{round_}"
        try:
            seconds = variants[name](into, prefix)
            figures[name]["objects"], figures[name]["stored_bytes"] = into.stored(prefix)
            return seconds
        except Exception as exc:
            errors.append({"where": f"{target.name} {tag}", "variant": name, "round": round_, "error": repr(exc)})
            traceback.print_exc()
            return None
        finally:
            with contextlib.suppress(Exception):
                into.remove(prefix)

    if target.server is not None:
        for name in names:
            with counting(target) as (proxied, stats):
                ok = one(name, proxied, "counted") is not None
            if ok:
                figures[name]["requests"] = {m: stats.methods.get(m, 0) for m in METHODS}
                figures[name]["requests"]["total"] = stats.requests
    for round_ in range(rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            seconds = one(name, target, str(round_))
            if seconds is not None:
                figures[name]["seconds"].append(seconds)
    for values in figures.values():
        times = values["seconds"]
        values["best_s"] = min(times) if times else None
        values["median_s"] = statistics.median(times) if times else None
    print(f"{target.name} {tag}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    return figures


def small(targets: list[Target], args: argparse.Namespace, errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for size_text in args.sizes:
        size = parse_size(size_text)
        values = torch.randn(args.items, max(1, size // 4))
        formats = [f for f in FORMATS if f != "parquet" or _installed("pyarrow")]  # (the parquet extra)
        for target in targets:
            npy_items = args.items if target.server is None else min(args.npy_items, args.items)
            items = {fmt: npy_items if fmt == "npy" else args.items for fmt in formats}
            variants: dict[str, Variant] = {
                fmt: functools.partial(
                    _sink_variant,
                    values=values[: items[fmt]],
                    batch=SMALL_BATCH,
                    fmt=fmt,
                    backend=args.backend,
                    checksums=args.checksums,
                )
                for fmt in formats
            }
            figures = _measure(target, variants, args.rounds, f"small {size_text}", errors)
            rates = {fmt: items[fmt] / f["best_s"] if f["best_s"] else None for fmt, f in figures.items()}
            for fmt, f in figures.items():
                rate, npy = rates[fmt], rates["npy"]
                rows.append(
                    {
                        "storage": target.name,
                        "size": size_text,
                        "format": fmt,
                        "items": items[fmt],
                        **f,
                        "predictions_per_s": rate,
                        "mb_per_s": rate * values[0].nbytes / 1e6 if rate else None,
                        "vs_npy": rate / npy if rate and npy else None,
                    }
                )
    return rows


def large(targets: list[Target], args: argparse.Namespace, errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    size = parse_size(args.large_size)
    values = torch.randn(args.large_items, size // 4)
    pieces = []
    for value in values:
        buffer = io.BytesIO()
        np.save(buffer, value.numpy())
        pieces.append(buffer.getvalue())
    payload = b"".join(pieces)  # the predictions' .npy bytes: what the sink's shard holds, less the tar headers
    del pieces
    checksums = args.checksums
    sink_tar = functools.partial(_sink_variant, values=values, batch=LARGE_BATCH, fmt="tar", checksums=checksums)
    variants: dict[str, Variant] = {
        "Sink tar (s3fs)": functools.partial(sink_tar, backend="fsspec"),
        "raw s3fs pipe": lambda t, p: _raw_s3fs(t, p, payload, checksums),
        "raw boto3 upload_fileobj": lambda t, p: _raw_boto3(t, p, payload, checksums),
    }
    if _installed("obstore"):
        variants["Sink tar (obstore)"] = functools.partial(sink_tar, backend="obstore")
        variants["raw obstore put_async"] = lambda t, p: _raw_obstore(t, p, payload, checksums)
    rows = []
    for target in targets:
        figures = _measure(target, variants, args.rounds, f"large {args.large_size}", errors)
        boto3_s = figures["raw boto3 upload_fileobj"]["best_s"]
        for name, f in figures.items():
            best = f["best_s"]
            same = "raw obstore put_async" if "obstore" in name else "raw s3fs pipe"
            same_s = figures[same]["best_s"] if same in figures else None
            rows.append(
                {
                    "server": target.name,
                    "variant": name,
                    "items": args.large_items,
                    "payload_bytes": len(payload),
                    **f,
                    "mib_per_s": len(payload) / 2**20 / best if best else None,
                    "vs_raw_same_client": same_s / best if best and same_s and name.startswith("Sink") else None,
                    "vs_raw_boto3": boto3_s / best if best and boto3_s else None,
                }
            )
    return rows


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _f(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _requests(f: dict[str, Any]) -> tuple[str, str]:
    counts = f.get("requests")
    if counts is None:
        return "-", "-"
    detail = " / ".join(str(counts[m]) for m in METHODS)
    return f"{counts['total']:,}", detail


def markdown(data: dict[str, Any]) -> str:
    env, config = data["environment"], data["config"]
    lines = [
        "# Packed outputs against one object per prediction",
        "",
        f"{env['when']} · {env['cpus']} CPUs · s3fs {env['versions'].get('s3fs')} · commit {env.get('commit') or '?'}"
        f" · sink backend {config['backend']} · upload checksums {'on' if config['checksums'] else 'off'} · best of "
        f"{config['rounds']} interleaved rounds · `{' '.join(config['command'])}`",
        "",
        "Wall time from the first put to the end of the `with` block (stored and committed). Requests: counted by a "
        "proxy in one extra run of each variant (PUT / POST / GET / HEAD / DELETE), the sink's opening and commit "
        "included. Objects: everything the run left (data, shards, manifest, markers).",
        "",
        f"## Small predictions, put_batch of {SMALL_BATCH}",
        "",
        "MB/s: the predictions' values. vs npy: predictions/s against one object per prediction (npy) to the same "
        "storage; npy runs to S3 write fewer predictions (`--npy-items`), at the same cost each.",
        "",
        "| storage | size | format | items | pred/s | MB/s | wall s | vs npy | requests | PUT / POST / GET / HEAD / DELETE | "
        "objects | stored |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|---|--:|--:|",
    ]
    for row in data["small"]:
        total, detail = _requests(row)
        stored = row.get("stored_bytes")
        lines.append(
            f"| {row['storage']} | {row['size']} | {row['format']} | {row['items']:,} | {_f(row['predictions_per_s'], ',.0f')} | "
            f"{_f(row['mb_per_s'], '.2f')} | {_f(row['best_s'], '.2f')} | {_f(row['vs_npy'], '.1f', 'x')} | {total} | "
            f"{detail} | {row.get('objects', '-')} | {'-' if stored is None else human_bytes(stored)} |"
        )
    if data["large"]:
        first = data["large"][0]
        lines += [
            "",
            f"## Large predictions: {first['items']} x {config['large_size']} ({human_bytes(first['payload_bytes'])}"
            f" of .npy bytes), Sink as tar against a raw multipart upload of those bytes",
            "",
            "| server | variant | MiB/s | wall s | median s | vs raw, same client | vs boto3 | requests | "
            "PUT / POST / GET / HEAD / DELETE | objects |",
            "|---|---|--:|--:|--:|--:|--:|--:|---|--:|",
        ]
        for row in data["large"]:
            total, detail = _requests(row)
            lines.append(
                f"| {row['server']} | {row['variant']} | {_f(row['mib_per_s'], '.0f')} | {_f(row['best_s'])} | "
                f"{_f(row['median_s'])} | {_f(row['vs_raw_same_client'], '.2f', 'x')} | "
                f"{_f(row['vs_raw_boto3'], '.2f', 'x')} | {total} | {detail} | {row.get('objects', '-')} |"
            )
    if data["errors"]:
        lines += ["", "## Runs that failed", ""]
        lines += [f"- {e['where']} {e['variant']} (round {e['round']}): {e['error']}" for e in data["errors"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny run (the test's): few items, one round")
    parser.add_argument("--storages", default="local,moto,rclone", help="part 1: local and S3 servers")
    parser.add_argument("--sizes", nargs="+", default=["64B", "1KiB"], help="part 1: bytes of values a prediction")
    parser.add_argument("--items", type=int, default=4000, help="part 1: predictions per tar or parquet run")
    parser.add_argument(
        "--npy-items",
        type=int,
        default=500,
        help="part 1: predictions per npy run to S3 (at most --items; local ones write --items): one object each "
        "costs the same per prediction however many there are, and is what keeps a run long",
    )
    parser.add_argument("--large-servers", default="rclone", help="part 2: S3 servers ('' skips part 2)")
    parser.add_argument("--large-size", default="1MiB")
    parser.add_argument("--large-items", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="timed runs of each variant (the best is kept)")
    parser.add_argument("--backend", choices=("fsspec", "obstore"), default="fsspec", help="part 1's sink backend")
    parser.add_argument("--no-upload-checksums", dest="checksums", action="store_false")
    parser.add_argument("--dir", type=Path, help="where part 1's local directories go (default: the temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="writes shards.json and shards.md here")
    args = parser.parse_args()
    if args.quick:
        args.items, args.npy_items, args.large_items, args.large_size, args.rounds = 200, 100, 4, "256KiB", 1
    storages = [s for s in args.storages.split(",") if s]
    large_servers = [s for s in args.large_servers.split(",") if s]
    servers_needed = list(dict.fromkeys(s for s in [*storages, *large_servers] if s != "local"))
    errors: list[dict[str, Any]] = []
    local_root = Path(tempfile.mkdtemp(prefix="lighter-sink-shards-", dir=args.dir))
    try:
        with exit_cleanly_on_signals(), s3_servers(servers_needed) as servers, contextlib.ExitStack() as stack:
            # one client each for counting and removing objects (a client takes ~0.5 s to start)
            admins = {
                name: stack.enter_context(admin_fs(server)) for name, server in servers.items() if server.root is None
            }

            def target(name: str) -> Target:
                return Target(name, servers.get(name), local_root, admins.get(name))

            small_rows = small([target(s) for s in storages], args, errors)
            large_rows = large([target(s) for s in large_servers], args, errors) if large_servers else []
    finally:
        shutil.rmtree(local_root, ignore_errors=True)
    config = {
        key: getattr(args, key)
        for key in ("items", "npy_items", "sizes", "large_size", "large_items", "rounds", "backend", "checksums")
    }
    config["command"] = ["python", "-m", "benchmarks.shards", *sys.argv[1:]]
    data = {"environment": environment(), "config": config, "small": small_rows, "large": large_rows}
    data["errors"] = errors
    text = markdown(data)
    print(text)
    name = "shards-quick" if args.quick else "shards"
    write_json(args.out / f"{name}.json", data)
    (args.out / f"{name}.md").write_text(text)
    print(f"wrote {args.out / name}.json and .md")
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
