"""Real multi-process runs: Lightning's ddp strategy on the CPU (gloo), and jobs killed hard mid-run."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lighter_sink._demo import DemoModel, SyntheticImages
from tests.conftest import S3Server

JOB = Path(__file__).with_name("_job.py")
pytestmark = pytest.mark.slow


def run_job(url: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(JOB), url, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def expected(n: int, size: int = 8) -> torch.Tensor:
    data = SyntheticImages(n, size=size)
    with torch.no_grad():
        return DemoModel().eval()(torch.stack([data[i] for i in range(n)]))


def check_local(out: Path, n: int, world_size: int) -> None:
    reference = expected(n)
    stored = sorted(int(p.stem) for p in out.glob("*.npy"))
    assert stored == list(range(n))
    for i in range(n):
        np.testing.assert_allclose(np.load(out / f"{i}.npy"), reference[i].numpy(), rtol=1e-5, atol=1e-6)
    ids = [json.loads(line)["id"] for line in (out / "_manifest.jsonl").read_text().splitlines()]
    assert ids == list(range(n))
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["count"] == n
    assert success["world_size"] == world_size


def test_two_ranks_store_every_id_exactly_once(tmp_path: Path) -> None:
    result = run_job(str(tmp_path / "out"), "--devices", "2", "--n", "1001", "--batch-size", "7")
    assert result.returncode == 0, result.stderr[-3000:]
    check_local(tmp_path / "out", 1001, world_size=2)


def test_a_padding_sampler_adds_no_predictions(tmp_path: Path) -> None:
    # DistributedSampler pads 1001 samples to 1002 by repeating sample 0 on rank 1
    result = run_job(str(tmp_path / "out"), "--devices", "2", "--n", "1001", "--padding-sampler")
    assert result.returncode == 0, result.stderr[-3000:]
    check_local(tmp_path / "out", 1001, world_size=2)


@pytest.mark.s3
def test_two_ranks_to_s3(s3_server: S3Server, s3_bucket: str) -> None:
    options = json.dumps(s3_server.storage_options)
    url = f"s3://{s3_bucket}/ddp"
    result = run_job(url, "--devices", "2", "--n", "1001", "--storage-options", options)
    assert result.returncode == 0, result.stderr[-3000:]
    client = s3_server.client()
    keys = s3_server.keys(s3_bucket, "ddp/")
    assert sorted(k for k in keys if k.endswith(".npy")) == sorted(f"ddp/{i}.npy" for i in range(1001))
    reference = expected(1001)
    for i in (0, 1, 500, 999, 1000):
        body = client.get_object(Bucket=s3_bucket, Key=f"ddp/{i}.npy")["Body"].read()
        np.testing.assert_allclose(np.load(io.BytesIO(body)), reference[i].numpy(), rtol=1e-5, atol=1e-6)
    manifest = client.get_object(Bucket=s3_bucket, Key="ddp/_manifest.jsonl")["Body"].read().decode()
    assert [json.loads(line)["id"] for line in manifest.splitlines()] == list(range(1001))
    assert json.loads(client.get_object(Bucket=s3_bucket, Key="ddp/_SUCCESS")["Body"].read())["world_size"] == 2


@pytest.mark.parametrize("fail_rank", [0, 1])
def test_when_a_rank_fails_nobody_commits_and_nothing_hangs(tmp_path: Path, fail_rank: int) -> None:
    out = tmp_path / "out"
    args = ["--devices", "2", "--n", "300", "--fail-rank", str(fail_rank), "--fail-batch", "5"]
    result = run_job(str(out), *args, timeout=180)
    assert result.returncode != 0
    assert f"rank {fail_rank} failed on purpose" in result.stderr
    assert not (out / "_SUCCESS").exists()


def _mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}


def test_a_killed_job_leaves_no_marker_and_resume_rewrites_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    killed = run_job(str(out), "--n", "600", "--batch-size", "10", "--exit-batch", "30")
    assert killed.returncode == 17, killed.stderr[-3000:]
    assert not (out / "_SUCCESS").exists()
    before = _mtimes(out)
    assert 0 < len(before) <= 300
    for name in before:  # every object under a final name is whole
        np.load(out / name)
    report = tmp_path / "report.json"
    resumed = run_job(str(out), "--n", "600", "--batch-size", "10", "--mode", "resume", "--report", str(report))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = _mtimes(out)
    assert {name: after[name] for name in before} == before  # nothing already stored was rewritten
    check_local(out, 600, world_size=1)
    assert not list(out.rglob("*.tmp"))
    stats: dict[str, Any] = json.loads(report.read_text())
    assert stats["skipped"] == len(before)
    assert stats["items"] == 600 - len(before)


def test_resume_can_skip_the_compute_too(tmp_path: Path) -> None:
    out = tmp_path / "out"
    killed = run_job(str(out), "--n", "400", "--batch-size", "10", "--exit-batch", "20")
    assert killed.returncode == 17
    done = len(_mtimes(out))
    report = tmp_path / "report.json"
    args = ["--n", "400", "--batch-size", "10", "--mode", "resume", "--skip-done", "--report", str(report)]
    resumed = run_job(str(out), *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    check_local(out, 400, world_size=1)
    stats = json.loads(report.read_text())
    assert stats["computed"] == 400 - done  # the model ran only on what was missing
    assert stats["items"] == 400 - done
