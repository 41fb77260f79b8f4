"""lighter-sink: write predictions from PyTorch and Lightning inference to disk, S3 or GCS asynchronously."""

from lighter_sink._callback import PredictionSink
from lighter_sink._errors import (
    CommitError,
    ConfigurationError,
    DestinationError,
    FormatNotFoundError,
    IdentifierError,
    PredictionError,
    SinkError,
    SinkStateError,
    WriteError,
)
from lighter_sink._resume import RemainingSubset, remaining
from lighter_sink._sink import Sink, SinkState, SinkStats
from lighter_sink._version import __version__
from lighter_sink.formats import Format, available_formats, get_format, register_format

__all__ = [
    "CommitError",
    "ConfigurationError",
    "DestinationError",
    "Format",
    "FormatNotFoundError",
    "IdentifierError",
    "PredictionError",
    "PredictionSink",
    "RemainingSubset",
    "Sink",
    "SinkError",
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
