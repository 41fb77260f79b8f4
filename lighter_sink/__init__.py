"""lighter-sink: write predictions from PyTorch and Lightning inference to disk, S3 or GCS asynchronously."""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from lighter_sink._config import SinkConfig, SinkOptions
from lighter_sink._errors import (
    CommitError,
    ConfigurationError,
    DestinationError,
    FormatNotFoundError,
    IdentifierError,
    MissingDependencyError,
    PredictionError,
    SinkError,
    SinkStateError,
    WriteError,
)
from lighter_sink._resume import RemainingSubset, remaining
from lighter_sink._run import SinkState
from lighter_sink._sink import Sink
from lighter_sink._stats import SinkProgress, SinkStats
from lighter_sink._version import __version__
from lighter_sink.formats import Format, available_formats, get_format, register_format

if _TYPE_CHECKING:
    from lighter_sink._callback import PredictionSink


def __getattr__(name: str) -> object:
    # PredictionSink is imported on first use: Lightning takes seconds to import, and plain loops (Sink) and the
    # command line have no need of it.
    if name == "PredictionSink":
        from lighter_sink._callback import PredictionSink

        return PredictionSink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "PredictionSink"})


__all__ = [
    "CommitError",
    "ConfigurationError",
    "DestinationError",
    "Format",
    "FormatNotFoundError",
    "IdentifierError",
    "MissingDependencyError",
    "PredictionError",
    "PredictionSink",
    "RemainingSubset",
    "Sink",
    "SinkConfig",
    "SinkError",
    "SinkOptions",
    "SinkProgress",
    "SinkState",
    "SinkStateError",
    "SinkStats",
    "WriteError",
    "__version__",
    "available_formats",
    "get_format",
    "register_format",
    "remaining",
]
