"""The sink against the raw concurrent-PUT ceiling: the same bytes, the same concurrency, no compute.

For each S3 server and item size, rounds alternate between:
  * raw s3fs:      N tasks on one event loop calling s3fs ``_pipe_file`` on pre-encoded bytes (the ceiling);
  * raw obstore:   the same with obstore's ``put_async`` (when installed);
  * Sink (s3fs) and Sink (obstore): ``put_batch`` of the tensors until the last ``flush`` returns: every object
    encoded, checksummed, stored and recorded in a manifest part (the client's start-up excluded, as for the raw
    variants). The commit that follows (manifest merge, ``_SUCCESS``) is a per-run cost, timed and shown apart;
    on the null endpoint it reads back parts the server discarded, so only its order of magnitude means anything.
Every variant uses the same client settings (upload checksums on or off, ``--no-upload-checksums``).

The per-object target: on the null endpoint, Sink (obstore) reaches >= 0.9x raw obstore at 4 KiB and at 1 MiB;
the last lines print each "Sink vs raw, same client" ratio (``--clients obstore`` runs the obstore variants only).

Usage: python -m benchmarks.ceiling [--servers null,rclone] [--sizes 1MiB] [--items 256] [--rounds 3]
       [--clients s3fs,obstore]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._runner import RESULTS, environment
from benchmarks._servers import obstore_s3, s3_servers
from benchmarks._spec import human_bytes, parse_size
from lighter_sink import Sink


async def _raw_s3fs(root: str, options: dict[str, Any], payloads: list[bytes], tasks: int, checksums: bool) -> float:
    import s3fs

    config: dict[str, Any] = {"max_pool_connections": tasks + 4}
    if not checksums:
        config["request_checksum_calculation"] = "when_required"
    fs = s3fs.S3FileSystem(asynchronous=True, skip_instance_cache=True, config_kwargs=config, **options)
    client = await fs.set_session()
    try:
        todo = iter(enumerate(payloads))

        async def worker() -> None:
            for index, data in todo:
                await fs._pipe_file(f"{root}/{index}.npy", data)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(tasks)))
        return time.perf_counter() - started
    finally:
        await client.close()


async def _raw_obstore(url: str, options: dict[str, Any], payloads: list[bytes], tasks: int, checksums: bool) -> float:
    import obstore

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    store = obstore_s3(bucket, prefix, options, checksums)
    todo = iter(enumerate(payloads))

    async def worker() -> None:
        for index, data in todo:
            await obstore.put_async(store, f"{index}.npy", data)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return time.perf_counter() - started


def _sink(
    url: str, options: dict[str, Any], values: torch.Tensor, *, tasks: int, backend: str, checksums: bool, copy: bool
) -> tuple[float, float]:
    """Seconds until every object is stored and recorded (the final flush), and the commit's seconds after it."""
    sink = Sink(url, storage_options=options, concurrency=tasks, backend=backend, upload_checksums=checksums, copy=copy)  # type: ignore[arg-type]
    with sink:
        sink.flush()  # the client is up and the url prepared: start the clock here, as for the raw clients
        started = time.perf_counter()
        for start in range(0, len(values), 8):
            sink.put_batch(range(start, min(start + 8, len(values))), values[start : start + 8])
        sink.flush()
        stored = time.perf_counter()
    return stored - started, time.perf_counter() - stored


def _variants(
    server: Any,
    payloads: list[bytes],
    values: torch.Tensor,
    *,
    tasks: int,
    checksums: bool,
    clients: tuple[str, ...],
    copies: tuple[bool, ...],
) -> dict[str, Any]:
    options = server.storage_options
    variants: dict[str, Any] = {}
    if "s3fs" in clients:
        variants["raw s3fs"] = lambda p: asyncio.run(_raw_s3fs(f"bench/{p}", options, payloads, tasks, checksums))
    if "obstore" in clients:
        variants["raw obstore"] = lambda p: asyncio.run(
            _raw_obstore(server.url(p), options, payloads, tasks, checksums)
        )
    backends = [(client, {"s3fs": "fsspec"}.get(client, client)) for client in clients]
    for client, backend in backends:
        for copy in copies:
            name = f"Sink ({client})" + ("" if copy else " no copy")
            variants[name] = functools.partial(
                _run_sink, server, options, values, tasks=tasks, backend=backend, checksums=checksums, copy=copy
            )
    return variants


def _run_sink(server: Any, options: dict[str, Any], values: torch.Tensor, prefix: str, **kwargs: Any) -> Any:
    return _sink(server.url(prefix), options, values, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default="null,rclone")
    parser.add_argument("--sizes", nargs="+", default=["1MiB"])
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--clients", default="s3fs,obstore", help="s3fs, obstore or both (obstore when installed)")
    parser.add_argument("--no-upload-checksums", action="store_true")
    parser.add_argument(
        "--copy",
        choices=("on", "off", "both"),
        default="on",
        help="the sinks' copy at put: on (the default), off, or both side by side (off: 'Sink (...) no copy')",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    checksums = not args.no_upload_checksums
    try:
        import obstore  # noqa: F401

        has_obstore = True
    except ImportError:
        has_obstore = False
    clients = tuple(c for c in args.clients.split(",") if c != "obstore" or has_obstore)
    rows: list[dict[str, Any]] = []
    with s3_servers(args.servers.split(",")) as servers:
        for name, server in servers.items():
            for size_text in args.sizes:
                size = parse_size(size_text)
                values = torch.randn(args.items, size // 4)
                payloads = [bytes(memoryview(v.numpy())) for v in values]
                times: dict[str, list[float]] = {}
                commits: dict[str, list[float]] = {}
                copies = {"on": (True,), "off": (False,), "both": (True, False)}[args.copy]
                variants = _variants(
                    server,
                    payloads,
                    values,
                    tasks=args.concurrency,
                    checksums=checksums,
                    clients=clients,
                    copies=copies,
                )
                for round_ in range(args.rounds):
                    for variant, run in variants.items():
                        prefix = f"ceiling-{size_text}-{round_}-{variant.replace(' ', '-').replace('(', '').replace(')', '')}"
                        result = run(prefix)
                        seconds, commit = result if isinstance(result, tuple) else (result, None)
                        times.setdefault(variant, []).append(seconds)
                        if commit is not None:
                            commits.setdefault(variant, []).append(commit)
                        server.remove(prefix)
                best = {variant: min(ts) for variant, ts in times.items()}
                for variant, seconds in best.items():
                    same_client = "raw obstore" if "obstore" in variant else "raw s3fs"
                    rows.append(
                        {
                            "server": name,
                            "size": size_text,
                            "variant": variant,
                            "seconds": seconds,
                            "median_seconds": statistics.median(times[variant]),
                            "commit_seconds": statistics.median(commits[variant]) if variant in commits else None,
                            "mib_per_s": args.items * size / seconds / 2**20,
                            "objects_per_s": args.items / seconds,
                            "vs_raw_s3fs": best["raw s3fs"] / seconds if "raw s3fs" in best else None,
                            "vs_raw_same_client": best[same_client] / seconds if same_client in best else None,
                        }
                    )
    env = environment()
    header = (
        f"{args.items} objects per variant, concurrency {args.concurrency}, upload checksums "
        f"{'on' if checksums else 'off'}, best of {args.rounds} alternating rounds"
    )
    lines = [
        "# The sink against the raw concurrent-PUT ceiling",
        "",
        "{when} · {cpus} CPUs · s3fs {s3fs} · commit {commit} · `python -m benchmarks.ceiling`".format(
            when=env["when"], cpus=env["cpus"], s3fs=env["versions"]["s3fs"], commit=env["commit"]
        ),
        "",
        header,
        "",
        "| server | size | variant | objects/s | MiB/s | vs raw s3fs | vs raw, same client | commit |",
        "|---|---|---|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        same = row["vs_raw_same_client"]
        commit = row["commit_seconds"]
        lines.append(
            f"| {row['server']} | {row['size']} | {row['variant']} | {row['objects_per_s']:.0f} | "
            f"{row['mib_per_s']:.0f} | {_x(row['vs_raw_s3fs'])} | {_x(same)} | "
            f"{'' if commit is None else f'{commit * 1000:.0f} ms'} |"
        )
    lines += ["", "Sink over raw, same client (the per-object target: obstore >= 0.9x on the null endpoint):", ""]
    lines += [
        f"- {row['server']} {row['size']} {row['variant']}: {_x(row['vs_raw_same_client'])}"
        for row in rows
        if row["variant"].startswith("Sink") and row["vs_raw_same_client"] is not None
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ceiling.md").write_text(text)
    (args.out / "ceiling.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    print(f"wrote {args.out / 'ceiling.md'} ({human_bytes(args.items * parse_size(args.sizes[0]))} a variant)")


def _x(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}x"


if __name__ == "__main__":
    main()
