"""``Sink.put`` one prediction at a time: small CPU predictions put while the writers are busy are copied into
one array per kind and written as one batch. What is stored, recorded, flushed, resumed and reported must not
change: each prediction as it was put, whatever its kind, its neighbours and the batches put between."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lighter_sink import Sink, WriteError
from tests import _faulty

KINDS = [
    lambda i: torch.full((4,), float(i)),
    lambda i: torch.full((2, 3), i, dtype=torch.int64),
    lambda i: torch.tensor(float(i)),  # 0-d
    lambda i: torch.full((3,), i % 2 == 0),
    lambda i: torch.full((1000,), float(i), dtype=torch.float64),  # 8,000 bytes: staged on its own
]


def test_single_puts_of_every_kind_between_batches_store_each_as_put(tmp_path: Path) -> None:
    expected: dict[int, np.ndarray] = {}
    with Sink(tmp_path) as sink:
        i = 0
        for step in range(60):
            for _ in range(25):  # runs of one kind, then another: each run may gather into one array
                value = KINDS[step % len(KINDS)](i)
                expected[i] = value.numpy().copy()
                sink.put(i, value)
                value.zero_()  # the caller reuses its tensor at once
                i += 1
            if step % 7 == 0:  # a batch between the single puts
                batch = torch.arange(i, i + 8, dtype=torch.float32)[:, None].repeat(1, 4)
                expected.update({i + k: batch[k].numpy().copy() for k in range(8)})
                sink.put_batch(range(i, i + 8), batch)
                i += 8
            if step == 30:
                sink.flush()
                assert sink.stats.items == len(expected)
    for identifier, value in expected.items():
        stored = np.load(tmp_path / f"{identifier}.npy")
        assert stored.dtype == value.dtype and stored.shape == value.shape
        np.testing.assert_array_equal(stored, value)
    records = [json.loads(line) for line in (tmp_path / "_manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == sorted(expected)
    assert all(r["shape"] == list(expected[r["id"]].shape) for r in records)
    assert sink.stats.items == sink.stats.batches + 7 * 9 == len(expected)


def test_flush_stores_the_single_puts_gathered_while_the_only_writer_was_held() -> None:
    gate = threading.Event()
    plan = _faulty.Plan(gate=gate)
    safety = threading.Timer(20, gate.set)  # never hang the suite
    safety.start()
    sink = Sink("faulty://gathered", storage_options=_faulty.options(plan), concurrency=1).open()
    expected: dict[int, np.ndarray] = {0: np.zeros(4, dtype=np.float32)}
    try:
        sink.put(0, torch.zeros(4))
        assert plan.started.acquire(timeout=30)  # the only upload is held: the next puts gather
        for i in range(1, 200):
            value = KINDS[(i // 10) % len(KINDS)](i)  # runs of ten of each kind
            expected[i] = value.numpy().copy()
            sink.put(i, value)
        assert sink.stats.queue_bytes == sum(v.nbytes for v in expected.values())
        gate.set()
        sink.flush()
        assert sink.stats.items == 200
        assert sink.stats.queue_bytes == 0
        sink.close()
    finally:
        gate.set()
        safety.cancel()
        sink.abort()
    for i, value in expected.items():
        stored = np.load(io.BytesIO(_faulty.read(plan, f"/gathered/{i}.npy")))
        assert stored.dtype == value.dtype and stored.shape == value.shape
        np.testing.assert_array_equal(stored, value)


def test_a_failed_write_of_gathered_single_puts_names_the_ids_it_lost() -> None:
    plan = _faulty.Plan(fail=OSError(28, "No space left on device"), fail_when=lambda path: path.endswith("/13.npy"))
    sink = Sink("faulty://lost", storage_options=_faulty.options(plan), retries=1).open()
    with pytest.raises(WriteError) as caught:
        for i in range(40):
            sink.put(i, torch.full((4,), float(i)))
        sink.close()
    sink.abort()
    assert "13" in caught.value.ids


def test_resume_skips_single_puts_already_stored(tmp_path: Path) -> None:
    with Sink(tmp_path) as sink:
        for i in range(5):
            sink.put(i, torch.full((2,), float(i)))
    (tmp_path / "_SUCCESS").unlink()
    with Sink(tmp_path, mode="resume") as sink:
        for i in range(10):
            sink.put(i, torch.full((2,), 100.0 * i))
    assert sink.stats.skipped == 5
    assert sink.stats.items == 5
    np.testing.assert_array_equal(np.load(tmp_path / "3.npy"), [3.0, 3.0])
    np.testing.assert_array_equal(np.load(tmp_path / "8.npy"), [800.0, 800.0])


def test_abort_drops_single_puts_still_gathering(tmp_path: Path) -> None:
    gate = threading.Event()
    plan = _faulty.Plan(gate=gate)
    safety = threading.Timer(20, gate.set)
    safety.start()
    sink = Sink("faulty://dropped", storage_options=_faulty.options(plan), concurrency=1).open()
    try:
        sink.put(0, torch.zeros(4))
        assert plan.started.acquire(timeout=30)
        for i in range(1, 50):
            sink.put(i, torch.ones(4))
        sink.abort()
        assert sink.stats.queue_bytes == 0
    finally:
        gate.set()
        safety.cancel()
        sink.abort()
    assert not any(path.endswith("_SUCCESS") for path in plan.files)
