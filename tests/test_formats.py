import io

import numpy as np
import pytest
import torch

from lighter_sink import (
    ConfigurationError,
    Format,
    FormatNotFoundError,
    PredictionError,
    Sink,
    get_format,
    register_format,
)
from lighter_sink.formats import EncodedItem, available_formats
from tests.conftest import S3Server


def _joined(item: EncodedItem) -> bytes:
    return b"".join(bytes(b) for b in item.buffers)


def test_unknown_format_lists_the_known_names() -> None:
    with pytest.raises(FormatNotFoundError) as info:
        get_format("nope")
    message = str(info.value)
    assert "'nope' is not registered" in message
    for name in ("npy", "pt"):
        assert name in message
    assert isinstance(info.value, ValueError)


def test_register_refuses_to_replace_silently() -> None:
    with pytest.raises(ConfigurationError, match="already registered"):
        register_format("npy", get_format("pt"))
    with pytest.raises(ConfigurationError, match="Format instance"):
        register_format("thing", object())  # type: ignore[arg-type]


def test_register_a_custom_format() -> None:
    class Raw(Format):
        name = "raw_test"
        extension = ".bin"

        def encode(self, value: torch.Tensor) -> EncodedItem:
            return EncodedItem((value.numpy().tobytes(),), tuple(value.shape), str(value.dtype))

    register_format("raw_test", Raw())
    assert "raw_test" in available_formats()
    assert get_format("raw_test").extension == ".bin"
    register_format("raw_test", Raw(), replace=True)


@pytest.mark.parametrize(
    "value",
    [
        torch.randn(3, 4),
        torch.tensor(2.5),
        torch.arange(6, dtype=torch.int64).reshape(2, 3).t(),  # not contiguous
        torch.zeros(0, 3),
        torch.tensor([True, False]),
        torch.randn(5, 5)[2],  # a view into a larger storage
        torch.randn(2, 2, dtype=torch.complex64),
    ],
)
def test_npy_round_trips_through_numpy(value: torch.Tensor) -> None:
    fmt = get_format("npy")
    fmt.check(value)
    item = fmt.encode(value)
    loaded = np.load(io.BytesIO(_joined(item)))
    np.testing.assert_array_equal(loaded, value.numpy())
    assert loaded.dtype == value.numpy().dtype
    assert item.shape == tuple(value.shape)
    assert item.nbytes == len(_joined(item))


def test_npy_batch_shares_headers_without_mixing_shapes() -> None:
    values = [torch.ones(2), torch.ones(3), torch.ones(2, dtype=torch.float64)]
    items = get_format("npy").encode_batch(values)
    for value, item in zip(values, items, strict=True):
        np.testing.assert_array_equal(np.load(io.BytesIO(_joined(item))), value.numpy())


def test_npy_refuses_bfloat16_with_a_way_out() -> None:
    with pytest.raises(PredictionError, match=r"bfloat16.*format='pt'"):
        get_format("npy").check(torch.ones(2, dtype=torch.bfloat16))


def test_sparse_tensors_are_refused() -> None:
    with pytest.raises(PredictionError, match="dense"):
        get_format("pt").check(torch.eye(3).to_sparse())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_pt_round_trips_and_stores_only_the_sample(dtype: torch.dtype) -> None:
    batch = torch.arange(4000).reshape(100, 40).to(dtype)
    item = get_format("pt").encode(batch[7])
    loaded = torch.load(io.BytesIO(_joined(item)))
    torch.testing.assert_close(loaded, batch[7])
    # a row of the batch must not drag the other 99 rows into its file
    assert item.nbytes < 40 * batch.element_size() + 2000


def _read_back(fmt: str, body: bytes) -> np.ndarray:
    if fmt == "npy":
        return np.load(io.BytesIO(body))
    if fmt == "pt":
        return torch.load(io.BytesIO(body)).numpy()
    if fmt == "png":
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(body)))
    raise AssertionError(fmt)


@pytest.mark.parametrize("backend", ["fsspec", "obstore"])
@pytest.mark.parametrize("fmt", ["npy", "pt", "txt", "png"])
def test_every_per_item_format_stores_on_s3(s3_server: S3Server, s3_bucket: str, fmt: str, backend: str) -> None:
    """A first S3 run of each per-item format: every prediction stored, and read back as it was put."""
    values = torch.arange(24).reshape(3, 2, 4).to(torch.uint8 if fmt == "png" else torch.float32)
    url = f"s3://{s3_bucket}/{fmt}-{backend}"
    with Sink(url, format=fmt, storage_options=s3_server.storage_options, backend=backend) as sink:
        sink.put_batch(range(3), values)
    client = s3_server.client()
    prefix = f"{fmt}-{backend}/"
    listed = {o["Key"][len(prefix) :] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix)["Contents"]}
    assert {f"{i}.{fmt}" for i in range(3)} | {"_SUCCESS"} <= listed
    for i in range(3):
        body = client.get_object(Bucket=s3_bucket, Key=f"{prefix}{i}.{fmt}")["Body"].read()
        if fmt == "txt":  # (the value's text, as print shows it)
            assert body.decode() == str(values[i])
        else:
            assert np.array_equal(_read_back(fmt, body), values[i].numpy())
