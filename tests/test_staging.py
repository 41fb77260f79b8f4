import io
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lighter_sink import PredictionError, PredictionSink, Sink, WriteError
from lighter_sink._staging import BufferPool, stage
from tests import _faulty
from tests.conftest import quiet_trainer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cpu_tensors_are_copied_into_compact_memory_the_sink_owns() -> None:
    value = torch.randn(4, 3, requires_grad=True) * 2
    host = stage(value, 4)
    assert isinstance(host.values, torch.Tensor)
    assert not host.values.requires_grad
    assert host.values.data_ptr() != value.data_ptr()
    torch.testing.assert_close(host.values, value.detach())
    assert host.nbytes == 4 * 3 * 4
    assert host.wait is None


def test_a_view_is_copied_alone_and_counts_only_its_own_bytes() -> None:
    big = torch.randn(64, 4096)
    host = stage(big[:, :10], 64)
    assert isinstance(host.values, torch.Tensor)
    assert host.values.is_contiguous()
    assert host.values.untyped_storage().nbytes() == host.nbytes == 64 * 10 * 4  # not the 1 MiB under the view
    torch.testing.assert_close(host.values, big[:, :10])
    samples = stage(list(big[:2, ::2].unbind(0)), 2)  # per-sample views: each its own compact copy
    assert [s.untyped_storage().nbytes() for s in samples.samples()] == [2048 * 4, 2048 * 4]
    assert samples.nbytes == 2 * 2048 * 4


_KINDS: dict[str, Callable[[int], torch.Tensor]] = {
    "float32": lambda n: torch.arange(n * 8, dtype=torch.float32).reshape(n, 8),
    "bfloat16": lambda n: torch.arange(n * 8, dtype=torch.bfloat16).reshape(n, 8),  # (no numpy view)
    "bool": lambda n: torch.arange(n * 8).reshape(n, 8) % 3 == 0,
    "int8": lambda n: (torch.arange(n * 8) % 100).to(torch.int8).reshape(n, 8),
    "float16": lambda n: (torch.arange(n * 8) % 1000).to(torch.float16).reshape(n, 8),
    "complex64": lambda n: torch.arange(n * 8, dtype=torch.float32).reshape(n, 8) * (1 + 2j),
    "lazily negated": lambda n: (torch.arange(n * 8, dtype=torch.float32).reshape(n, 8) * (1 + 2j)).conj().imag,
    "transposed": lambda n: torch.arange(n * 8, dtype=torch.float64).reshape(8, n).t(),
    "expanded": lambda n: torch.arange(n, dtype=torch.int64).reshape(n, 1).expand(n, 8),
    "empty": lambda n: torch.zeros(0, 8),
}


@pytest.mark.parametrize("rows", [3, 2**17], ids=["small", "large"])  # (large: 1-8 MiB, copied holding the GIL)
@pytest.mark.parametrize("kind", list(_KINDS))
def test_every_dtype_and_layout_is_copied_as_it_was(kind: str, rows: int) -> None:
    value = _KINDS[kind](rows)
    expected = value.resolve_neg().clone()
    host = stage(value, value.shape[0])
    batch = host.values
    assert isinstance(batch, torch.Tensor)
    assert batch.dtype == value.dtype and batch.shape == value.shape and batch.is_contiguous()
    assert host.nbytes == value.numel() * value.element_size()
    assert not value.numel() or batch.data_ptr() != value.data_ptr()
    if not value.is_neg() and value.is_contiguous():
        value.zero_()  # the caller's buffer changes after put
    torch.testing.assert_close(batch, expected, rtol=0, atol=0)


def test_zero_dim_samples_are_copied_as_values() -> None:
    source = [torch.tensor(7), torch.tensor(2.5), torch.tensor(True)]  # (put one value per id)
    host = stage(source, 3)
    for value in source:
        value.zero_()
    assert [s.item() for s in host.samples()] == [7, 2.5, True]
    assert host.nbytes == 8 + 4 + 1


def test_without_copy_cpu_tensors_and_arrays_are_handed_over_as_they_are() -> None:
    value = torch.randn(4, 3, requires_grad=True) * 2
    host = stage(value, 4, copy=False)
    assert isinstance(host.values, torch.Tensor)
    assert not host.values.requires_grad
    assert host.values.data_ptr() == value.data_ptr()
    array = np.ones((2, 3), dtype=np.float32)
    assert stage(array, 2, copy=False).samples()[0].data_ptr() == array.ctypes.data


def test_numpy_arrays_and_lists_are_accepted() -> None:
    host = stage([np.ones(2, dtype=np.float64), torch.zeros(3)], 2)
    assert [tuple(v.shape) for v in host.samples()] == [(2,), (3,)]
    assert host.nbytes == 2 * 8 + 3 * 4


@pytest.mark.parametrize(
    ("values", "count", "message"),
    [
        (torch.ones(3, 2), 2, "3 samples along dim 0 but 2 ids"),
        (torch.tensor(1.0), 1, "0-dim tensor"),
        ([torch.ones(1)], 2, "got 1 predictions for 2 ids"),
        (np.array([object()]), 1, "Python objects"),
        ("text", 1, "must be a torch.Tensor"),
    ],
)
def test_bad_values_are_explained(values: object, count: int, message: str) -> None:
    with pytest.raises(PredictionError, match=message):
        stage(values, count)


@cuda
def test_device_tensors_land_in_pinned_memory_after_the_event() -> None:
    device_values = torch.randn(64, 1024, device="cuda")
    host = stage(device_values, 64)
    assert isinstance(host.values, torch.Tensor)
    assert host.values.is_pinned()
    assert host.wait is not None
    expected = device_values.cpu()
    del device_values  # the allocator must not recycle the source before the copy ran
    torch.cuda.empty_cache()
    samples = host.samples()  # waits on the copy's event
    torch.testing.assert_close(torch.stack(list(samples)), expected)


@cuda
def test_no_prediction_reads_back_as_zeros(tmp_path: object) -> None:
    with Sink(str(tmp_path)) as sink:
        for step in range(20):
            batch = torch.full((32, 256), float(step + 1), device="cuda") @ torch.eye(256, device="cuda")
            sink.put_batch(range(step * 32, (step + 1) * 32), batch)
    for i in range(0, 640, 37):
        stored = np.load(f"{tmp_path}/{i}.npy")
        assert (stored == i // 32 + 1).all(), f"prediction {i} read back wrong (zeros: {(stored == 0).all()})"


@cuda
def test_a_reused_device_buffer_is_read_before_the_next_kernel_overwrites_it(tmp_path: Path) -> None:
    """Kernels queued right after put (the next batch into the same buffer) must not reach what is stored."""
    rows, width = 16, 2**18  # 16 MiB a batch: its device-to-host copy takes far longer than the next fill kernel
    buffer = torch.empty(rows, width, device="cuda")
    with Sink(tmp_path) as sink:
        for step in range(8):
            buffer.fill_(float(step))
            sink.put_batch(range(step * rows, (step + 1) * rows), buffer)
        buffer.fill_(-1.0)
    assert _batches_stored_as_put(tmp_path, 8, rows) == 8 * rows


@cuda
def test_a_device_batch_is_copied_on_the_device_before_put_returns() -> None:
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(8):
        busy = torch.tanh(busy @ busy)  # the stream is busy: the copy and the next kernel are queued together
    device_values = torch.full((16, 2**20), 3.0, device="cuda") + busy[0, 0] * 0  # 64 MiB, after the products
    host = stage(device_values, 16)
    device_values.fill_(-1.0)  # on the producing stream, queued right after put
    values = host.ready()
    assert isinstance(values, torch.Tensor)
    assert int((values != 3.0).sum()) == 0, "a kernel queued after put overwrote the batch before it was copied"


def _batches_stored_as_put(directory: Path, batches: int, rows: int) -> int:
    """How many of the ``batches`` x ``rows`` stored predictions hold their batch's index, as they were put."""
    return sum(
        bool((np.load(directory / f"{step * rows + row}.npy") == step).all())
        for step in range(batches)
        for row in range(rows)
    )


def test_a_reused_output_buffer_stores_what_each_put_held(tmp_path: Path) -> None:
    """A model writing every batch into one preallocated buffer: each put stores that batch, not a later one."""
    buffer = torch.empty(64, 16)
    with Sink(tmp_path) as sink:
        for step in range(50):
            buffer.fill_(float(step))
            sink.put_batch(range(step * 64, (step + 1) * 64), buffer)
    assert _batches_stored_as_put(tmp_path, 50, 64) == 50 * 64


def test_a_reused_numpy_buffer_stores_what_each_put_held(tmp_path: Path) -> None:
    buffer = np.empty((64, 16), dtype=np.float32)
    with Sink(tmp_path) as sink:
        for step in range(50):
            buffer.fill(step)
            sink.put_batch(range(step * 64, (step + 1) * 64), buffer)
    assert _batches_stored_as_put(tmp_path, 50, 64) == 50 * 64


def test_changing_values_in_place_right_after_put_changes_nothing_stored(tmp_path: Path) -> None:
    batch = torch.zeros(32, 8)
    rows = [torch.zeros(8) for _ in range(4)]
    with Sink(tmp_path) as sink:
        sink.put_batch(range(32), batch)
        batch.add_(1)  # in-place post-processing after put
        sink.put_batch(range(32, 36), rows)
        for row in rows:
            row.sub_(1)
        single = torch.zeros(3)
        sink.put(36, single)
        single[0] = 7
    assert all((np.load(tmp_path / f"{i}.npy") == 0).all() for i in range(37))


def test_a_view_counts_only_its_own_bytes_against_the_queue(tmp_path: Path) -> None:
    big = torch.arange(64 * 4096, dtype=torch.float32).reshape(64, 4096)
    with Sink(tmp_path, max_queue_bytes=64 * 10 * 4) as sink:
        sink.put_batch(range(64), big[:, :10])
        sink.flush()
        assert sink.stats.queue_high_water_bytes == 64 * 10 * 4
    np.testing.assert_array_equal(np.load(tmp_path / "63.npy"), big[63, :10].numpy())


def test_copy_false_stores_buffers_that_are_not_reused(tmp_path: Path) -> None:
    """The documented opt-out: no copy at put, for callers that never touch a buffer after putting it."""
    sink = Sink(tmp_path, copy=False)
    assert sink.copy is False
    with sink:
        for step in range(10):
            sink.put_batch(range(step * 64, (step + 1) * 64), torch.full((64, 16), float(step)))
        sink.put_batch(range(640, 644), np.full((4, 16), 10, dtype=np.float32))
    assert _batches_stored_as_put(tmp_path, 10, 64) == 10 * 64
    assert all((np.load(tmp_path / f"{i}.npy") == 10).all() for i in range(640, 644))


class _BufferModel(pl.LightningModule):
    """Writes every batch's output into one preallocated tensor, as ``out=`` and CUDA-graph models do."""

    def __init__(self) -> None:
        super().__init__()
        self.buf = torch.empty(8, 16)

    def predict_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = batch[0].to(torch.float32).unsqueeze(1).expand(-1, 16)
        torch.mul(x, 2, out=self.buf[: len(x)])
        return self.buf[: len(x)]


def test_prediction_sink_stores_each_batch_of_a_model_that_reuses_its_output(tmp_path: Path) -> None:
    loader = DataLoader(TensorDataset(torch.arange(200)), batch_size=8)
    sink = PredictionSink(tmp_path)
    quiet_trainer(sink).predict(_BufferModel(), loader, return_predictions=False)
    wrong = [i for i in range(200) if not (np.load(tmp_path / f"{i}.npy") == 2 * i).all()]
    assert not wrong, f"{len(wrong)} of 200 predictions hold another batch's values: {wrong[:10]}"


class _FreshModel(pl.LightningModule):
    def predict_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return batch[0].to(torch.float32).unsqueeze(1).expand(-1, 16) * 2  # a new tensor every step


def test_prediction_sink_passes_copy_false_to_its_sink(tmp_path: Path) -> None:
    sink = PredictionSink(tmp_path, copy=False)
    quiet_trainer(sink).predict(_FreshModel(), DataLoader(TensorDataset(torch.arange(40)), batch_size=8))
    assert sink.sink is not None and sink.sink.copy is False
    assert all((np.load(tmp_path / f"{i}.npy") == 2 * i).all() for i in range(40))


def test_the_pool_matches_sizes_and_keeps_no_more_than_its_room() -> None:
    pool = BufferPool()
    assert pool.take(4096) is None and pool.reused == 0
    first = np.empty(4096, dtype=np.uint8)
    pool.give_back([first, np.empty(4096, dtype=np.uint8)], room=8192)
    assert pool.nbytes == 8192
    pool.give_back([np.empty(4096, dtype=np.uint8)], room=8192)  # no room left: dropped
    assert pool.nbytes == 8192
    assert pool.take(1024) is None and pool.reused == 0  # another size: none
    assert pool.take(4096) is not None and pool.reused == 1 and pool.nbytes == 4096
    pool.give_back([np.empty(6000, dtype=np.uint8)], room=8192)  # a new size evicts the others to fit
    assert pool.nbytes == 6000
    assert pool.take(4096) is None and pool.reused == 1  # evicted
    pool.give_back([np.empty(9000, dtype=np.uint8)], room=8192)  # larger than the room: never kept
    assert pool.nbytes == 6000
    pool.close()
    assert pool.nbytes == 0
    pool.give_back([np.empty(6000, dtype=np.uint8)], room=8192)  # closed: keeps nothing
    assert pool.nbytes == 0 and pool.take(6000) is None and pool.reused == 1


def test_staging_into_pooled_buffers_copies_every_kind_as_it_was() -> None:
    pool = BufferPool()
    for _ in range(2):  # the second round copies into the buffers the first one gave back
        for kind, make in _KINDS.items():
            value = make(2**13)  # 64-512 KiB
            expected = value.resolve_neg().clone()
            host = stage(value, value.shape[0], pool=pool)
            if not value.is_neg() and value.is_contiguous() and value.numel():
                value.zero_()
            batch = host.values
            assert isinstance(batch, torch.Tensor) and batch.is_contiguous(), kind
            torch.testing.assert_close(batch, expected, rtol=0, atol=0)
            assert host.nbytes == expected.nbytes
            pool.give_back(host.pooled or [], room=2**30)
            batch.zero_()  # given back: a later put overwrites it
    assert pool.reused >= 7  # every kind numpy has a view for
    samples = [torch.full((2**15,), float(i)) for i in range(3)]  # 128 KiB each, one buffer per sample
    host = stage(samples, 3, pool=pool)
    assert host.pooled is not None and len(host.pooled) == 3
    assert [float(s[0]) for s in host.samples()] == [0.0, 1.0, 2.0]
    assert stage(samples, 3, copy=False, pool=pool).pooled is None  # no copy, no pool
    assert stage(torch.ones(4, 8), 4, pool=pool).pooled is None  # small batches are cloned


_SHAPES = [(8, 32), (8, 2048), (6, 8192), (8, 32768), (3, 2048)]  # 1 KiB to 1 MiB a batch


def _put_reused(
    put_batch: Callable[[list[int], object], None], batches: int, settle: Callable[[], None] | None = None
) -> dict[int, np.ndarray]:
    """Put ``batches`` batches of several sizes, each from one reused buffer per size changed right after put, and
    a list of large samples every fifth batch; returns what each id was put with.

    ``settle`` (a flush) is called after every tenth batch: the stored batches' buffers are back in the pool then,
    so that the next round takes them whatever the speed of the writes (without it, recycling depends on timing).
    """
    buffers = [torch.empty(shape) for shape in _SHAPES]
    put: dict[int, np.ndarray] = {}
    next_id = 0
    for step in range(batches):
        buffer = buffers[step % len(buffers)]
        rows = buffer.shape[0]
        buffer.copy_(step * 100 + torch.arange(rows, dtype=torch.float32).unsqueeze(1))
        ids = list(range(next_id, next_id + rows))
        if step % 5 == 4:
            samples = [row.clone() for row in buffer]
            put_batch(ids, samples)
            for sample in samples:
                sample.fill_(-1.0)
        else:
            put_batch(ids, buffer)
        put |= {i: buffer[i - next_id].numpy().copy() for i in ids}
        buffer.fill_(-1.0)  # the model's next step overwrites its output
        next_id += rows
        if settle is not None and step % 10 == 9:
            settle()
    return put


def test_recycled_staging_buffers_never_change_what_is_stored(tmp_path: Path) -> None:
    # A small queue: buffers go round the pool many times, and the queue is often full.
    with Sink(tmp_path, max_queue_bytes=3 * 2**20, concurrency=4) as sink:
        put = _put_reused(sink.put_batch, 150, settle=sink.flush)
        sink.flush()
        pool = sink._run.handoff.pool
        assert pool.reused > 50, "the test must exercise recycling"
        assert pool.nbytes <= 3 * 2**20
    wrong = [i for i, value in put.items() if not np.array_equal(np.load(tmp_path / f"{i}.npy"), value)]
    assert not wrong, f"{len(wrong)} of {len(put)} stored predictions differ from what was put: {wrong[:10]}"
    assert pool.nbytes == 0  # freed at close


def test_recycling_survives_retried_writes_on_an_object_store() -> None:
    plan = _faulty.Plan(fail=ConnectionError("connection reset"), fail_first=12)
    with Sink("faulty://pool/run", storage_options=_faulty.options(plan), max_queue_bytes=3 * 2**20) as sink:
        put = _put_reused(sink.put_batch, 150, settle=sink.flush)
        sink.flush()
        assert sink._run.handoff.pool.reused > 20
    assert plan.failures == 12
    wrong = [i for i, value in put.items() if not np.array_equal(_read_npy(plan, i), value)]
    assert not wrong, f"{len(wrong)} of {len(put)} stored predictions differ from what was put: {wrong[:10]}"
    assert sink.summary is not None and sink.summary["count"] == len(put)


def test_after_failed_writes_what_is_stored_is_what_was_put_and_failed_ids_are_reported() -> None:
    failing = {f"/pool/run/{i}.npy" for i in (301, 302, 517)}
    plan = _faulty.Plan(fail=PermissionError("denied"), fail_when=failing.__contains__)
    sink = Sink("faulty://pool/run", storage_options=_faulty.options(plan), max_queue_bytes=3 * 2**20, retries=1)
    with pytest.raises(WriteError) as info, sink:
        _put_reused(sink.put_batch, 150)
    put = _put_reused(lambda ids, values: None, 150)
    assert info.value.ids and not set(info.value.ids) - {"301", "302", "517"}
    stored = {int(path.rsplit("/", 1)[1].removesuffix(".npy")) for path in plan.files if path.endswith(".npy")}
    assert stored and not {int(i) for i in info.value.ids} & stored
    wrong = [i for i in stored if not np.array_equal(_read_npy(plan, i), put[i])]
    assert not wrong, f"{len(wrong)} of {len(stored)} stored predictions differ from what was put: {wrong[:10]}"
    assert sink.summary is None and not any(path.endswith("_SUCCESS") for path in plan.files)


def _read_npy(plan: _faulty.Plan, identifier: int) -> np.ndarray:
    return np.asarray(np.load(io.BytesIO(_faulty.read(plan, f"/pool/run/{identifier}.npy"))))
