"""The benchmark scripts themselves still run: a tiny local run of each cheap one, in a process of its own."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_stall_benchmark_reports_puts_and_lateness(tmp_path: Path) -> None:
    pytest.importorskip("benchmarks.stall")
    out = tmp_path / "stall.json"
    command = [sys.executable, "-m", "benchmarks.stall", "--storages", "local", "--batches", "20", "--step-ms", "2"]
    done = subprocess.run([*command, "--json", str(out)], check=False, cwd=ROOT, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"no sink", "local"}
    local = results["local"]
    assert 0 < local["put_p50_ms"] <= local["put_p99_ms"] <= local["put_max_ms"]
    assert 0 <= local["puts_over_2ms"] <= 20
    assert "late_mean_ms" in results["no sink"] and "put_p50_ms" not in results["no sink"]
