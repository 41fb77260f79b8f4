import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lighter_sink import Sink, cli
from lighter_sink._verify import verify
from lighter_sink.cli import main
from tests._killed_run import run_killed
from tests.conftest import S3Server

ROOT = Path(__file__).resolve().parents[1]


def _write(url: str | Path, n: int = 12, storage_options: dict[str, str] | None = None) -> None:
    values = torch.arange(n * 6, dtype=torch.float32).reshape(n, 2, 3)
    with Sink(url, storage_options=storage_options) as sink:
        sink.put_batch(list(range(n)), values)


@pytest.fixture
def output(tmp_path: Path) -> Path:
    url = tmp_path / "preds"
    _write(url)
    return url


def test_verify_accepts_an_intact_output(output: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(output)]) == 0
    out = capsys.readouterr().out
    assert "12 of 12 recorded objects" in out
    assert "OK" in out


def test_verify_names_a_deleted_prediction(output: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (output / "7.npy").unlink()
    assert main(["verify", str(output)]) == 1
    out = capsys.readouterr().out
    assert "FAILED: 1 problem" in out
    assert "missing" in out
    assert "7.npy" in out
    assert "3.npy" not in out


def test_verify_names_a_prediction_corrupted_in_place(output: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = output / "5.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte of the array data
    path.write_bytes(bytes(data))
    assert main(["verify", str(output)]) == 1
    out = capsys.readouterr().out
    assert "checksum" in out
    assert "5.npy" in out
    assert "FAILED: 1 problem" in out


def test_verify_lists_every_problem_with_its_kind(output: Path) -> None:
    (output / "2.npy").unlink()
    (output / "9.npy").write_bytes(b"short")
    result = verify(str(output))
    assert not result.ok
    assert [(p.kind, p.path, p.id) for p in result.problems] == [("missing", "2.npy", "2"), ("size", "9.npy", "9")]
    assert result.checked == result.records == 12


def test_verify_refuses_an_output_without_success(output: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (output / "_SUCCESS").unlink()
    assert main(["verify", str(output)]) == 1
    out = capsys.readouterr().out
    assert "incomplete" in out
    assert "_SUCCESS" in out
    result = verify(str(output))
    assert not result.complete
    assert [p.kind for p in result.problems] == ["incomplete"]  # the objects themselves are intact


def test_verify_checks_what_an_unfinished_run_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = tmp_path / "preds"
    with pytest.raises(RuntimeError, match="interrupted"), Sink(url) as sink:
        sink.put_batch(list(range(10)), torch.zeros(10, 3))
        sink.flush()  # recorded in a per-rank manifest part
        raise RuntimeError("interrupted")
    assert not (url / "_SUCCESS").exists()
    (url / "3.npy").unlink()
    result = verify(str(url))
    assert (result.complete, result.records) == (False, 10)
    assert [(p.kind, p.path) for p in result.problems] == [("incomplete", "_SUCCESS"), ("missing", "3.npy")]
    assert main(["inspect", str(url)]) == 0
    out = capsys.readouterr().out
    assert "INCOMPLETE" in out
    assert "per-rank parts" in out


def test_verify_notices_a_marker_that_disagrees_with_the_manifest(output: Path) -> None:
    marker = output / "_SUCCESS"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "count": 13}))
    assert [p.kind for p in verify(str(output)).problems] == ["mismatch"]
    marker.write_text("not json")
    assert [(p.kind, p.path) for p in verify(str(output)).problems] == [("invalid", "_SUCCESS")]


def test_verify_reports_a_missing_manifest(output: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (output / "_manifest.jsonl").unlink()
    assert main(["verify", str(output)]) == 1
    assert "_manifest.jsonl" in capsys.readouterr().out


def test_verify_prints_progress_to_stderr(output: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(output), "--progress-every", "5", "--concurrency", "2"]) == 0
    captured = capsys.readouterr()
    assert "5/12" in captured.err
    assert "10/12" in captured.err
    assert "5/12" not in captured.out


def test_inspect_summarises_an_output(output: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(output)]) == 0
    out = capsys.readouterr().out
    lines = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    assert "complete" in lines["status"]
    assert "npy" in lines["format"]
    assert lines["world size"].split()[-1] == "1"
    assert lines["predictions"].split()[-1] == "12"
    assert "12 x (2, 3) float32" in out
    assert "timings" in lines


def test_inspect_json_and_incomplete_outputs(output: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (output / "_SUCCESS").unlink()
    assert main(["inspect", str(output), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["complete"] is False
    assert info["count"] == 12
    assert info["bytes"] == sum(p.stat().st_size for p in output.glob("*.npy"))
    assert info["shapes"] == [[[2, 3], "float32", 12]]


def test_inspect_of_an_empty_place_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "nothing")]) == 1
    assert "nothing at" in capsys.readouterr().out


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "verify", "inspect", "bench"):
        assert command in out
    for command in ("verify", "inspect", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--storage-option" in capsys.readouterr().out


def test_a_bad_storage_option_is_a_usage_error_that_does_not_echo_it(
    output: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["verify", str(output), "--storage-option", "s3cr3t-without-a-key"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "KEY=VALUE" in err
    assert "s3cr3t" not in err
    with pytest.raises(SystemExit):
        main(["inspect", str(output), "--storage-option", "=value"])
    assert "KEY=VALUE" in capsys.readouterr().err


def test_bench_builtin_prints_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--builtin", "-n", "200", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "predictions/s" in out
    for variant in ("np.save loop", "Sink.put ", "Sink.put_batch(64)"):
        assert variant in out
    assert list(tmp_path.iterdir()) == []  # the scratch directory is removed


def test_bench_runs_the_overlap_benchmark_with_the_arguments_given(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("benchmarks.overlap")
    calls: list[list[str]] = []

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        calls.append(command)
        return subprocess.CompletedProcess(command, 3)

    monkeypatch.setattr(cli.subprocess, "run", run)
    assert main(["bench", "--", "--storages", "local"]) == 3  # the benchmark's own exit status
    assert calls == [[sys.executable, "-m", "benchmarks.overlap", "--quick", "--storages", "local"]]


def test_bench_falls_back_to_the_builtin_measurement(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "_benchmarks_root", lambda: None)  # as in an installed wheel: no benchmarks package
    assert main(["bench", "-n", "50", "--dir", str(tmp_path), "--", "--storages", "local"]) == 0
    captured = capsys.readouterr()
    assert "Sink.put_batch(64)" in captured.out
    assert "ignoring --storages local" in captured.err


@pytest.mark.s3
def test_verify_on_s3(s3_server: S3Server, s3_bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"s3://{s3_bucket}/run/preds"
    _write(url, storage_options=s3_server.storage_options)
    # Credentials come from the environment (set in conftest), the endpoint from the command line.
    endpoint = ["--storage-option", f"endpoint_url={s3_server.endpoint}"]
    assert main(["verify", url, *endpoint]) == 0
    assert "12 of 12 recorded objects" in capsys.readouterr().out

    client = s3_server.client()
    key = "run/preds/4.npy"
    body = bytearray(client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    body[-1] ^= 0xFF
    client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(body))
    client.delete_object(Bucket=s3_bucket, Key="run/preds/8.npy")
    assert main(["verify", url, *endpoint]) == 1
    out = capsys.readouterr().out
    assert "checksum  4.npy" in out
    assert "missing   8.npy" in out

    assert main(["inspect", url, *endpoint]) == 0
    assert "12 x (2, 3) float32" in capsys.readouterr().out


@pytest.mark.s3
def test_an_unreachable_endpoint_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import free_port

    endpoint = f"endpoint_url=http://127.0.0.1:{free_port()}"
    options = ["--storage-option", endpoint, "--storage-option", "key=someone", "--storage-option", "secret=hunter2"]
    code = main(["verify", "s3://bucket/x", *options])
    assert code == 2
    err = capsys.readouterr().err
    assert "lighter-sink verify: error" in err
    assert "hunter2" not in err


# ---------------------------------------------------------------------- what a new user sees (issue 15)


def test_verify_of_a_place_holding_nothing_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped url is not "a run that did not finish": nothing is there, and verify fails saying that."""
    assert main(["verify", str(tmp_path / "nonexistent")]) == 1
    out = capsys.readouterr().out
    assert "nothing at" in out
    assert "did not finish" not in out
    result = verify(str(tmp_path / "nonexistent"))
    assert not result.ok
    assert not result.found


def test_inspect_refuses_a_marker_whose_manifest_is_gone(output: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``_SUCCESS`` vouches for a manifest that is not there: the output was altered, not complete."""
    (output / "_manifest.jsonl").unlink()
    assert main(["inspect", str(output)]) == 1
    out = capsys.readouterr().out
    status = next(line for line in out.splitlines() if line.startswith("status"))
    assert "ALTERED" in status
    assert "_manifest.jsonl" in status
    assert "complete (" not in out
    assert main(["inspect", str(output), "--json"]) == 1
    info = json.loads(capsys.readouterr().out)
    assert (info["complete"], info["altered"]) == (True, True)


def test_inspect_describes_what_a_killed_run_left(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run killed before its first manifest part leaves objects and a lease, and inspect says so."""
    url = tmp_path / "preds"
    run_killed(url, range(140))
    stored = len(list(url.glob("*.npy")))
    assert stored >= 139
    assert main(["inspect", str(url)]) == 0
    out = capsys.readouterr().out
    assert "nothing at" not in out
    lines = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    assert "did not finish" in lines["status"]
    assert f"{stored} objects" in lines["stored"]
    assert f"{stored} not recorded" in lines["stored"]
    assert "running" in lines["lease"]
    assert main(["inspect", str(url), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["objects"], info["unrecorded"], info["lease"]["state"]) == (stored, stored, "running")
