"""What a url names: its protocol, whether it is a local directory, and whether that directory can be used.

Kept apart from the backends, so that the callback and the sink can check a destination before any store
(or any filesystem library) is opened.
"""

from __future__ import annotations

import os

from fsspec.core import split_protocol

from lighter_sink._errors import DestinationError

__all__ = ["check_local_destination", "is_local_url", "local_path", "protocol_of"]


def check_local_destination(path: str) -> None:
    """Refuse a local destination that is a regular file or cannot be created and written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise DestinationError(f"{path} is a regular file; expected a directory (or a new path)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise DestinationError(f"cannot create the directory {path}: {exc.strerror}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise DestinationError(f"the directory {path} is not writable")


def protocol_of(url: str) -> str:
    protocol = split_protocol(url)[0]
    return protocol or "file"


def is_local_url(url: str) -> bool:
    return protocol_of(url) in ("file", "local")


def local_path(url: str) -> str:
    """The filesystem path of a local url (``file://`` prefix removed)."""
    return os.path.abspath(split_protocol(url)[1] if "://" in url else url)
