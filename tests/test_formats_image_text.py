import io
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from lighter_sink import ConfigurationError, PredictionError, Sink, WriteError, get_format
from lighter_sink.formats import EncodedItem, FunctionFormat, PngFormat, TextFormat, available_formats


def _joined(item: EncodedItem) -> bytes:
    return b"".join(bytes(b) for b in item.buffers)


def _read_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image)


def _levels(x: torch.Tensor) -> np.ndarray:
    """The documented rule, computed independently: floor(255 * clamp(v, 0, 1)) in float32, NaN -> 0."""
    array = np.nan_to_num(x.float().numpy(), nan=0.0)
    return np.floor(np.clip(array, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


def test_png_and_txt_are_registered() -> None:
    assert {"png", "txt"} <= set(available_formats())
    assert get_format("png").extension == ".png"
    assert get_format("txt").extension == ".txt"


# ---------------------------------------------------------------- png

_U8 = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(_U8[0], _U8[0].numpy(), id="gray-hw"),
        pytest.param(_U8[:1], _U8[0].numpy(), id="gray-1hw"),
        pytest.param(_U8[0].unsqueeze(-1), _U8[0].numpy(), id="gray-hw1"),
        pytest.param(_U8, _U8.permute(1, 2, 0).numpy(), id="rgb-chw"),
        pytest.param(_U8.permute(1, 2, 0), _U8.permute(1, 2, 0).numpy(), id="rgb-hwc-not-contiguous"),
        pytest.param(torch.cat([_U8, _U8[:1]]), torch.cat([_U8, _U8[:1]]).permute(1, 2, 0).numpy(), id="rgba-chw"),
        pytest.param(_U8[0].t(), _U8[0].t().numpy(), id="gray-transposed"),
    ],
)
def test_png_stores_uint8_images_as_they_are(value: torch.Tensor, expected: np.ndarray) -> None:
    fmt = get_format("png")
    fmt.check(value)
    item = fmt.encode(value)
    pixels = _read_png(_joined(item))
    np.testing.assert_array_equal(pixels, expected)
    assert item.shape == expected.shape
    assert item.dtype == "uint8"


def test_png_scales_floats_in_unit_range_and_clips_the_rest() -> None:
    value = torch.tensor(
        [[0.0, 0.5, 1.0, 1 / 255, 254.5 / 255], [-3.0, 7.0, float("nan"), float("inf"), float("-inf")]]
    )
    before = value.clone()
    pixels = _read_png(_joined(get_format("png").encode(value)))
    np.testing.assert_array_equal(pixels, [[0, 127, 255, 1, 254], [0, 255, 0, 255, 0]])
    np.testing.assert_array_equal(pixels, _levels(value))
    torch.testing.assert_close(value, before, equal_nan=True)  # the prediction itself is left alone


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_png_float_dtypes_follow_one_rule(dtype: torch.dtype) -> None:
    value = torch.rand(3, 6, 4, generator=torch.Generator().manual_seed(2)).to(dtype)
    pixels = _read_png(_joined(get_format("png").encode(value)))
    np.testing.assert_array_equal(pixels, _levels(value).transpose(1, 2, 0))


def test_a_uint8_image_divided_by_255_comes_back_unchanged() -> None:
    image = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    np.testing.assert_array_equal(_read_png(_joined(get_format("png").encode(image / 255))), image.numpy())


def test_png_bool_masks_become_black_and_white() -> None:
    mask = torch.tensor([[True, False], [False, True]])
    np.testing.assert_array_equal(_read_png(_joined(get_format("png").encode(mask))), [[255, 0], [0, 255]])


def test_png_volumes_stack_slices_vertically_like_lighter_image_3d() -> None:
    volume = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(1, 2, 3, 4)  # (C, D, H, W)
    item = get_format("png").encode(volume)
    pixels = _read_png(_joined(item))
    assert pixels.shape == (6, 4)
    np.testing.assert_array_equal(pixels[:3], volume[0, 0].numpy())  # slice 0 on top
    np.testing.assert_array_equal(pixels[3:], volume[0, 1].numpy())
    rgb = torch.rand(3, 2, 5, 4, generator=torch.Generator().manual_seed(3))
    pixels = _read_png(_joined(get_format("png").encode(rgb)))
    np.testing.assert_array_equal(pixels, _levels(rgb.reshape(3, 10, 4)).transpose(1, 2, 0))


def test_png_compress_level_changes_size_not_pixels() -> None:
    value = torch.zeros(64, 64, dtype=torch.uint8)
    stored = PngFormat(compress_level=0).encode(value)
    packed = PngFormat(compress_level=9).encode(value)
    assert packed.nbytes < stored.nbytes
    np.testing.assert_array_equal(_read_png(_joined(stored)), _read_png(_joined(packed)))
    with pytest.raises(ConfigurationError, match="compress_level must be an int from 0 to 9, got 10"):
        PngFormat(compress_level=10)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (torch.zeros(5), r"stores an image \(H, W\).*got shape \(5,\) \(1 dims\)"),
        (torch.zeros(1, 1, 2, 3, 4), r"got shape \(1, 1, 2, 3, 4\) \(5 dims\)"),
        (torch.zeros(5, 6, 7), r"got shape \(5, 6, 7\), where neither.*unsqueeze\(0\)"),
        (torch.zeros(2, 3, 5, 5), r"volumes as \(C, D, H, W\) with C in 1, 3, 4; got shape \(2, 3, 5, 5\)"),
        (torch.zeros(0, 5), r"at least one pixel; got shape \(0, 5\)"),
        (torch.zeros(4, 4, dtype=torch.complex64), r"uint8, bool or floating point.*got torch.complex64"),
        (torch.zeros(4, 4, dtype=torch.int64), r"got torch.int64: cast label maps with .to\(torch.uint8\)"),
        (torch.eye(3).to_sparse(), "dense"),
    ],
)
def test_png_refuses_what_it_cannot_store(value: torch.Tensor, message: str) -> None:
    with pytest.raises(PredictionError, match=message):
        get_format("png").check(value)


def test_png_names_the_extra_when_pillow_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import fail, as if Pillow were not installed
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(ImportError, match=r"pip install 'lighter-sink\[image\]'"):
        get_format("png").check(torch.zeros(2, 2))


def test_a_bad_image_fails_on_the_callers_thread_and_nothing_is_committed(tmp_path: Path) -> None:
    with pytest.raises(PredictionError, match="got shape"), Sink(tmp_path, format="png") as sink:
        sink.put_batch([0, 1], torch.zeros(2, 5))  # two 1-d samples
    assert not (tmp_path / "_SUCCESS").exists()


def test_png_through_a_sink(tmp_path: Path) -> None:
    batch = torch.rand(4, 3, 8, 6, generator=torch.Generator().manual_seed(4))
    with Sink(tmp_path, format="png") as sink:
        sink.put_batch(range(4), batch)
    for i in range(4):
        np.testing.assert_array_equal(
            _read_png((tmp_path / f"{i}.png").read_bytes()), _levels(batch[i]).transpose(1, 2, 0)
        )
    record = json.loads((tmp_path / "_manifest.jsonl").read_text().splitlines()[0])
    assert record["path"] == "0.png"
    assert record["shape"] == [8, 6, 3]
    assert record["dtype"] == "uint8"


# ---------------------------------------------------------------- txt


@pytest.mark.parametrize(
    "value", [torch.tensor(0.5), torch.tensor([1, 2, 3]), torch.tensor([[0.1, 0.9]]), torch.tensor([True])]
)
def test_txt_holds_str_of_the_value_like_lighter(value: torch.Tensor) -> None:
    item = get_format("txt").encode(value)
    assert _joined(item).decode("utf-8") == str(value)
    assert item.shape == tuple(value.shape)


def test_txt_through_a_sink(tmp_path: Path) -> None:
    with Sink(tmp_path, format="txt") as sink:
        sink.put_batch(["a", "b"], torch.tensor([[0.25, 1.0], [3.0, -1.0]]))
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "tensor([0.2500, 1.0000])"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "tensor([ 3., -1.])"


def test_txt_encoding_is_checked() -> None:
    assert TextFormat(encoding="utf-16").encode(torch.tensor(1)).buffers[0] == "tensor(1)".encode("utf-16")
    with pytest.raises(ConfigurationError, match="codec"):
        TextFormat(encoding="no-such-codec")


# ---------------------------------------------------------------- writer functions


def write_csv_row(path: Path, value: torch.Tensor) -> None:
    """A Lighter-style writer: it adds its own suffix."""
    path.with_suffix(".csv").write_text(",".join(f"{v:g}" for v in value.tolist()) + "\n")


def write_exactly(path: Path, value: torch.Tensor) -> None:
    path.write_bytes(value.numpy().tobytes())


def write_pt(path: Path, value: torch.Tensor, *, suffix: str = ".pt") -> None:
    torch.save(value, path.with_suffix(suffix))


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """The temporary directory FunctionFormat writes in; every test checks that nothing is left there."""
    directory = tmp_path / "scratch"
    directory.mkdir()
    yield directory
    assert list(directory.iterdir()) == []


def test_function_format_to_a_local_directory(tmp_path: Path, scratch: Path) -> None:
    out = tmp_path / "out"
    with Sink(out, format=FunctionFormat(write_csv_row, extension=".csv", temp_dir=scratch)) as sink:
        sink.put_batch([0, 1, "nested/x"], torch.tensor([[1.0, 2.0], [3.0, 4.5], [5.0, 6.0]]))
    assert (out / "0.csv").read_text() == "1,2\n"
    assert (out / "1.csv").read_text() == "3,4.5\n"
    assert (out / "nested" / "x.csv").read_text() == "5,6\n"
    assert json.loads((out / "_SUCCESS").read_text())["format"] == "write_csv_row"


def test_function_format_to_a_memory_url(scratch: Path) -> None:
    root = f"/function-format-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    fmt = FunctionFormat(write_pt, temp_dir=scratch)  # the suffix parameter's default gives the extension
    assert fmt.extension == ".pt"
    batch = torch.arange(200.0).reshape(4, 50)
    try:
        with Sink(f"memory://{root}", format=fmt) as sink:
            sink.put_batch(range(4), batch)
        for i in range(4):
            data = fs.cat(f"{root}/{i}.pt")
            torch.testing.assert_close(torch.load(io.BytesIO(data)), batch[i])
            assert len(data) < 50 * 4 + 2000  # the sample, not the whole batch
        assert fs.exists(f"{root}/_SUCCESS")
    finally:
        fs.rm(root, recursive=True)


def test_function_format_accepts_a_function_that_keeps_the_path(scratch: Path) -> None:
    item = FunctionFormat(write_exactly, extension=".raw", temp_dir=scratch).encode(
        torch.tensor([1, 2], dtype=torch.int8)
    )
    assert _joined(item) == b"\x01\x02"
    assert item.dtype == "int8"


def test_function_format_explains_a_wrong_suffix(scratch: Path) -> None:
    fmt = FunctionFormat(write_csv_row, extension=".txt", temp_dir=scratch)
    with pytest.raises(PredictionError, match=r"expected to write 'prediction.txt'.*it wrote \['prediction.csv'\]"):
        fmt.encode(torch.ones(2))


def test_function_errors_reach_the_caller_and_temp_files_go(tmp_path: Path, scratch: Path) -> None:
    def explode(path: Path, value: torch.Tensor) -> None:
        path.with_suffix(".bin").write_bytes(b"partial")
        raise RuntimeError("disk writer broke")

    with (
        pytest.raises(WriteError, match="disk writer broke"),
        Sink(tmp_path / "out", format=FunctionFormat(explode, ".bin", temp_dir=scratch)) as sink,
    ):
        sink.put(0, torch.ones(1))
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_function_format_arguments_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="callable"):
        FunctionFormat("tensor")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"cannot tell which suffix 'write_csv_row' writes; pass extension="):
        FunctionFormat(write_csv_row)
    with pytest.raises(ConfigurationError, match="start with a dot"):
        FunctionFormat(write_csv_row, extension="csv")
    assert repr(FunctionFormat(write_csv_row, ".csv")) == "<FunctionFormat 'write_csv_row' extension='.csv'>"
