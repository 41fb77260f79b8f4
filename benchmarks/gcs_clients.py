"""Per-request cost of the two GCS clients: gcsfs against obstore, on fake-gcs-server (in memory, loopback).

Whether ``backend="obstore"`` is worth offering for ``gs://`` as it is for ``s3://``: the same bytes, the same
concurrency, one event loop, rounds alternating between
  * gcsfs:   N tasks calling gcsfs's async ``_pipe_file`` (one-request uploads, as the sink's store does);
  * obstore: N tasks calling ``obstore.put_async`` on a ``GCSStore`` (``base_url`` the server, a static token);
on fake-gcs-server and on :mod:`benchmarks.null_gcs` (which discards uploads: fake-gcs-server has no XML API,
and obstore uploads with one), and, for the S3 side of the comparison, s3fs and obstore on the null S3 endpoint
(``--s3``).
Reported: PUTs/s and this process's CPU per PUT (the servers run in processes of their own), best of
``--rounds``. Clients are created before the clock starts.

Usage: python -m benchmarks.gcs_clients [--items 2000] [--size 4KiB] [--concurrency 16] [--rounds 3] [--s3]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchmarks._runner import RESULTS, environment
from benchmarks._servers import fake_gcs_server, null_gcs_server, obstore_s3, s3_servers
from benchmarks._spec import parse_size

Put = Callable[[str, bytes], Awaitable[Any]]


async def _timed(put: Put, payloads: list[bytes], tasks: int, prefix: str) -> tuple[float, float]:
    """Seconds and process CPU seconds to store ``payloads`` with ``tasks`` concurrent puts."""
    todo = iter(enumerate(payloads))

    async def worker() -> None:
        for index, data in todo:
            await put(f"{prefix}/{index}.bin", data)

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return time.perf_counter() - started, time.process_time() - cpu


async def _gcsfs(endpoint: str, bucket: str, payloads: list[bytes], tasks: int, prefix: str) -> tuple[float, float]:
    from gcsfs.core import GCSFileSystem

    fs = GCSFileSystem(endpoint_url=endpoint, token="anon", asynchronous=True, skip_instance_cache=True)
    session = await fs._set_session()
    try:
        return await _timed(lambda key, data: fs._pipe_file(f"{bucket}/{key}", data), payloads, tasks, prefix)
    finally:
        await session.close()


async def _obstore_gcs(
    endpoint: str, bucket: str, payloads: list[bytes], tasks: int, prefix: str
) -> tuple[float, float]:
    import obstore
    from obstore.store import GCSStore

    store = GCSStore(bucket, base_url=endpoint, bearer_token="anonymous", client_options={"allow_http": True})
    return await _timed(lambda key, data: obstore.put_async(store, key, data), payloads, tasks, prefix)


async def _s3fs(options: dict[str, Any], payloads: list[bytes], tasks: int, prefix: str) -> tuple[float, float]:
    import s3fs

    fs = s3fs.S3FileSystem(
        asynchronous=True, skip_instance_cache=True, config_kwargs={"max_pool_connections": tasks + 4}, **options
    )
    client = await fs.set_session()
    try:
        return await _timed(lambda key, data: fs._pipe_file(f"bench/{key}", data), payloads, tasks, prefix)
    finally:
        await client.close()


async def _obstore_s3(options: dict[str, Any], payloads: list[bytes], tasks: int, prefix: str) -> tuple[float, float]:
    import obstore

    store = obstore_s3("bench", "", options, checksums=False)
    return await _timed(lambda key, data: obstore.put_async(store, key, data), payloads, tasks, prefix)


def _alternate(runs: dict[str, Callable[[str], tuple[float, float]]], rounds: int, items: int) -> dict[str, Any]:
    """Each run ``rounds`` times, alternating; the best PUTs/s and the least CPU per PUT of each, or its error."""
    rows: dict[str, Any] = {}
    for round_ in range(rounds):
        for name, run in runs.items():
            if "error" in rows.get(name, {}):
                continue
            try:
                seconds, cpu = run(f"r{round_}-{uuid.uuid4().hex[:6]}")
            except Exception as exc:  # (obstore on fake-gcs-server: no XML API there)
                rows[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
                continue
            row = rows.setdefault(name, {"puts_per_s": 0.0, "cpu_us_per_put": float("inf")})
            row["puts_per_s"] = max(row["puts_per_s"], items / seconds)
            row["cpu_us_per_put"] = min(row["cpu_us_per_put"], cpu / items * 1e6)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--size", default="4KiB")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--s3", action="store_true", help="also s3fs and obstore on the null S3 endpoint")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    payloads = [bytes([i % 251]) * parse_size(args.size) for i in range(args.items)]
    tasks, rounds, items = args.concurrency, args.rounds, args.items
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    rows: dict[str, Any] = {}
    with fake_gcs_server() as fake, null_gcs_server() as null:
        import gcsfs.core

        gcsfs.core.GCSFileSystem(endpoint_url=fake, token="anon", skip_instance_cache=True).mkdir(bucket)
        runs: dict[str, Callable[[str], tuple[float, float]]] = {}
        for server, endpoint in (("fake-gcs-server", fake), ("null GCS", null)):
            runs[f"{server}|gcsfs"] = functools.partial(_run, _gcsfs, endpoint, bucket, payloads, tasks)
            runs[f"{server}|obstore"] = functools.partial(_run, _obstore_gcs, endpoint, bucket, payloads, tasks)
        rows.update(_alternate(runs, rounds, items))
    if args.s3:
        with s3_servers(["null"]) as servers:
            options = servers["null"].storage_options
            runs = {
                "null S3|s3fs": lambda p: asyncio.run(_s3fs(options, payloads, tasks, p)),
                "null S3|obstore": lambda p: asyncio.run(_obstore_s3(options, payloads, tasks, p)),
            }
            rows.update(_alternate(runs, rounds, items))
    env = environment()
    header = f"{items} PUTs of {args.size} per round, concurrency {tasks}, best of {rounds} alternating rounds"
    lines = [
        "# GCS clients: gcsfs against obstore, per request",
        "",
        f"{env['when']} · {env['cpus']} CPUs · commit {env['commit']} · `python -m benchmarks.gcs_clients`",
        "",
        header,
        "",
        "| server | client | PUTs/s | client CPU per PUT |",
        "|---|---|--:|--:|",
    ]
    for name, row in rows.items():
        server, client = name.split("|")
        if "error" in row:
            lines.append(f"| {server} | {client} | failed: {row['error']} | |")
        else:
            lines.append(f"| {server} | {client} | {row['puts_per_s']:,.0f} | {row['cpu_us_per_put']:,.0f} us |")
    ratios: dict[str, dict[str, float]] = {}
    for server, fsspec_client in (("fake-gcs-server", "gcsfs"), ("null GCS", "gcsfs"), ("null S3", "s3fs")):
        ours, theirs = rows.get(f"{server}|obstore", {}), rows.get(f"{server}|{fsspec_client}", {})
        if "puts_per_s" in ours and "puts_per_s" in theirs:
            ratios[server] = {
                "puts_per_s": ours["puts_per_s"] / theirs["puts_per_s"],
                "cpu_per_put": ours["cpu_us_per_put"] / theirs["cpu_us_per_put"],
            }
            lines.append(
                f"\n{server}: obstore makes {ratios[server]['puts_per_s']:.2f}x the PUTs/s of {fsspec_client} "
                f"with {ratios[server]['cpu_per_put']:.2f}x its CPU per PUT"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gcs_clients.md").write_text(text)
    (args.out / "gcs_clients.json").write_text(
        json.dumps({"environment": env, "header": header, "rows": rows, "ratios": ratios}, indent=2) + "\n"
    )


def _run(client: Callable[..., Awaitable[tuple[float, float]]], *args: Any) -> tuple[float, float]:
    """``client(*args)`` on a fresh event loop (the last argument: the round's key prefix)."""
    return asyncio.run(client(*args))


if __name__ == "__main__":
    main()
