import csv
import gc
import io
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from lighter_sink import (
    ConfigurationError,
    DestinationError,
    FormatNotFoundError,
    IdentifierError,
    PredictionError,
    Sink,
    SinkState,
    SinkStateError,
    WriteError,
)
from lighter_sink._handoff import MAX_QUEUED_ITEMS
from lighter_sink.formats import NpyFormat
from tests import _faulty


def _manifest(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (path / "_manifest.jsonl").read_text().splitlines()]


def test_round_trip_to_a_local_directory(tmp_path: Path) -> None:
    batch = torch.randn(10, 3, 5)
    with Sink(tmp_path) as sink:
        sink.put_batch(range(10), batch)
        sink.put("extra", torch.arange(4))
    for i in range(10):
        np.testing.assert_array_equal(np.load(tmp_path / f"{i}.npy"), batch[i].numpy())
    np.testing.assert_array_equal(np.load(tmp_path / "extra.npy"), np.arange(4))
    records = _manifest(tmp_path)
    assert [r["id"] for r in records] == [*range(10), "extra"]
    first = records[0]
    assert first["path"] == "0.npy"
    assert first["shape"] == [3, 5]
    assert first["dtype"] == "float32"
    assert first["nbytes"] == (tmp_path / "0.npy").stat().st_size
    success = json.loads((tmp_path / "_SUCCESS").read_text())
    assert success["count"] == 11
    assert success["format"] == "npy"
    assert success["world_size"] == 1
    assert sink.state is SinkState.COMMITTED
    assert sink.stats.items == 11
    assert not (tmp_path / "_parts").exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_list_of_tensors_and_numpy_arrays(tmp_path: Path) -> None:
    with Sink(tmp_path, format="pt") as sink:
        sink.put_batch(["a", "b"], [torch.ones(2), np.zeros(3, dtype=np.int16)])
    assert torch.equal(torch.load(tmp_path / "a.pt"), torch.ones(2))
    assert torch.equal(torch.load(tmp_path / "b.pt"), torch.zeros(3, dtype=torch.int16))


def test_nested_ids_make_prefixes(tmp_path: Path) -> None:
    with Sink(tmp_path) as sink:
        sink.put("case-1/slice-0", torch.ones(1))
    assert (tmp_path / "case-1" / "slice-0.npy").exists()


def test_memory_filesystem_through_threads() -> None:
    import fsspec

    with Sink("memory://sink-test/run") as sink:
        sink.put_batch([0, 1], torch.eye(2))
    fs = fsspec.filesystem("memory")
    np.testing.assert_array_equal(np.load(io.BytesIO(fs.cat("/sink-test/run/1.npy"))), [0.0, 1.0])
    assert fs.exists("/sink-test/run/_SUCCESS")


def test_arguments_are_checked_at_construction(tmp_path: Path) -> None:
    with pytest.raises(FormatNotFoundError, match="known: .*npy"):
        Sink(tmp_path, format="nope")
    with pytest.raises(ConfigurationError, match="mode"):
        Sink(tmp_path, mode="append")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="max_queue_bytes"):
        Sink(tmp_path, max_queue_bytes=0)
    with pytest.raises(ConfigurationError, match="concurrency"):
        Sink(tmp_path, concurrency=0)
    with pytest.raises(ConfigurationError, match="retries"):
        Sink(tmp_path, retries=0)
    with pytest.raises(ConfigurationError, match="rank"):
        Sink(tmp_path, rank=2, world_size=2)
    with pytest.raises(ConfigurationError, match="storage_options"):
        Sink(tmp_path, storage_options=["key"])  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="torch.distributed"):
        Sink(tmp_path, rank=0, world_size=2).open()


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_bad_predictions_fail_on_the_callers_thread(tmp_path: Path) -> None:
    with Sink(tmp_path) as sink:
        with pytest.raises(PredictionError, match="must be a torch.Tensor"):
            sink.put(0, [1, 2, 3])
        with pytest.raises(PredictionError, match="got 3 predictions for 2 ids"):
            sink.put_batch([0, 1], torch.ones(3, 2))
        with pytest.raises(PredictionError, match="bfloat16"):
            sink.put(0, torch.ones(2, dtype=torch.bfloat16))
        with pytest.raises(IdentifierError, match=r"'\.\.'"):
            sink.put("../outside", torch.ones(1))
        with pytest.raises(PredictionError, match=r"torch\.sparse_coo tensor; expected a dense one"):
            sink.put(0, torch.ones(3).to_sparse())
        with pytest.raises(PredictionError, match=r"torch\.sparse_csr tensor; expected a dense one"):
            sink.put_batch([0, 1], torch.ones(2, 2).to_sparse_csr())
        nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged)
        with pytest.raises(PredictionError, match="the prediction batch is a nested tensor; expected a dense one"):
            sink.put_batch([0, 1], nested)
        with pytest.raises(PredictionError, match="prediction 1 is a nested tensor"):
            sink.put_batch([0, 1], [torch.ones(2), nested])
        sink.put(0, torch.ones(1))
    assert [r["id"] for r in _manifest(tmp_path)] == [0]
    assert not (tmp_path.parent / "outside.npy").exists()


def test_each_kind_of_sample_is_checked_once_and_a_bad_kind_every_time(tmp_path: Path) -> None:
    class Counting(NpyFormat):
        name = "npy_counting_test"

        def __init__(self) -> None:
            self.checked: list[tuple[torch.dtype, tuple[int, ...]]] = []

        def check(self, value: torch.Tensor) -> None:
            self.checked.append((value.dtype, tuple(value.shape)))
            super().check(value)

    fmt = Counting()
    with Sink(tmp_path, format=fmt) as sink:
        for start in range(0, 12, 4):
            sink.put_batch(range(start, start + 4), torch.ones(4, 3))
        sink.put_batch([12, 13], torch.ones(2, 3))  # fewer rows: the same kind of sample
        sink.put_batch([14], torch.ones(1, 5))
        sink.put_batch([15], torch.ones(1, 3, dtype=torch.float64))
        for _ in range(2):  # a refused kind is never remembered as good
            with pytest.raises(PredictionError, match="bfloat16"):
                sink.put_batch([16], torch.ones(1, 3, dtype=torch.bfloat16))
        sink.put(16, torch.ones(3))  # Sink.put's sample is of a kind its batches already showed
        sink.put(17, torch.ones(3))
        with pytest.raises(PredictionError, match="bfloat16"):
            sink.put(18, torch.ones(3, dtype=torch.bfloat16))
    assert fmt.checked == [
        (torch.float32, (3,)),
        (torch.float32, (5,)),
        (torch.float64, (3,)),
        (torch.bfloat16, (3,)),
        (torch.bfloat16, (3,)),
        (torch.bfloat16, (3,)),
    ]
    assert len(_manifest(tmp_path)) == 18


def test_regular_file_as_destination(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("not a directory")
    with pytest.raises(DestinationError, match="regular file"), Sink(target):
        pass
    assert target.read_text() == "not a directory"


def test_a_directory_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(DestinationError, match="cannot create the directory"), Sink(tmp_path / "file" / "sub"):
        pass


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_directory(tmp_path: Path) -> None:
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o500)
    with pytest.raises(DestinationError, match="not writable"), Sink(target):
        pass


def test_mode_error_refuses_a_non_empty_url(tmp_path: Path) -> None:
    (tmp_path / "old.npy").write_bytes(b"x")
    with pytest.raises(DestinationError, match="mode='error'"), Sink(tmp_path, mode="error"):
        pass
    with Sink(tmp_path / "new", mode="error") as sink:
        sink.put(0, torch.ones(1))
    assert (tmp_path / "new" / "_SUCCESS").exists()


def test_a_stale_marker_never_vouches_for_a_failed_run(tmp_path: Path) -> None:
    with Sink(tmp_path) as sink:
        sink.put(0, torch.ones(1))
    assert (tmp_path / "_SUCCESS").exists()
    with pytest.raises(RuntimeError, match="model failed"), Sink(tmp_path) as sink:
        sink.put(1, torch.ones(1))
        sink.flush()
        assert (tmp_path / "1.npy").exists()
        assert not (tmp_path / "_SUCCESS").exists()  # removed before anything new was written
        raise RuntimeError("model failed")
    assert sink.state is SinkState.ABORTED
    assert not (tmp_path / "_SUCCESS").exists()
    assert not (tmp_path / "_manifest.jsonl").exists()


def test_backpressure_blocks_put_until_a_write_completes() -> None:
    gate = threading.Event()
    plan = _faulty.Plan(gate=gate)
    item = torch.zeros(100)  # 400 bytes
    sink = Sink("faulty://bp", storage_options=_faulty.options(plan), max_queue_bytes=1000, concurrency=1).open()
    try:
        sink.put(0, item)
        plan.started.acquire(timeout=30)  # the only worker is now inside the first write, held by the gate
        sink.put(1, item)  # 800 bytes held: still room
        returned = threading.Event()

        def third_put() -> None:
            sink.put(2, item)
            returned.set()

        producer = threading.Thread(target=third_put)
        producer.start()
        assert not returned.wait(timeout=0.5), "put must block while the queue holds max_queue_bytes"
        assert sink.stats.queue_bytes == 800
        gate.set()
        assert returned.wait(timeout=30)
        producer.join()
        sink.close()
    finally:
        gate.set()
        sink.abort()
    stats = sink.stats
    assert stats.stall_seconds > 0
    assert stats.queue_high_water_bytes <= 1000
    assert stats.items == 3
    assert sink.state is SinkState.COMMITTED


def test_put_blocks_while_the_queue_holds_its_most_predictions_whatever_their_bytes() -> None:
    """Tiny predictions: their ids and keys (Python strings) outweigh their bytes, which max_queue_bytes counts;
    put waits once MAX_QUEUED_ITEMS of them are queued, far below max_queue_bytes."""
    gate = threading.Event()
    plan = _faulty.Plan(gate=gate)
    values = torch.zeros(1024, 1)  # 4 bytes a prediction
    sink = Sink("faulty://items", storage_options=_faulty.options(plan), concurrency=1).open()
    try:
        sink.put_batch(range(1024), values)
        plan.started.acquire(timeout=30)  # the only worker is now inside the first write, held by the gate
        for start in range(1024, MAX_QUEUED_ITEMS, 1024):
            sink.put_batch(range(start, start + 1024), values)
        returned = threading.Event()

        def one_more() -> None:
            sink.put(MAX_QUEUED_ITEMS, torch.zeros(1))
            returned.set()

        producer = threading.Thread(target=one_more)
        producer.start()
        assert not returned.wait(timeout=0.5), "put must block while the queue holds MAX_QUEUED_ITEMS predictions"
        assert sink.stats.queue_bytes == 4 * MAX_QUEUED_ITEMS < sink.max_queue_bytes
        gate.set()
        assert returned.wait(timeout=60)
        producer.join()
    finally:
        gate.set()
        sink.abort()
    assert sink.stats.stall_seconds > 0


def test_a_put_waiting_for_room_stays_interruptible_when_the_signal_reaches_another_thread() -> None:
    """Ctrl-C goes to any thread; a main thread blocked in a lock is not woken by one delivered elsewhere."""

    class Interrupted(Exception):
        pass

    def on_sigint(signum: int, frame: object) -> None:
        raise Interrupted

    gate = threading.Event()
    plan = _faulty.Plan(gate=gate)
    item = torch.zeros(100)  # 400 bytes
    stop = threading.Event()
    bystander = threading.Thread(target=stop.wait, args=(60,))
    bystander.start()
    safety = threading.Timer(20, gate.set)  # never hang the suite: the gate opens after 20 s whatever happens
    safety.start()
    previous = signal.signal(signal.SIGINT, on_sigint)
    sink = Sink("faulty://sigint", storage_options=_faulty.options(plan), max_queue_bytes=1000, concurrency=1).open()
    try:
        sink.put(0, item)
        assert plan.started.acquire(timeout=30)  # the only upload is held by the gate
        sink.put(1, item)  # 800 bytes queued: the next put waits for room
        assert bystander.ident is not None
        kick = threading.Timer(0.2, signal.pthread_kill, args=(bystander.ident, signal.SIGINT))
        started = time.monotonic()
        kick.start()
        with pytest.raises(Interrupted):
            sink.put(2, item)
        assert time.monotonic() - started < 5
        kick.join()
    finally:
        signal.signal(signal.SIGINT, previous)
        gate.set()
        stop.set()
        safety.cancel()
        sink.abort()
        bystander.join()


def test_abort_winds_down_even_if_an_interrupt_left_the_queue_lock_held() -> None:
    """KeyboardInterrupt just after a Python-level __enter__ took a lock leaves it held; abort must not hang."""
    plan = _faulty.Plan()
    sink = Sink("faulty://leak", storage_options=_faulty.options(plan), concurrency=2).open()
    sink.put_batch(range(4), torch.ones(4, 3))
    finished = threading.Event()

    def interrupted_then_aborted() -> None:
        sink._run.handoff.cond.acquire()  # what the interrupted `with` left behind on the caller's thread
        sink.abort()
        finished.set()

    caller = threading.Thread(target=interrupted_then_aborted, daemon=True)
    caller.start()
    assert finished.wait(timeout=30), "abort hung on the lock the caller's thread held"
    caller.join()
    assert sink.state is SinkState.ABORTED


def test_put_never_wakes_the_event_loop_from_the_callers_thread() -> None:
    """Waking the loop is a system call that gives up the GIL; the predict loop then waits to get it back."""
    with Sink("memory://sink-test/waker") as sink:
        loop = sink._run._loop
        assert loop is not None
        wakers: list[str] = []
        putting = threading.Event()
        wake = loop.call_soon_threadsafe

        def recording(*args: object) -> object:
            caller = threading.current_thread() is threading.main_thread() and putting.is_set()
            wakers.append("put" if caller else "elsewhere")
            return wake(*args)  # type: ignore[arg-type]

        loop.call_soon_threadsafe = recording  # type: ignore[method-assign]
        for start in range(0, 64, 8):
            putting.set()
            sink.put_batch(range(start, start + 8), torch.ones(8, 2))
            putting.clear()
        sink.flush()
        assert "elsewhere" in wakers, "the hand-over never went through call_soon_threadsafe"
        assert "put" not in wakers
    assert sink.stats.items == 64


def test_an_event_loop_that_cannot_be_woken_fails_the_run_instead_of_hanging() -> None:
    sink = Sink("memory://sink-test/closed-loop").open()
    sink.flush()  # the store is open: from here on nothing but the waker calls into the loop from a thread
    loop = sink._run._loop
    assert loop is not None

    def closed(*args: object) -> None:
        raise RuntimeError("Event loop is closed")

    loop.call_soon_threadsafe = closed  # type: ignore[method-assign,assignment]
    try:
        sink.put_batch(range(2), torch.ones(2, 2))
        with pytest.raises(WriteError, match="Event loop is closed"):
            sink.flush()
    finally:
        del loop.call_soon_threadsafe
        sink.abort()
    assert sink.state is SinkState.ABORTED


def test_commit_or_abort_right_after_put(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hand-overs on their way to the event loop reach it before the workers stop: all stored, or cleanly dropped."""
    import fsspec

    fs = fsspec.filesystem("memory")
    thread_errors: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    for run in range(40):
        sink = Sink(f"memory://sink-test/quick/{run}", format="pt").open()
        for i in range(run % 5 + 1):
            sink.put_batch([2 * i, 2 * i + 1], torch.ones(2, 1))
        if run % 2:
            sink.abort()
            assert not fs.exists(f"/sink-test/quick/{run}/_SUCCESS")
        else:
            sink.close()
            count = json.loads(fs.cat(f"/sink-test/quick/{run}/_SUCCESS"))["count"]
            assert count == 2 * (run % 5 + 1), run
    assert not thread_errors
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_object_store_writes_in_flight_are_bounded_by_concurrency() -> None:
    gate = threading.Event()
    plan = _faulty.Plan(gate=gate)
    with Sink("faulty://flight", storage_options=_faulty.options(plan), concurrency=3) as sink:
        for i in range(12):
            sink.put(i, torch.full((4,), float(i)))
        for _ in range(3):  # three uploads start and are held by the gate
            assert plan.started.acquire(timeout=30)
        gate.set()
    assert plan.most_in_flight == 3
    assert sink.stats.items == 12
    np.testing.assert_array_equal(np.load(io.BytesIO(_faulty.read(plan, "/flight/11.npy"))), [11.0] * 4)


@dataclass
class _HeldWrites(_faulty.Plan):
    """Writes of the paths in ``holds`` wait for their event; ``reached`` is set when one of them begins."""

    holds: dict[str, threading.Event] = field(default_factory=dict)
    reached: threading.Event = field(default_factory=threading.Event)

    def _write(self, path: str) -> None:
        hold = self.holds.get(path)
        if hold is not None:
            self.reached.set()
            if not hold.wait(timeout=60):
                raise TimeoutError("the test never released the write")
        super()._write(path)


def test_an_object_stores_backlog_is_encoded_and_its_room_freed_in_small_groups() -> None:
    """The uploaders wait until a whole group is encoded, and a group's room in the queue comes back once every
    object of it is stored: a backlog of 504 small predictions goes in groups of a few dozen, not all in one."""
    holds = {"/groups/0.npy": threading.Event(), "/groups/400.npy": threading.Event()}
    plan = _HeldWrites(holds=holds)
    batch = torch.zeros(8, 4)  # 16 bytes a prediction
    sink = Sink("faulty://groups", storage_options=_faulty.options(plan), concurrency=1).open()
    try:
        sink.put_batch(range(8), batch)
        assert plan.reached.wait(timeout=30)  # the only uploader holds object 0: the rest queues behind it
        plan.reached.clear()
        for start in range(8, 512, 8):
            sink.put_batch(range(start, start + 8), batch)
        holds["/groups/0.npy"].set()
        assert plan.reached.wait(timeout=30)  # objects 0-399 are stored, in order (one encoder, one uploader)
        # (one group of the whole backlog would still hold 504 * 16 bytes)
        assert sink.stats.queue_bytes <= (512 - 400 + 128) * 16
        holds["/groups/400.npy"].set()
        sink.close()
    finally:
        for hold in holds.values():
            hold.set()
        sink.abort()
    assert sink.stats.items == 512
    np.testing.assert_array_equal(np.load(io.BytesIO(_faulty.read(plan, "/groups/511.npy"))), [0.0] * 4)


def test_a_failed_write_is_raised_on_flush_put_and_close() -> None:
    plan = _faulty.Plan(fail=PermissionError(13, "denied by the test"))
    sink = Sink("faulty://fail", storage_options=_faulty.options(plan), retries=3).open()
    sink.put_batch([0, 1], torch.ones(2, 2))
    with pytest.raises(WriteError) as info:
        sink.flush()
    error = info.value
    assert "faulty://fail" in str(error)
    assert "'0'" in str(error)
    assert "denied by the test" in str(error)
    assert isinstance(error.__cause__, PermissionError)
    assert isinstance(error, OSError)
    assert plan.writes == 2  # permanent: not retried
    with pytest.raises(WriteError):
        sink.put(2, torch.ones(2))
    with pytest.raises(WriteError):
        sink.close()
    assert sink.state is SinkState.ABORTED
    assert not any(p.endswith("_SUCCESS") for p in plan.files)
    assert sink.stats.failed == 2


def test_transient_errors_are_retried_and_counted() -> None:
    plan = _faulty.Plan(fail=ConnectionResetError(104, "reset"), fail_first=3)
    with Sink("faulty://retry", storage_options=_faulty.options(plan), retries=5) as sink:
        sink.put_batch(range(4), torch.arange(8.0).reshape(4, 2))
    assert sink.stats.retries == 3
    loaded = np.load(io.BytesIO(_faulty.read(plan, "/retry/3.npy")))
    np.testing.assert_array_equal(loaded, [6.0, 7.0])
    assert "/retry/_SUCCESS" in plan.files


def test_lifecycle_misuse_is_explained(tmp_path: Path) -> None:
    sink = Sink(tmp_path)
    with pytest.raises(SinkStateError, match="context manager"):
        sink.put(0, torch.ones(1))
    with sink:
        pass
    with pytest.raises(SinkStateError, match="committed"):
        sink.put(0, torch.ones(1))
    with pytest.raises(SinkStateError, match="new sink"):
        sink.open()
    sink.close()  # idempotent
    sink.abort()


def test_a_sink_dropped_while_open_warns_and_aborts(tmp_path: Path) -> None:
    sink = Sink(tmp_path).open()
    sink.put(0, torch.ones(1))
    with pytest.warns(ResourceWarning, match="garbage-collected while open"):
        del sink
        gc.collect()
    assert not (tmp_path / "_SUCCESS").exists()


def test_repr_and_errors_never_show_storage_options(tmp_path: Path) -> None:
    secret = "SECRET-do-not-print-1234"
    sink = Sink(tmp_path, storage_options={"secret": secret})
    assert secret not in repr(sink)
    assert secret not in repr(sink.__dict__.get("retry"))


def test_stats_snapshot(tmp_path: Path) -> None:
    with Sink(tmp_path) as sink:
        sink.put_batch(range(3), torch.ones(3, 256))
    stats = sink.stats
    assert stats.batches == 1
    assert stats.items == 3
    assert stats.bytes == sum((tmp_path / f"{i}.npy").stat().st_size for i in range(3))
    assert stats.write_seconds_p50 is not None
    assert stats.queue_bytes == 0
    assert stats.queue_high_water_bytes >= 3 * 256 * 4
    assert stats.as_dict()["mb_per_second"] >= 0


def test_an_id_may_be_put_once_per_run(tmp_path: Path) -> None:
    with Sink(tmp_path) as sink:
        sink.put("a", torch.ones(1))
        with pytest.raises(IdentifierError, match="'a' was already put"):
            sink.put_batch(["b", "a"], torch.ones(2, 1))
        sink.put("b", torch.ones(1))  # the refused batch claimed nothing
    assert [r["id"] for r in _manifest(tmp_path)] == ["a", "b"]


def test_key_template_names_objects_and_keeps_ids(tmp_path: Path) -> None:
    with Sink(tmp_path, key="{hash:.2}/{id:05d}") as sink:
        sink.put_batch(range(3), torch.eye(3))
    records = _manifest(tmp_path)
    assert [r["id"] for r in records] == [0, 1, 2]
    for record in records:
        path = tmp_path / str(record["path"])
        assert path.name == f"{int(str(record['id'])):05d}.npy"
        assert path.parent.parent == tmp_path


@pytest.mark.parametrize("fmt", ["npy", "csv", "jsonl"])
def test_ids_of_unicode_digits_are_text_and_commit(tmp_path: Path, fmt: str) -> None:
    # '1²' passes str.isdigit() but not int(); '٣' (Arabic-Indic three) passes both and is not the id '3'
    ids = ["1\u00b2", "\u0663", "3", "10"]
    with Sink(tmp_path, format=fmt) as sink:
        sink.put_batch(ids, torch.arange(4.0))
    assert sink.state is SinkState.COMMITTED
    order = ["3", "10", "1\u00b2", "\u0663"]
    assert [r["id"] for r in _manifest(tmp_path)] == [3, 10, "1\u00b2", "\u0663"]
    expected = {"1\u00b2": 0.0, "\u0663": 1.0, "3": 2.0, "10": 3.0}
    if fmt == "npy":
        assert {i: float(np.load(tmp_path / f"{i}.npy")) for i in ids} == expected
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO((tmp_path / "predictions.csv").read_text())))
        assert [(r["id"], float(r["value"])) for r in rows] == [(i, expected[i]) for i in order]
    else:
        rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
        assert [(r["id"], r["value"]) for r in rows] == [(3, 2.0), (10, 3.0), ("1\u00b2", 0.0), ("\u0663", 1.0)]


def test_a_text_id_keeps_its_text_in_its_key(tmp_path: Path) -> None:
    with Sink(tmp_path / "pred", key="pred-{id}") as sink:
        sink.put("7", torch.tensor([7.0]))
        sink.put("007", torch.tensor([0.07]))
        sink.put(8, torch.tensor([8.0]))
    records = _manifest(tmp_path / "pred")
    assert [(r["id"], r["path"]) for r in records] == [
        (7, "pred-7.npy"),
        (8, "pred-8.npy"),
        ("007", "pred-007.npy"),
    ]
    np.testing.assert_array_equal(np.load(tmp_path / "pred" / "pred-007.npy"), np.float32([0.07]))
    np.testing.assert_array_equal(np.load(tmp_path / "pred" / "pred-7.npy"), np.float32([7.0]))
    with Sink(tmp_path / "hashed", key="{hash:.2}/{id}") as sink:
        sink.put("001", torch.ones(1))
    assert [str(r["path"]).split("/")[1] for r in _manifest(tmp_path / "hashed")] == ["001.npy"]


def test_a_number_template_refuses_text_ids(tmp_path: Path) -> None:
    with Sink(tmp_path, key="{id:08d}") as sink:
        sink.put("7", torch.ones(1))
        with pytest.raises(IdentifierError, match="formats numbers") as info:
            sink.put("007", torch.zeros(1))
        assert "'007'" in str(info.value)
    assert [(r["id"], r["path"]) for r in _manifest(tmp_path)] == [(7, "00000007.npy")]


def test_two_ids_that_give_one_key_are_refused(tmp_path: Path) -> None:
    with Sink(tmp_path / "text", key="{id!s:.9}") as sink:  # the first 9 characters of the id
        sink.put("scan-0001-a", torch.ones(1))
        with pytest.raises(IdentifierError) as info:
            sink.put("scan-0001-b", torch.zeros(1))
        assert all(part in str(info.value) for part in ("'scan-0001-a'", "'scan-0001-b'", "'scan-0001'"))
        with pytest.raises(IdentifierError, match="'scan-0002-a'.*'scan-0002-b'.*'scan-0002'"):
            sink.put_batch(["scan-0002-a", "scan-0002-b"], torch.ones(2, 1))
        sink.put("scan-0002-b", torch.full((1,), 2.0))  # the refused batch claimed nothing
        with pytest.raises(IdentifierError, match="'scan-0002-b' was already put"):
            sink.put("scan-0002-b", torch.ones(1))
    records = _manifest(tmp_path / "text")
    assert [(r["id"], r["path"]) for r in records] == [
        ("scan-0001-a", "scan-0001.npy"),
        ("scan-0002-b", "scan-0002.npy"),
    ]
    np.testing.assert_array_equal(np.load(tmp_path / "text" / "scan-0001.npy"), np.float32([1.0]))
    with Sink(tmp_path / "numbers", key="{id:1>3}") as sink:  # pads with the digit 1: 1 and 11 give '111'
        sink.put(1, torch.ones(1))
        with pytest.raises(IdentifierError, match="'1'.*'11'.*'111'"):
            sink.put(11, torch.zeros(1))
    assert [(r["id"], r["path"]) for r in _manifest(tmp_path / "numbers")] == [(1, "111.npy")]


def test_resume_maps_stored_keys_back_to_text_and_number_ids(tmp_path: Path) -> None:
    with Sink(tmp_path, key="pred-{id}") as sink:
        sink.put("a", torch.zeros(1))
    # an interrupted run stored the ids "001" and 1 but recorded neither
    np.save(tmp_path / "pred-001.npy", np.float32([1.5]))
    np.save(tmp_path / "pred-1.npy", np.float32([2.5]))
    (tmp_path / "_SUCCESS").unlink()
    with Sink(tmp_path, key="pred-{id}", mode="resume") as sink:
        sink.put_batch(["001", 1, "2"], torch.full((3, 1), 100.0))
    assert (sink.stats.skipped, sink.stats.items) == (2, 1)
    records = _manifest(tmp_path)
    assert [(r["id"], r["path"]) for r in records] == [
        (1, "pred-1.npy"),
        (2, "pred-2.npy"),
        ("001", "pred-001.npy"),
        ("a", "pred-a.npy"),
    ]
    np.testing.assert_array_equal(np.load(tmp_path / "pred-001.npy"), np.float32([1.5]))
    np.testing.assert_array_equal(np.load(tmp_path / "pred-1.npy"), np.float32([2.5]))


def test_resume_skips_stored_ids_and_records_unrecorded_objects(tmp_path: Path) -> None:
    with Sink(tmp_path, key="{id:04d}") as sink:
        sink.put_batch(range(5), torch.arange(5.0)[:, None])
    # an interrupted run stored two objects but recorded neither, and left a temporary file
    np.save(tmp_path / "0005.npy", np.array([5.0], dtype=np.float32))
    np.save(tmp_path / "0006.npy", np.array([6.0], dtype=np.float32))
    (tmp_path / ".lsink.killed-run.2.tmp").write_bytes(b"half")
    (tmp_path / "_SUCCESS").unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.npy")}
    with Sink(tmp_path, key="{id:04d}", mode="resume") as sink:
        sink.put_batch(range(10), torch.arange(10.0)[:, None] * 100)  # a different value: stored ones must stay
    assert sink.stats.skipped == 7
    assert sink.stats.items == 3
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in mtimes} == mtimes
    np.testing.assert_array_equal(np.load(tmp_path / "0003.npy"), [3.0])
    np.testing.assert_array_equal(np.load(tmp_path / "0008.npy"), [800.0])
    records = _manifest(tmp_path)
    assert [r["id"] for r in records] == list(range(10))
    assert records[6]["path"] == "0006.npy"
    assert records[6]["shape"] == [1]
    assert not list(tmp_path.glob(".*.tmp"))
    assert json.loads((tmp_path / "_SUCCESS").read_text())["count"] == 10


def test_remaining_reads_the_manifest_for_row_formats(tmp_path: Path) -> None:
    from lighter_sink import remaining

    with Sink(tmp_path / "t", format="csv") as sink:
        sink.put_batch(range(0, 10, 2), torch.arange(5.0))
    todo = remaining(str(tmp_path / "t"), list(range(10)), format="csv")  # type: ignore[arg-type]
    assert list(todo.indices) == [1, 3, 5, 7, 9]
    with Sink(tmp_path / "n") as sink:
        sink.put_batch([0, 3], torch.ones(2, 1))
    assert list(remaining(str(tmp_path / "n"), list(range(5))).indices) == [1, 2, 4]  # type: ignore[arg-type]


@pytest.mark.parametrize("url", ["{tmp}/out", "file://{tmp}/out", "memory://out"])
def test_the_obstore_backend_is_refused_for_a_url_it_does_not_serve(tmp_path: Path, url: str) -> None:
    """``backend="obstore"`` serves S3 urls; on a local path it was silently ignored, elsewhere it failed at open."""
    from lighter_sink import PredictionSink

    url = url.format(tmp=tmp_path)
    for make in (lambda: Sink(url, backend="obstore"), lambda: PredictionSink(url, backend="obstore")):
        with pytest.raises(ConfigurationError, match=r"backend='obstore' serves S3 urls \(s3:// urls\)"):
            make()
    assert not (tmp_path / "out").exists()
