"""Formats by name: a registry resolved when a sink is built, so a typo fails before any compute."""

from __future__ import annotations

from lighter_sink._errors import ConfigurationError, FormatNotFoundError
from lighter_sink.formats._base import (
    Buffer,
    CheckContext,
    EncodedItem,
    Format,
    FormatWriter,
    RecordCheck,
    RecordStream,
    WriterContext,
)
from lighter_sink.formats._function import FunctionFormat, WriterFunction
from lighter_sink.formats._image import PngFormat
from lighter_sink.formats._npy import NpyFormat
from lighter_sink.formats._parquet import ParquetFormat
from lighter_sink.formats._shards import ShardFormat
from lighter_sink.formats._table import CsvFormat, JsonlFormat, TableFormat
from lighter_sink.formats._table_text import CsvTextFormat
from lighter_sink.formats._tar import TarFormat
from lighter_sink.formats._text import TextFormat
from lighter_sink.formats._torch import TorchFormat
from lighter_sink.formats._zarr import ZarrFormat

__all__ = [
    "Buffer",
    "CheckContext",
    "CsvFormat",
    "CsvTextFormat",
    "EncodedItem",
    "Format",
    "FormatWriter",
    "FunctionFormat",
    "JsonlFormat",
    "NpyFormat",
    "ParquetFormat",
    "PngFormat",
    "RecordCheck",
    "RecordStream",
    "ShardFormat",
    "TableFormat",
    "TarFormat",
    "TextFormat",
    "TorchFormat",
    "WriterContext",
    "WriterFunction",
    "ZarrFormat",
    "available_formats",
    "get_format",
    "register_format",
]

_REGISTRY: dict[str, Format] = {}


def register_format(name: str, fmt: Format, *, replace: bool = False) -> None:
    """Make ``fmt`` available as ``format=name``.

    Raises:
        ConfigurationError: ``fmt`` is not a :class:`Format`, or ``name`` is taken and ``replace`` is false.
    """
    if not isinstance(fmt, Format):
        raise ConfigurationError(f"register_format expects a Format instance, got {type(fmt).__name__}")
    if not name or not name.isidentifier():
        raise ConfigurationError(f"format names are identifiers such as 'npy', got {name!r}")
    if name in _REGISTRY and not replace:
        raise ConfigurationError(f"format {name!r} is already registered; pass replace=True to replace it")
    _REGISTRY[name] = fmt


def available_formats() -> list[str]:
    """Names of every registered format, sorted."""
    return sorted(_REGISTRY)


def get_format(format: str | Format) -> Format:
    """Resolve a format name (or pass a :class:`Format` through).

    Raises:
        FormatNotFoundError: the name is not registered; the message lists the known names.
        ConfigurationError: ``format`` is neither a name nor a :class:`Format`.
    """
    if isinstance(format, Format):
        return format
    if not isinstance(format, str):
        raise ConfigurationError(f"format must be a registered name or a Format instance, got {type(format).__name__}")
    try:
        return _REGISTRY[format]
    except KeyError:
        known = ", ".join(available_formats())
        raise FormatNotFoundError(f"format {format!r} is not registered; known: {known}") from None


register_format("npy", NpyFormat())
register_format("pt", TorchFormat())
register_format("png", PngFormat())
register_format("txt", TextFormat())
register_format("zarr", ZarrFormat())
register_format("csv", CsvFormat())
register_format("jsonl", JsonlFormat())
register_format("csv_text", CsvTextFormat())
register_format("tar", TarFormat())
register_format("parquet", ParquetFormat())
