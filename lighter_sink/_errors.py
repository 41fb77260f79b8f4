"""Exceptions raised by lighter-sink.

Every exception derives from :class:`SinkError` and from the built-in that matches its meaning, so callers can
catch precisely (``except ValueError`` for bad input, ``except OSError`` for storage failures)::

    SinkError
    ├── ConfigurationError (ValueError)       a bad argument, caught at construction
    │   ├── FormatNotFoundError (KeyError)    an unknown format name
    │   └── MissingDependencyError            a format needs an optional package that is not installed
    │       (ImportError)
    ├── PredictionError (ValueError)          a prediction that cannot be stored (type, dtype, shape, lengths)
    ├── IdentifierError (ValueError)          an identifier that cannot become an object key, or a duplicate
    ├── DestinationError (OSError)            the url cannot be used (a regular file, not empty in mode="error", ...)
    ├── WriteError (OSError)                  a background write failed after its retries; names url and ids
    ├── CommitError (OSError)                 the manifest or the _SUCCESS marker could not be written,
    │                                         or another rank failed so nobody committed
    └── SinkStateError (RuntimeError)         the sink was used in the wrong state (put after close, ...)

A background error is kept, raised on the next ``put`` and again at flush and commit, chained with ``from`` to
the original storage exception.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CommitError",
    "ConfigurationError",
    "DestinationError",
    "FormatNotFoundError",
    "IdentifierError",
    "MissingDependencyError",
    "PredictionError",
    "SinkError",
    "SinkStateError",
    "WriteError",
]


class SinkError(Exception):
    """Base class of every lighter-sink exception."""


class ConfigurationError(SinkError, ValueError):
    """An argument of the sink or the callback is invalid."""


class FormatNotFoundError(ConfigurationError, KeyError):
    """A format name that is not registered."""

    def __str__(self) -> str:
        # KeyError quotes its argument; this message is a sentence.
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(ConfigurationError, ImportError):
    """A format or backend needs an optional package that is not installed; the message names the extra to install.

    Both a :class:`ConfigurationError` (the choice of format cannot work here) and an :class:`ImportError`
    (what Python raises for a missing package), so code catching either keeps working.

    Attributes:
        name: the missing package's import name (``"zarr"``, ``"PIL"``), as :class:`ImportError` has it.
    """

    def __init__(self, message: str, *, name: str | None = None) -> None:
        # ImportError's own initialiser: the first in the order of bases (ValueError's) takes no ``name``
        ImportError.__init__(self, message, name=name)


class PredictionError(SinkError, ValueError):
    """A prediction has a type, dtype or shape that the format cannot store."""


class IdentifierError(SinkError, ValueError):
    """An identifier cannot be used as an object key, or it was used twice in one run."""


class DestinationError(SinkError, OSError):
    """The destination url cannot receive predictions."""


def _describe_ids(ids: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    more = len(ids) - limit
    return f"{shown} and {more} more" if more > 0 else shown


class WriteError(SinkError, OSError):
    """Writing predictions failed after every allowed attempt.

    Attributes:
        url: the sink's destination.
        ids: identifiers of the predictions that were not stored (those known when the error was raised).
        failures: how many write operations failed in total.
    """

    def __init__(self, url: str, ids: Sequence[str], reason: str, failures: int = 1) -> None:
        self.url = url
        self.ids = list(ids)
        self.failures = failures
        self.reason = reason
        super().__init__(self._message())

    def _message(self) -> str:
        what = f"ids {_describe_ids(self.ids)}" if self.ids else "no identified prediction"
        extra = f" ({self.failures} failed writes in total)" if self.failures > 1 else ""
        return f"writing to {self.url} failed for {what}: {self.reason}{extra}"

    def __str__(self) -> str:
        return self._message()


class CommitError(SinkError, OSError):
    """The run could not be committed: no ``_SUCCESS`` marker was written."""


class SinkStateError(SinkError, RuntimeError):
    """The sink was used in a state that does not allow the call."""
