"""Shard outputs across process boundaries: a run killed hard and resumed, two DDP ranks, a run that fails."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lighter_sink import CommitError, Sink, remaining
from lighter_sink._engine import PART_RECORDS
from lighter_sink._verify import verify
from tests._killed_run import run_killed
from tests._shard_reading import manifest, read_shards, shard_files, tar_members
from tests.conftest import S3Server


@pytest.mark.parametrize(("fmt", "member_bytes"), [("tar", 1024), ("parquet", 16)])
def test_a_killed_run_resumes_at_shard_granularity(tmp_path: Path, fmt: str, member_bytes: int) -> None:
    """A process that dies hard with shards complete, recorded or not, and one open: resume rewrites exactly the
    predictions no manifest part records, and the output holds each id once."""
    per_shard = 64
    shard_bytes = per_shard * member_bytes  # a 2x2 float32: a 1 KiB tar member, a 16-byte Parquet row
    # the sink records stored predictions in a manifest part every PART_RECORDS: the first 16 shards' are, the
    # 17th shard is complete but unrecorded, the 18th open when the process dies
    n = PART_RECORDS + per_shard + 12
    run_killed(tmp_path, range(n), "--format", fmt, "--shard-bytes", str(shard_bytes), "--value", "2")
    assert not (tmp_path / "_SUCCESS").exists()
    complete = shard_files(tmp_path)
    assert len(complete) == PART_RECORDS // per_shard + 1
    todo = list(remaining(str(tmp_path), list(range(n))).indices)
    assert todo == list(range(PART_RECORDS, n))
    killed = verify(str(tmp_path))  # the recorded shards are whole; the unrecorded one is no problem
    assert (killed.checked, [p.kind for p in killed.problems]) == (PART_RECORDS, ["incomplete"])

    with Sink(tmp_path, format=fmt, mode="resume", shard_bytes=shard_bytes) as sink:
        for start in range(0, n, 100):
            ids = range(start, min(start + 100, n))
            sink.put_batch(ids, torch.full((len(ids), 2, 2), 3.0))
    assert sink.stats.skipped == PART_RECORDS
    records = manifest(tmp_path)
    assert sorted(r["id"] for r in records) == list(range(n))
    files = sorted((tmp_path / "shards").iterdir())
    assert {f"shards/{f.name}" for f in files} == {r["path"] for r in records}  # nothing else, no temporary
    assert not set(complete[-1:]) & set(files)  # the unrecorded shard went: its predictions were written again
    stored = read_shards(fmt, (f.read_bytes() for f in files))
    assert sorted(stored) == list(range(n))
    for identifier, value in stored.items():
        assert np.all(value == (2.0 if identifier < PART_RECORDS else 3.0)), identifier
    assert verify(str(tmp_path)).ok


@pytest.mark.slow
def test_two_ranks_write_their_own_tar_shards(tmp_path: Path) -> None:
    from tests.test_distributed import expected, run_job

    out, n = tmp_path / "out", 301
    result = run_job(str(out), "--devices", "2", "--n", str(n), "--format", "tar", "--shard-bytes", "16384")
    assert result.returncode == 0, result.stderr[-3000:]
    files = shard_files(out)
    ranks = {f.name.rsplit("-", 2)[1] for f in files}
    assert ranks == {"r00000", "r00001"}
    assert len(files) >= 6  # several per rank
    stored = read_shards("tar", (f.read_bytes() for f in files))
    assert sorted(stored) == list(range(n))
    reference = expected(n)
    for identifier in (0, 1, 150, 299, 300):
        np.testing.assert_allclose(stored[identifier], reference[identifier].numpy(), rtol=1e-5, atol=1e-6)
    assert json.loads((out / "_SUCCESS").read_text())["world_size"] == 2
    assert verify(str(out)).ok


def _fail_midway(url: str, inside: Callable[[], None] = lambda: None, **options: Any) -> None:
    """Predictions of 64 KiB, 256 to a shard of 16 MiB: one shard is complete and 96 predictions (6 MiB, more than
    a local output holds in memory or an S3 multipart upload's smallest part) are in the open one when the error
    comes. ``inside`` looks at the storage just before."""
    sink = Sink(url, format="tar", shard_bytes=16 * 2**20, max_queue_bytes=1, **options)
    with pytest.raises(RuntimeError, match="the model blew up"), sink:
        for start in range(0, 352, 8):  # each put waits for the one before: every batch but the last is stored
            sink.put_batch(range(start, start + 8), torch.zeros(8, 2**14))
        inside()
        raise RuntimeError("the model blew up")


def _complete_shard(data: bytes) -> None:
    assert sorted(int(stem) for stem, _, _ in tar_members(data)) == list(range(256))


def test_a_failed_run_leaves_no_marker_and_no_open_shard(tmp_path: Path) -> None:
    def inside() -> None:  # the open shard is being written, to a temporary
        assert len(list((tmp_path / "shards").iterdir())) == 2

    _fail_midway(str(tmp_path), inside)
    assert not (tmp_path / "_SUCCESS").exists()
    [complete] = list((tmp_path / "shards").iterdir())  # the open shard's temporary was removed
    _complete_shard(complete.read_bytes())


@pytest.mark.s3
@pytest.mark.parametrize("backend", ["fsspec", "obstore"])
def test_a_failed_run_on_s3_leaves_no_open_shard(s3_server: S3Server, s3_bucket: str, backend: str) -> None:
    if backend == "obstore":
        pytest.importorskip("obstore")
    _fail_midway(f"s3://{s3_bucket}/failed", storage_options=s3_server.storage_options, backend=backend)
    client = s3_server.client()
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=s3_bucket, Prefix="failed/").get("Contents", [])]
    assert "failed/_SUCCESS" not in keys
    [complete] = [k for k in keys if k.startswith("failed/shards/")]
    _complete_shard(client.get_object(Bucket=s3_bucket, Key=complete)["Body"].read())
    assert not client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")  # none left behind, billed


def test_parquet_shards_of_a_resumed_run_that_cannot_be_read_together_are_not_committed(tmp_path: Path) -> None:
    """A resume that writes another shape than the run it continues: each rank's shards agree, but pyarrow, polars
    and DuckDB refuse the output as one dataset, so no _SUCCESS may vouch for it."""

    class Interrupted(Exception):
        pass

    with pytest.raises(Interrupted), Sink(tmp_path, format="parquet") as sink:
        sink.put_batch(list(range(40)), torch.zeros(40, 16))
        sink.flush()  # its shard is stored and recorded
        raise Interrupted
    with (
        pytest.raises(CommitError, match="cannot read such shards as one dataset"),
        Sink(tmp_path, format="parquet", mode="resume") as sink,
    ):
        sink.put_batch(list(range(40, 80)), torch.zeros(40, 8))
    assert not (tmp_path / "_SUCCESS").exists()
