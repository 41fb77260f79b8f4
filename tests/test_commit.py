"""What ``_SUCCESS`` stands for: run ownership (the lease), exact manifests, overwrite and resume semantics.

Each test reproduces a way an earlier version committed ``_SUCCESS`` over wrong, stale, missing or colliding data
while ``verify`` said OK.
"""

from __future__ import annotations

import errno
import io
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lighter_sink import CommitError, DestinationError, PredictionSink, Sink
from lighter_sink._verify import verify
from lighter_sink.formats import CsvFormat
from tests import _faulty
from tests._killed_run import run_killed
from tests._proxy import FaultProxy
from tests.conftest import S3Server, quiet_trainer

ROOT = Path(__file__).resolve().parents[1]


def _manifest(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (path / "_manifest.jsonl").read_text().splitlines()]


def _killed(url: Path | str, ids: list[str], *args: str) -> None:
    """Run tests/_killed_run.py: put ``ids`` and die without closing the sink."""
    assert "PUT" in run_killed(url, ids, *args).stdout


# ---------------------------------------------------------------------- case 2: a failed flush keeps its records


def _fails_once(fragment: str) -> _faulty.Plan:
    """A faulty:// plan whose first write of a key containing ``fragment`` fails with ENOSPC."""
    return _faulty.Plan(
        fail=OSError(errno.ENOSPC, "No space left on device"),
        fail_first=1,
        fail_when=lambda p: fragment in p,
        control=True,
    )


def test_a_failed_manifest_part_keeps_its_records_until_they_are_stored() -> None:
    plan = _fails_once("/_parts/")
    sink = Sink("faulty://run", storage_options=_faulty.options(plan)).open()
    sink.put_batch(range(110), torch.arange(110.0)[:, None])
    with pytest.raises(OSError, match="No space left"):
        sink.flush()
    sink.flush()  # the caller tries again: the records of the failed part are still there
    sink.close()
    manifest = _faulty.read(plan, "/run/_manifest.jsonl").decode().splitlines()
    assert [json.loads(line)["id"] for line in manifest] == list(range(110))
    assert json.loads(_faulty.read(plan, "/run/_SUCCESS"))["count"] == 110


def test_a_failed_manifest_part_at_close_commits_nothing() -> None:
    plan = _faulty.Plan(
        fail=OSError(errno.ENOSPC, "No space left on device"), fail_when=lambda p: "/_parts/" in p, control=True
    )
    sink = Sink("faulty://run", storage_options=_faulty.options(plan)).open()
    sink.put_batch(range(110), torch.arange(110.0)[:, None])
    with pytest.raises(OSError, match="No space left"):
        sink.close()
    assert "/run/_SUCCESS" not in plan.files


def test_a_failed_table_part_keeps_its_rows_until_they_are_stored() -> None:
    plan = _fails_once("_table_parts/")
    sink = Sink("faulty://run", format="csv", storage_options=_faulty.options(plan)).open()
    sink.put_batch(range(110), torch.arange(110.0))
    with pytest.raises(OSError, match="No space left"):
        sink.flush()
    sink.close()  # commit flushes again
    rows = _faulty.read(plan, "/run/predictions.csv").decode().splitlines()
    assert rows[0] == "id,value"
    assert [row.split(",")[0] for row in rows[1:]] == [str(i) for i in range(110)]
    manifest = _faulty.read(plan, "/run/_manifest.jsonl").decode().splitlines()
    assert len(manifest) == 110


# ---------------------------------------------------------------------- case 3 and 14: overwrite, then resume


def test_resume_never_adopts_objects_of_the_run_that_was_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with Sink(out) as sink:  # run A: an old model
        sink.put_batch(range(10), torch.full((10, 2, 2), 1.0))
    # run B: a new model, default overwrite, killed after storing (and recording) 5
    _killed(out, [str(i) for i in range(5)], "--value", "2.0", "--flush")
    # run C resumes B as the README says
    with Sink(out, mode="resume") as sink:
        sink.put_batch(range(10), torch.full((10, 2, 2), 2.0))
    for i in range(10):
        np.testing.assert_array_equal(np.load(out / f"{i}.npy"), np.full((2, 2), 2.0, dtype=np.float32))
    assert verify(str(out)).ok


def test_a_run_that_died_while_removing_the_earlier_output_is_resumed_from_scratch(tmp_path: Path) -> None:
    from lighter_sink import remaining

    with Sink(tmp_path) as sink:  # run A
        sink.put_batch(range(6), torch.full((6, 1), 1.0))
    # run B (overwrite) died while it removed A's output: its lease says so; A's manifest is still there
    lease = {"run": "r-b", "generation": "r-b", "host": "elsewhere", "pid": 1, "state": "clearing"}
    (tmp_path / "_lease.json").write_text(json.dumps({**lease, "renewed_at": 0.0}))
    (tmp_path / "_SUCCESS").unlink()
    (tmp_path / "0.npy").unlink()
    assert list(remaining(str(tmp_path), list(range(6))).indices) == list(range(6))  # type: ignore[arg-type]
    with Sink(tmp_path, mode="resume") as sink:
        sink.put_batch(range(6), torch.full((6, 1), 2.0))
    assert sink.stats.skipped == 0
    assert all(np.load(tmp_path / f"{i}.npy").tolist() == [2.0] for i in range(6))
    assert verify(str(tmp_path)).ok


def test_overwrite_removes_what_the_earlier_run_stored_before_writing(tmp_path: Path) -> None:
    with Sink(tmp_path) as sink:
        sink.put_batch(range(200), torch.ones(200, 1))
    with Sink(tmp_path) as sink:
        sink.put_batch(range(100), torch.zeros(100, 1))
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == sorted(f"{i}.npy" for i in range(100))
    assert len(_manifest(tmp_path)) == 100
    assert verify(str(tmp_path)).ok


def test_a_prediction_sink_run_twice_leaves_only_the_second_output(tmp_path: Path) -> None:
    from lighter_sink._demo import DemoModel, SyntheticImages

    sink = PredictionSink(tmp_path)
    trainer = quiet_trainer(sink)
    trainer.predict(DemoModel(), DataLoader(SyntheticImages(200, size=4), batch_size=50), return_predictions=False)
    trainer.predict(DemoModel(), DataLoader(SyntheticImages(100, size=4), batch_size=50), return_predictions=False)
    assert len(list(tmp_path.glob("*.npy"))) == 100
    assert len(_manifest(tmp_path)) == 100
    assert verify(str(tmp_path)).ok


def test_verify_reports_objects_the_manifest_does_not_list(tmp_path: Path) -> None:
    with Sink(tmp_path) as sink:
        sink.put_batch(range(3), torch.ones(3, 1))
    np.save(tmp_path / "7.npy", np.zeros(1))
    result = verify(str(tmp_path))
    assert not result.ok
    assert [(p.kind, p.path) for p in result.problems] == [("unlisted", "7.npy")]


def test_verify_reports_a_path_the_manifest_lists_twice(tmp_path: Path) -> None:
    with Sink(tmp_path) as sink:
        sink.put_batch(range(2), torch.ones(2, 1))
    lines = (tmp_path / "_manifest.jsonl").read_text().splitlines()
    second = json.loads(lines[1])
    second["path"] = "0.npy"
    (tmp_path / "_manifest.jsonl").write_text(lines[0] + "\n" + json.dumps(second) + "\n")
    (tmp_path / "1.npy").unlink()
    result = verify(str(tmp_path))
    assert not result.ok
    assert any(p.kind == "duplicate" and p.path == "0.npy" for p in result.problems)


# ---------------------------------------------------------------------- case 4: one run owns an output


def test_a_second_run_on_a_url_in_use_is_refused_and_the_first_commits_everything(tmp_path: Path) -> None:
    first = Sink(tmp_path).open()
    first.put_batch(range(3000), torch.ones(3000, 1))
    first.flush()
    with pytest.raises(DestinationError, match=f"{tmp_path}.*renewed") as refused, Sink(tmp_path) as second:
        second.put_batch(range(10), torch.zeros(10, 1))
    assert "another run" in str(refused.value)
    first.put_batch(range(3000, 3010), torch.ones(10, 1))
    first.close()
    assert len(_manifest(tmp_path)) == 3010
    assert verify(str(tmp_path)).ok


def test_a_second_run_on_an_s3_url_in_use_is_refused(s3_server: S3Server, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/preds"
    options = s3_server.storage_options
    with Sink(url, storage_options=options) as first:
        first.put_batch(range(20), torch.ones(20, 1))
        first.flush()
        with pytest.raises(DestinationError, match="another run"), Sink(url, storage_options=options, mode="resume"):
            pass
    assert verify(url, options).ok
    assert verify(url, options).records == 20


def test_overwrite_fails_before_writing_when_the_bucket_denies_deletes(
    fault_proxy: FaultProxy, s3_server: S3Server, s3_bucket: str
) -> None:
    url = f"s3://{s3_bucket}/preds"
    options = fault_proxy.storage_options
    with Sink(url, storage_options=options) as sink:
        sink.put_batch(range(5), torch.ones(5, 1))
    fault_proxy.configure(deny_deletes=True)  # as a bucket policy denying s3:DeleteObject answers
    with pytest.raises(DestinationError, match="AccessDenied"), Sink(url, storage_options=options) as sink:
        sink.put_batch(range(5), torch.zeros(5, 1))
    fault_proxy.configure(deny_deletes=False)
    # nothing of the refused run was written: the earlier output is intact and still verifies
    result = verify(url, options)
    assert result.ok, result.problems
    assert result.records == 5
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="preds/0.npy")["Body"].read()
    assert np.load(io.BytesIO(body)).tolist() == [1.0]


def test_a_crashed_runs_lease_on_another_host_is_taken_once_it_expired(tmp_path: Path) -> None:
    from lighter_sink._lease import LEASE_SECONDS

    lease = tmp_path / "_lease.json"
    tmp_path.mkdir(exist_ok=True)
    holder = {"run": "r-other", "generation": "r-other", "host": "elsewhere", "pid": 1, "state": "running"}
    lease.write_text(json.dumps({**holder, "renewed_at": time.time()}))
    with pytest.raises(DestinationError, match="host elsewhere"), Sink(tmp_path, mode="resume"):
        pass
    lease.write_text(json.dumps({**holder, "renewed_at": time.time() - LEASE_SECONDS - 1}))
    with Sink(tmp_path, mode="resume") as sink:
        sink.put_batch(range(3), torch.ones(3, 1))
    assert len(_manifest(tmp_path)) == 3
    assert not lease.exists()  # released at commit
    assert socket.gethostname()  # (the holder check compares host names)


def test_two_outputs_in_one_directory_keep_their_own_control_objects(tmp_path: Path) -> None:
    files = Sink(tmp_path).open()
    table = Sink(tmp_path, format=CsvFormat(filename="scores.csv")).open()
    files.put_batch(range(50), torch.ones(50, 2))
    table.put_batch(range(50), torch.arange(50.0))
    table.close()
    files.close()
    assert len(_manifest(tmp_path)) == 50
    scores = (tmp_path / "scores.csv").read_text().splitlines()
    assert len(scores) == 51
    assert len((tmp_path / "_scores.csv" / "_manifest.jsonl").read_text().splitlines()) == 50
    assert verify(str(tmp_path)).ok


# ---------------------------------------------------------------------- case 5: duplicate ids across ranks


class _ThreadVote:
    """An ``all_ok`` collective for ranks that are threads of one process: True only when every rank said True."""

    def __init__(self, ranks: int) -> None:
        self._barrier = threading.Barrier(ranks, timeout=60)
        self._lock = threading.Lock()
        self._votes: list[bool] = []

    def __call__(self, ok: bool) -> bool:
        with self._lock:
            self._votes.append(ok)
        index = self._barrier.wait()  # every vote is in
        result = all(self._votes)
        self._barrier.wait()  # every rank read the result
        if index == 0:
            with self._lock:
                self._votes.clear()
        self._barrier.wait()  # cleared before the next round
        return result


def test_an_id_put_on_two_ranks_fails_the_commit(tmp_path: Path) -> None:
    all_ok = _ThreadVote(2)
    errors: dict[int, BaseException] = {}

    def rank(r: int) -> None:
        try:
            with Sink(tmp_path, rank=r, world_size=2, all_ok=all_ok) as sink:
                sink.put_batch([f"case-{r}", "shared"], torch.ones(2, 1))
        except BaseException as exc:
            errors[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert isinstance(errors.get(0), CommitError)
    assert "shared" in str(errors[0])
    assert not (tmp_path / "_SUCCESS").exists()


# ---------------------------------------------------------------------- case 6: what resume cannot record


@pytest.mark.parametrize(("fmt", "key"), [("npy", "{hash:.2}/{id}"), ("png", "{id}"), ("txt", "{id}")])
def test_resume_records_or_rewrites_every_object_a_killed_run_stored(tmp_path: Path, fmt: str, key: str) -> None:
    out = tmp_path / "out"
    ids = [f"{i:03d}" for i in range(1, 11)]
    _killed(out, ids, "--format", fmt, "--key", key, "--value", "0.5")
    with Sink(out, format=fmt, key=key, mode="resume") as sink:
        sink.put_batch(ids, torch.full((10, 2, 2), 0.5))
    records = _manifest(out)
    assert sorted(r["id"] for r in records) == ids
    assert verify(str(out)).ok


# ---------------------------------------------------------------------- case 13: a rank that raises still votes


_RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from lighter_sink import Sink, CommitError
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method={init!r}, rank=rank, world_size=2)
try:
    with Sink({url!r}, rank=rank, world_size=2) as sink:
        sink.put_batch([rank], torch.ones(1, 1))
        if rank == 1:
            raise RuntimeError("rank 1 failed on purpose")
except CommitError as exc:
    print("COMMIT_ERROR", exc, flush=True)
except RuntimeError as exc:
    print("RAISED", exc, flush=True)
dist.destroy_process_group()
"""


def test_a_rank_that_raises_inside_the_block_does_not_leave_the_others_waiting(tmp_path: Path) -> None:
    script = _RANK_SCRIPT.format(root=str(ROOT), init=f"file://{tmp_path / 'rendezvous'}", url=str(tmp_path / "out"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for r in (0, 1)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            outputs.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            proc.kill()
    assert outputs[0][0] == 0, outputs[0][2][-3000:]
    assert "COMMIT_ERROR" in outputs[0][1]
    assert "RAISED" in outputs[1][1]
    assert not (tmp_path / "out" / "_SUCCESS").exists()
