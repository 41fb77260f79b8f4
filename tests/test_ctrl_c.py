"""Ctrl-C in a plain loop, then the same job run again, as README's "Resuming a killed job" tells a user to."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from lighter_sink import Sink
from lighter_sink._inspect import inspect_output
from lighter_sink._verify import verify

ROOT = Path(__file__).resolve().parents[1]
BATCHES, BATCH = 64, 32


def _job(url: Path) -> str:
    """The user's job: 64 batches, a model that takes its time from batch 41 on (it waits to be interrupted)."""
    return textwrap.dedent(
        f"""
        import signal, threading
        import torch
        from lighter_sink import Sink

        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal, whatever was inherited
        with Sink({str(url)!r}) as sink:
            for b in range({BATCHES}):
                if b == 41:
                    sink.flush()  # (so that the Ctrl-C below finds everything put so far stored)
                    print("COMPUTING", flush=True)
                    threading.Event().wait(120)  # a long forward pass, interrupted by Ctrl-C
                sink.put_batch(range(b * {BATCH}, (b + 1) * {BATCH}), torch.full(({BATCH}, 4), float(b)))
        """
    )


def test_ctrl_c_aborts_and_the_job_resumes(tmp_path: Path) -> None:
    url = tmp_path / "preds"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    job = subprocess.Popen(
        [sys.executable, "-c", _job(url)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert job.stdout is not None
        assert job.stdout.readline().strip() == "COMPUTING"
        job.send_signal(signal.SIGINT)
        _, stderr = job.communicate(timeout=60)
    finally:
        job.kill()
    assert job.returncode != 0
    assert "KeyboardInterrupt" in stderr

    # No _SUCCESS, the lease given up, what was stored kept and recorded.
    assert not (url / "_SUCCESS").exists()
    info = inspect_output(str(url))
    assert info.lease is None or info.lease["released"]
    assert info.count == info.objects == 41 * BATCH
    stored = {p.name: p.stat().st_mtime_ns for p in url.glob("*.npy")}

    # The same job again, at once, with mode="resume": it skips what was stored and writes the rest.
    with Sink(url, mode="resume") as sink:
        for b in range(BATCHES):
            sink.put_batch(range(b * BATCH, (b + 1) * BATCH), torch.full((BATCH, 4), float(b)))
    assert sink.stats.skipped == 41 * BATCH
    result = verify(str(url))
    assert result.ok
    assert result.records == BATCHES * BATCH
    assert all((url / name).stat().st_mtime_ns == mtime for name, mtime in stored.items())
