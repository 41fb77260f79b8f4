"""The caller's side of a sink as a user meets it: a background error reaches the user once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("logging_setup", ["", "import logging; logging.basicConfig()"])
def test_a_background_error_is_shown_once(tmp_path: Path, logging_setup: str) -> None:
    """Without logging configured, and with it at its default level: the raised error, and nothing else."""
    url = tmp_path / "preds"
    (url / "3.npy" / "x").mkdir(parents=True)  # id 3's object cannot be renamed into place: a directory is there
    script = textwrap.dedent(
        f"""
        {logging_setup}
        import torch
        from lighter_sink import Sink, WriteError

        try:
            with Sink({str(url)!r}) as sink:
                sink.put_batch(list(range(5)), torch.zeros(5, 3))
        except WriteError as exc:
            print("raised:", exc)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "raised: writing to" in done.stdout
    assert (done.stdout + done.stderr).count("Is a directory") == 1, done.stdout + done.stderr
