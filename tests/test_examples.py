"""The example scripts run as users would run them: a child process of the project's interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lighter_sink._verify import verify
from tests.conftest import S3Server

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_every_example_is_tested() -> None:
    tested = {"lightning_local.py", "torch_loop.py", "s3_endpoint.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_lightning_quickstart_to_a_local_directory(tmp_path: Path) -> None:
    out = _run("lightning_local.py", "preds", cwd=tmp_path)
    assert "wrote 256 predictions" in out
    preds = tmp_path / "preds"
    assert sorted(int(p.stem) for p in preds.glob("*.npy")) == list(range(256))
    np.testing.assert_allclose(np.load(preds / "17.npy").sum(), 1.0, rtol=1e-5)
    assert verify(str(preds)).ok


def test_plain_torch_loop(tmp_path: Path) -> None:
    out = _run("torch_loop.py", str(tmp_path / "loop"), cwd=tmp_path)
    assert "200 predictions committed" in out
    assert np.load(tmp_path / "loop" / "scan-0199.npy").shape == (32, 32)
    assert json.loads((tmp_path / "loop" / "_SUCCESS").read_text())["count"] == 200
    assert verify(str(tmp_path / "loop")).ok


@pytest.mark.s3
def test_s3_with_an_endpoint_from_the_environment(tmp_path: Path, s3_server: S3Server, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/example/preds"
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    out = _run("s3_endpoint.py", url, cwd=tmp_path, env=env)
    assert f"wrote 100 predictions to {url}" in out
    result = verify(url, s3_server.storage_options)
    assert result.ok, result.problems
    assert result.checked == 100
