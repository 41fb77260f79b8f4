"""The upload process: S3 objects through s3fs are put by a process of the sink's own (lighter_sink/_store/_uploader.py, _upload_process.py).

Seen as a user sees it: the processes the sink starts (from /proc, as ``ps`` shows them), what a run stores, and
what a run does when that process is killed under it.
"""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from lighter_sink import Sink, WriteError
from lighter_sink.cli import main as cli_main
from tests.conftest import S3Server


def _upload_processes() -> list[int]:
    """This process's children that run the upload process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # (ended meanwhile)
        parent = int(stat.rpartition(")")[2].split()[1])
        if parent == os.getpid() and b"lighter_sink._store._upload_process" in command:
            found.append(int(entry.name))
    return found


pytestmark = [
    pytest.mark.s3,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc"),
]


def test_one_upload_process_stores_the_objects_and_ends_with_the_sink(
    s3_server: S3Server, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"s3://{s3_bucket}/run"
    values = torch.arange(300 * 4, dtype=torch.float32).reshape(300, 4)
    with Sink(url, storage_options=s3_server.storage_options) as sink:
        sink.put_batch(range(300), values)
        sink.flush()
        assert len(_upload_processes()) == 1
    assert _upload_processes() == []  # ended (and reaped) with the sink
    keys = s3_server.keys(s3_bucket, "run/")
    assert "run/_SUCCESS" in keys
    assert sum(key.endswith(".npy") for key in keys) == 300
    options = [f"--storage-option={key}={value}" for key, value in s3_server.storage_options.items()]
    assert cli_main(["verify", url, *options]) == 0
    capsys.readouterr()


def test_tar_shards_start_no_upload_process(s3_server: S3Server, s3_bucket: str) -> None:
    with Sink(f"s3://{s3_bucket}/tar", format="tar", storage_options=s3_server.storage_options) as sink:
        sink.put_batch(range(10), torch.ones(10, 4))
        sink.flush()
        assert _upload_processes() == []  # a shard's parts stream from the sink's own process


def test_a_killed_upload_process_fails_the_run_and_no_success_is_written(s3_server: S3Server, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/killed"
    sink = Sink(url, storage_options=s3_server.storage_options).open()
    try:
        sink.put_batch(range(100), torch.ones(100, 4))
        sink.flush()
        (process,) = _upload_processes()
        os.kill(process, signal.SIGKILL)
        with pytest.raises(WriteError, match=r"upload process of s3://.* (exited with code -9|ended)"):
            sink.put_batch(range(100, 200), torch.ones(100, 4))
            sink.flush()
        with pytest.raises(WriteError):  # the run stays failed: nothing more is taken
            sink.commit()
    finally:
        sink.abort()
    assert not Path(f"/proc/{process}").exists()  # reaped (the store was closed), not left a zombie
    keys = s3_server.keys(s3_bucket, "killed/")
    assert "killed/_SUCCESS" not in keys
    assert sum(key.endswith(".npy") for key in keys) >= 100  # what it stored before stays stored


def test_an_abort_stops_the_upload_process(s3_server: S3Server, s3_bucket: str) -> None:
    sink = Sink(f"s3://{s3_bucket}/aborted", storage_options=s3_server.storage_options).open()
    try:
        sink.put_batch(range(200), torch.ones(200, 4))
        sink.flush()
        assert len(_upload_processes()) == 1
        sink.put_batch(range(200, 400), torch.ones(200, 4))
    finally:
        sink.abort()
    assert _upload_processes() == []
    assert "aborted/_SUCCESS" not in s3_server.keys(s3_bucket, "aborted/")


def test_large_objects_are_put_from_the_sinks_process_beside_small_ones(s3_server: S3Server, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/mixed"
    large = torch.arange(2 * 1_400_000, dtype=torch.float32).reshape(2, 1_400_000)  # 5.3 MiB each, over the bound
    with Sink(url, storage_options=s3_server.storage_options) as sink:
        sink.put_batch(["big-0", "big-1"], large)
        sink.put_batch([f"small-{i}" for i in range(20)], torch.ones(20, 4))
    client = s3_server.client()
    stored = np.load(io.BytesIO(client.get_object(Bucket=s3_bucket, Key="mixed/big-1.npy")["Body"].read()))
    assert np.array_equal(stored, large[1].numpy())
    assert len([k for k in s3_server.keys(s3_bucket, "mixed/") if k.endswith(".npy")]) == 22
    assert "mixed/_SUCCESS" in s3_server.keys(s3_bucket, "mixed/")
