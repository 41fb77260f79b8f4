"""Text files: ``str(value)`` per prediction, what Lighter's ``text`` writer wrote."""

from __future__ import annotations

import codecs

import torch

from lighter_sink._errors import ConfigurationError
from lighter_sink.formats._base import EncodedItem, Format

__all__ = ["TextFormat"]


class TextFormat(Format):
    """One ``.txt`` object per prediction holding ``str(value)``, without a trailing newline.

    This is Lighter's ``text`` writer, byte for byte: a tensor is written as torch prints it, for example
    ``tensor([0.1000, 0.9000])``. That is meant for people to read, not for data: torch's print options apply
    (4 decimals; tensors over 1000 elements are summarised with ``...``). Store values with ``npy`` or ``pt``.

    Args:
        encoding: the text encoding of the files.

    Raises:
        ConfigurationError: ``encoding`` is not a codec Python knows.
    """

    name = "txt"
    extension = ".txt"

    def __init__(self, *, encoding: str = "utf-8") -> None:
        try:
            codecs.lookup(encoding)
        except (LookupError, TypeError):
            raise ConfigurationError(f"encoding must name a Python codec such as 'utf-8', got {encoding!r}") from None
        self.encoding = encoding

    def encode(self, value: torch.Tensor) -> EncodedItem:
        data = str(value).encode(self.encoding)
        return EncodedItem((data,), tuple(value.shape), str(value.dtype).removeprefix("torch."))
