"""A Lighter project as a user writes one: Lighter's CLI imports this folder as ``project`` (``__lighter__.py``).

PyPI's torchvision is built against CUDA torch and fails to import beside the CPU torch of ``.venv-lighter``
(see the Makefile), so that venv holds none. Lighter's ``FileWriter`` module imports torchvision and calls one
function of it, ``torchvision.io.write_png``, for its ``image_2d``/``image_3d`` writers; without a torchvision,
this stand-in encodes the same ``(C, H, W)`` uint8 tensor with Pillow. Lighter's own code computes the pixels; the
comparison is of pixels, not of PNG bytes (two encoders).
"""

import importlib.util
import sys
import types

import numpy as np
import torch

if importlib.util.find_spec("torchvision") is None:
    from PIL import Image

    def write_png(input: torch.Tensor, filename: str, compression_level: int = 6) -> None:
        if input.dtype != torch.uint8 or input.ndim != 3 or input.shape[0] not in (1, 3):
            raise RuntimeError(
                f"write_png takes a uint8 (C, H, W) tensor with C 1 or 3, got {input.dtype} {input.shape}"
            )
        pixels = input.permute(1, 2, 0).numpy()
        pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
        Image.fromarray(np.ascontiguousarray(pixels)).save(filename, format="PNG", compress_level=compression_level)

    torchvision = types.ModuleType("torchvision")
    torchvision.io = types.ModuleType("torchvision.io")  # type: ignore[attr-defined]
    torchvision.io.write_png = write_png  # type: ignore[attr-defined]
    sys.modules["torchvision"] = torchvision
    sys.modules["torchvision.io"] = torchvision.io  # type: ignore[attr-defined]
