"""Every wait is bounded: a write stuck in a system call (a dead mount) fails the sink after ``timeout`` x
``retries``, ``abort`` returns at once, and the stuck thread, when it wakes up, makes nothing appear.

A write that hangs for real, without root: the test holds a writer in ``open(2)`` of a named pipe, which blocks
in the kernel until a reader comes, exactly as a write to a dead NFS mount blocks. Local stores are driven
through a writer-function format (Lighter's ``FileWriter`` functions), whose I/O runs in the same worker-thread
call as the store's write; ``faulty://`` (tests/_faulty.py) holds a thread-driven fsspec store's write at its
gate. Every test has a backstop that releases what it holds after 20 s, so that today's unbounded waits fail
the test's time bounds instead of hanging the suite.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from lighter_sink import Sink, SinkState, SinkStateError, WriteError
from lighter_sink._store import RetryPolicy, open_store
from lighter_sink.formats import FunctionFormat
from tests import _faulty
from tests._proxy import FaultProxy

BACKSTOP = 20.0  # seconds after which a test releases what it holds, bounded or not


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """A gate for faulty:// writes, opened at the end of the test or by the backstop, whichever comes first."""
    event = threading.Event()
    backstop = threading.Timer(BACKSTOP, event.set)
    backstop.start()
    try:
        yield event
    finally:
        event.set()
        backstop.cancel()


class _Pipe:
    """A named pipe whose ``open`` for writing blocks until :meth:`release` opens its read end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self._reader: int | None = None
        self._lock = threading.Lock()
        self._backstop = threading.Timer(BACKSTOP, self.release)
        self._backstop.start()

    def release(self) -> None:
        with self._lock:
            if self._reader is None:
                self._reader = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)

    def close(self) -> None:
        self.release()
        self._backstop.cancel()
        with self._lock:
            assert self._reader is not None
            os.close(self._reader)


def test_a_local_write_stuck_in_the_kernel_is_bounded_and_never_lands_after_abort(tmp_path: Path) -> None:
    pipe = _Pipe(tmp_path / "pipe")
    entered = threading.Event()
    writers: list[threading.Thread] = []

    def write_after_a_stuck_open(path: Path, value: torch.Tensor) -> None:
        writers.append(threading.current_thread())
        entered.set()
        with open(pipe.path, "wb"):  # blocks in open(2) until the test opens the read end
            pass
        np.save(path.with_suffix(".npy"), value.numpy())

    out = tmp_path / "out"
    sink = Sink(out, format=FunctionFormat(write_after_a_stuck_open, extension=".npy"), timeout=0.5, retries=2)
    sink.open()
    try:
        sink.put_batch(["a", "b"], torch.ones(2, 3))
        assert entered.wait(timeout=10)
        started = time.monotonic()
        with pytest.raises(WriteError) as info:
            sink.flush()
        flush_seconds = time.monotonic() - started
        started = time.monotonic()
        sink.abort()
        abort_seconds = time.monotonic() - started
    finally:
        sink.abort()
        pipe.release()  # the stuck thread wakes up now, long after its wait was abandoned
        for writer in writers:
            writer.join(timeout=30)
        pipe.close()
    assert flush_seconds < 10, flush_seconds  # 0.5 s per attempt, far from the 20 s backstop
    assert abort_seconds < 5, abort_seconds
    message = str(info.value)
    assert str(out) in message and "'a'" in message and "'b'" in message and "TimeoutError" in message, message
    assert sink.state is SinkState.ABORTED
    assert writers and not any(writer.is_alive() for writer in writers)  # its attempt is over: check what it did
    # no object, no temporary file, no control object but how the output is written (for remaining())
    assert sorted(p.name for p in out.iterdir()) == ["_output.json"]


def test_a_write_stuck_in_a_thread_driven_store_fails_within_timeout_times_retries(gate: threading.Event) -> None:
    plan = _faulty.Plan(gate=gate)
    sink = Sink("faulty://stuck", storage_options=_faulty.options(plan), timeout=0.5, retries=2).open()
    try:
        sink.put_batch([0, 1], torch.ones(2, 3))
        assert plan.started.acquire(timeout=10)
        started = time.monotonic()
        with pytest.raises(WriteError) as info:
            sink.flush()
        seconds = time.monotonic() - started
    finally:
        sink.abort()
    assert seconds < 10, seconds  # two attempts of 0.5 s and a back-off, far from the 20 s backstop
    message = str(info.value)
    assert "faulty://stuck" in message and "'0'" in message and "'1'" in message, message
    assert "TimeoutError" in message and "no answer within 0.5 s" in message, message


def test_abort_returns_at_once_while_a_write_is_stuck(gate: threading.Event) -> None:
    plan = _faulty.Plan(gate=gate)
    sink = Sink("faulty://abort", storage_options=_faulty.options(plan), timeout=60).open()
    sink.put(0, torch.ones(3))
    assert plan.started.acquire(timeout=10)  # the upload is inside the filesystem's write, held there
    started = time.monotonic()
    sink.abort()
    seconds = time.monotonic() - started
    assert seconds < 5, seconds
    assert sink.state is SinkState.ABORTED
    with pytest.raises(SinkStateError):
        sink.put(1, torch.ones(3))


def test_a_put_racing_abort_on_another_thread_raises_instead_of_returning_as_if_queued(
    gate: threading.Event,
) -> None:
    plan = _faulty.Plan(gate=gate)
    item = torch.zeros(100)  # 400 bytes
    sink = Sink("faulty://race", storage_options=_faulty.options(plan), max_queue_bytes=1000, concurrency=1).open()
    outcome: dict[str, object] = {}
    done = threading.Event()

    def third_put() -> None:
        try:
            sink.put(2, item)
            outcome["returned"] = True
        except BaseException as exc:
            outcome["raised"] = exc
        finally:
            done.set()

    producer = threading.Thread(target=third_put)
    try:
        sink.put(0, item)
        assert plan.started.acquire(timeout=10)  # the only upload is held: the queue fills up
        sink.put(1, item)
        producer.start()
        assert not done.wait(timeout=0.5), "put must wait for room while the queue holds max_queue_bytes"
        sink.abort()
        assert done.wait(timeout=10)
    finally:
        sink.abort()
        gate.set()
        if producer.ident is not None:
            producer.join(timeout=30)
    assert "returned" not in outcome, "a put that raced abort returned as if its batch were queued"
    assert isinstance(outcome.get("raised"), SinkStateError), outcome


@pytest.mark.anyio
async def test_a_local_read_stuck_in_the_kernel_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "k"
    os.mkfifo(path)  # reading it blocks in open(2) until a writer comes
    writer: list[int] = []

    def release() -> None:  # a writer that opens and closes at once: the blocked readers see an empty file
        if not writer:
            writer.append(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            os.close(writer[0])

    backstop = threading.Timer(BACKSTOP, release)
    backstop.start()
    store = await open_store(str(tmp_path), retry=RetryPolicy(attempts=2, base_delay=0.01, timeout=0.3))
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match=r"k: no answer within 0\.3 s"):
            await store.get("k")
        seconds = time.monotonic() - started
    finally:
        backstop.cancel()
        release()
        await store.aclose()
    assert seconds < 5, seconds
    assert store.retries == 1


@pytest.mark.anyio
async def test_a_fenced_store_makes_no_object_appear(tmp_path: Path) -> None:
    """A write begun before the fence never completes; one begun after it (the sink giving up its lease) does."""
    store = await open_store(str(tmp_path))
    try:
        await store.put("0.npy", [b"before"])
        temp = store.temp_path("_SUCCESS")  # a write in progress when the sink aborts: its thread wakes later
        since = store.fence_epoch
        Path(temp).write_bytes(b"{}")
        store.fence()
        with pytest.raises(SinkStateError, match="_SUCCESS was not written"):
            store.replace(temp, "_SUCCESS", since)
        await store.put("_lease.json", [b"released"])
    finally:
        await store.aclose()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")) == ["0.npy", "_lease.json"]


@pytest.mark.s3
def test_obstore_timeout_bounds_each_attempt_not_its_whole_retry_loop(fault_proxy: FaultProxy, s3_bucket: str) -> None:
    pytest.importorskip("obstore")
    url = f"s3://{s3_bucket}/obstore"
    sink = Sink(url, storage_options=fault_proxy.storage_options, backend="obstore", retries=3, timeout=1)
    sink.open()
    try:
        sink.put(100, torch.ones(3))
        sink.flush()  # opened and writing; from now on nothing answers
        fault_proxy.configure(blackhole_after=0)
        held_before = fault_proxy.stats.blackholed
        sink.put(0, torch.ones(3))
        started = time.monotonic()
        with pytest.raises(WriteError) as info:
            sink.flush()
        seconds = time.monotonic() - started
        attempts = fault_proxy.stats.blackholed - held_before
    finally:
        sink.abort()
    assert attempts == 3  # every attempt got its own second, obstore's retries included
    assert 3 <= seconds < 20, seconds
    assert url in str(info.value) and "'0'" in str(info.value)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
