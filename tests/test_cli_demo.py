"""``lighter-sink demo`` as a new user runs it: every format, where it writes, and what it never destroys."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lighter_sink._verify import verify
from lighter_sink.cli import main
from tests.conftest import S3Server

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_demo_writes_a_table_of_scores(fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A table stores a few scores per sample, not 64x64 images: the demo gives the format what it can store."""
    url = tmp_path / "preds"
    assert main(["demo", "--format", fmt, "-n", "20", "--batch-size", "8", "--url", str(url)]) == 0
    out = capsys.readouterr().out
    assert "wrote     20 predictions" in out
    assert verify(str(url)).ok
    if fmt == "csv":
        with (url / "predictions.csv").open() as file:
            rows = list(csv.DictReader(file))
        assert [row["id"] for row in rows] == [str(i) for i in range(20)]
        assert len(rows[0]) > 2  # the id and a few scores
    else:
        lines = [json.loads(line) for line in (url / "predictions.jsonl").read_text().splitlines()]
        assert len(lines) == 20


def test_demo_help_says_where_it_writes_and_what_it_replaces(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "./predictions" in out
    assert "--overwrite" in out


def test_demo_refuses_a_directory_that_holds_other_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A user's own ``0.npy`` is not a demo's: the demo does not replace it unless told to."""
    url = tmp_path / "predictions"
    url.mkdir()
    (url / "0.npy").write_bytes(b"mine")
    (url / "notes.txt").write_text("mine too")
    assert main(["demo", "-n", "4", "--url", str(url)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err
    assert (url / "0.npy").read_bytes() == b"mine"
    assert sorted(p.name for p in url.iterdir()) == ["0.npy", "notes.txt"]

    assert main(["demo", "-n", "4", "--size", "8", "--url", str(url), "--overwrite"]) == 0
    assert (url / "0.npy").read_bytes() != b"mine"
    assert (url / "notes.txt").read_text() == "mine too"  # overwrite replaces only what the output owns
    assert verify(str(url)).ok


def test_demo_replaces_its_own_earlier_output(tmp_path: Path) -> None:
    url = tmp_path / "predictions"
    assert main(["demo", "-n", "6", "--size", "8", "--url", str(url)]) == 0
    assert main(["demo", "-n", "4", "--size", "8", "--url", str(url)]) == 0
    result = verify(str(url))
    assert result.ok
    assert result.records == 4


def test_a_failed_demo_leaves_no_directory_it_made(tmp_path: Path) -> None:
    """A format that fails at the first batch (a user's own, registered in the user's process)."""
    url = tmp_path / "predictions"
    script = textwrap.dedent(
        f"""
        import sys
        from lighter_sink import register_format
        from lighter_sink.formats import Format
        from lighter_sink.cli import main

        class Broken(Format):
            name = "broken"
            extension = ".bin"

            def encode(self, value):
                raise RuntimeError("this format cannot encode anything")

        register_format("broken", Broken())
        sys.exit(main(["demo", "--format", "broken", "-n", "4", "--url", {str(url)!r}]))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=240, check=False, env=env
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "cannot encode anything" in done.stderr
    assert not url.exists()


@pytest.mark.s3
def test_demo_on_s3_replaces_its_own_output_and_nothing_else(s3_server: S3Server, s3_bucket: str) -> None:
    """As the compose job runs it, twice on one bucket; then on a prefix holding someone else's object."""
    endpoint = ["--storage-option", f"endpoint_url={s3_server.endpoint}"]
    url = f"s3://{s3_bucket}/demo/preds"
    for n in ("6", "4"):
        assert main(["demo", "-n", n, "--size", "8", "--url", url, *endpoint]) == 0
    assert main(["verify", url, *endpoint]) == 0
    s3_server.client().put_object(Bucket=s3_bucket, Key="theirs/0.npy", Body=b"theirs")
    assert main(["demo", "-n", "4", "--size", "8", "--url", f"s3://{s3_bucket}/theirs", *endpoint]) == 2
    assert s3_server.client().get_object(Bucket=s3_bucket, Key="theirs/0.npy")["Body"].read() == b"theirs"
