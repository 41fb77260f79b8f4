"""PNG images, readable with any image library; Pillow (``pip install 'lighter-sink[image]'``) encodes them.

Accepted shapes, one prediction each:

* ``(H, W)``: grayscale.
* ``(C, H, W)`` channel-first or ``(H, W, C)`` channel-last, ``C`` being 1 (grayscale), 3 (RGB) or 4 (RGBA).
  Channel-first wins when both readings fit (a ``(3, 5, 3)`` tensor is a 5x3 RGB image), as Lighter's
  ``image_2d`` writer read ``(C, H, W)``.
* ``(C, D, H, W)`` volumes, ``C`` being 1, 3 or 4: the ``D`` slices are stacked vertically into one
  ``(D * H, W)`` image, slice 0 on top, as Lighter's ``image_3d`` writer did. A ``(D, H, W)`` volume needs its
  channel dimension first: ``volume.unsqueeze(0)``.

Pixel values:

* ``uint8`` is stored as it is.
* ``bool`` becomes 0 and 255.
* Floating point values are intensities in ``[0, 1]``: ``v`` becomes ``floor(255 * clamp(v, 0, 1))`` computed in
  float32, Lighter's rule, so images match Lighter's pixel for pixel (a uint8 image divided by 255 comes back
  unchanged). NaN becomes 0, ``+inf`` 255. Other ranges are the caller's to scale: a per-image min-max rescale
  would make intensities of different predictions incomparable.
* Other integer dtypes are refused rather than silently wrapped; cast label maps with ``.to(torch.uint8)``.
"""

from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt
import torch

from lighter_sink._errors import ConfigurationError, MissingDependencyError, PredictionError
from lighter_sink.formats._base import EncodedItem, Format

__all__ = ["PngFormat", "require_pillow"]

_CHANNELS = (1, 3, 4)
_EXPECTED = "an image (H, W), (C, H, W) or (H, W, C) with C in 1, 3, 4, or a volume (C, D, H, W) with C in 1, 3, 4"


def require_pillow() -> None:
    """Raise :class:`MissingDependencyError` (an :class:`ImportError`) naming the extra to install when Pillow is
    missing."""
    try:
        import PIL.Image  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            "format 'png' needs Pillow, which is not installed: pip install 'lighter-sink[image]'",
            name="PIL",
        ) from exc


def _channels_first(shape: tuple[int, ...]) -> bool:
    """Whether ``shape`` (already checked) puts its channels first; False for 2-d grayscale images."""
    if len(shape) == 4:
        return True
    return len(shape) == 3 and shape[0] in _CHANNELS


def _check_shape(shape: tuple[int, ...]) -> None:
    got = f"got shape {shape}"
    if len(shape) not in (2, 3, 4):
        raise PredictionError(f"format 'png' stores {_EXPECTED}; {got} ({len(shape)} dims)")
    if len(shape) == 3 and shape[0] not in _CHANNELS and shape[-1] not in _CHANNELS:
        raise PredictionError(
            f"format 'png' stores {_EXPECTED}; {got}, where neither the first nor the last dim is 1, 3 or 4 "
            "channels (a (D, H, W) volume needs a channel dim first: value.unsqueeze(0))"
        )
    if len(shape) == 4 and shape[0] not in _CHANNELS:
        raise PredictionError(f"format 'png' stores volumes as (C, D, H, W) with C in 1, 3, 4; {got}")
    if 0 in shape:
        raise PredictionError(f"format 'png' needs at least one pixel; {got}")


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype in (torch.uint8, torch.bool) or dtype.is_floating_point:
        return
    hint = "cast label maps with .to(torch.uint8)" if not dtype.is_complex else "take .abs() or .real first"
    raise PredictionError(
        f"format 'png' stores uint8, bool or floating point tensors (floats in [0, 1] become 0..255); "
        f"got {dtype}: {hint}"
    )


def _to_uint8(value: torch.Tensor) -> torch.Tensor:
    if value.dtype == torch.uint8:
        return value
    if value.dtype == torch.bool:
        return value.to(torch.uint8) * 255
    # .to(uint8) truncates: the floor of a non-negative value, as Lighter's writers computed it
    return value.float().nan_to_num(nan=0.0).clamp_(0.0, 1.0).mul_(255.0).to(torch.uint8)


def _pixels(value: torch.Tensor) -> npt.NDArray[np.uint8]:
    """The ``(H, W)`` or ``(H, W, C)`` uint8 array that ``value`` is stored as.

    Raises:
        PredictionError: ``value`` has a shape or dtype that :class:`PngFormat` does not store.
    """
    shape = tuple(value.shape)
    _check_shape(shape)
    _check_dtype(value.dtype)
    if len(shape) == 4:
        channels, depth, height, width = shape
        value = value.reshape(channels, depth * height, width)  # slices stacked vertically, slice 0 on top
    if _channels_first(shape):
        value = value.permute(1, 2, 0)
    if value.ndim == 3 and value.shape[-1] == 1:
        value = value[..., 0]
    return np.ascontiguousarray(_to_uint8(value).numpy())


class PngFormat(Format):
    """One ``.png`` object per prediction; the rules for shapes and values are in this module's docstring.

    The manifest records the stored image's shape, ``(H, W)`` or ``(H, W, C)``, and dtype ``uint8``: what a
    reader gets back from ``numpy.asarray(PIL.Image.open(path))``.

    Args:
        compress_level: zlib level from 0 (fastest, largest) to 9 (slowest, smallest); 6 is Pillow's default.

    Raises:
        ConfigurationError: ``compress_level`` is not an int from 0 to 9.
    """

    name = "png"
    extension = ".png"

    def __init__(self, *, compress_level: int = 6) -> None:
        if isinstance(compress_level, bool) or not isinstance(compress_level, int) or not 0 <= compress_level <= 9:
            raise ConfigurationError(f"compress_level must be an int from 0 to 9, got {compress_level!r}")
        self.compress_level = compress_level

    def require(self) -> None:
        require_pillow()

    def check(self, value: torch.Tensor) -> None:
        """Raise early, on the caller's thread: Pillow missing, or a shape or dtype that cannot be an image.

        Raises:
            MissingDependencyError: Pillow is not installed (an :class:`ImportError`).
            PredictionError: the shape or dtype cannot be stored (the message says what is accepted).
        """
        super().check(value)
        if value.is_quantized:
            raise PredictionError(f"format 'png' cannot store quantized tensors, got {value.dtype}")
        _check_shape(tuple(value.shape))
        _check_dtype(value.dtype)
        require_pillow()

    def encode(self, value: torch.Tensor) -> EncodedItem:
        require_pillow()
        from PIL import Image

        pixels = _pixels(value)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="PNG", compress_level=self.compress_level)
        return EncodedItem((out.getbuffer(),), pixels.shape, "uint8")
