import numpy as np
import pytest
import torch

from lighter_sink import PredictionError, Sink
from lighter_sink._staging import stage

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cpu_tensors_are_detached_without_a_copy() -> None:
    value = torch.randn(4, 3, requires_grad=True) * 2
    host = stage(value, 4)
    assert isinstance(host.values, torch.Tensor)
    assert not host.values.requires_grad
    assert host.values.data_ptr() == value.data_ptr()
    assert host.nbytes == 4 * 3 * 4
    assert host.wait is None


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
