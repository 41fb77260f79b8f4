"""CRC-32 (zlib's polynomial, as S3's ``x-amz-checksum-crc32`` and ``zlib.crc32``) of every stored object.

ISA-L's implementation (the ``isal`` package, a dependency where it ships wheels) folds with carry-less
multiplication: about 20x zlib's speed here, which turns the checksum of a 1 MiB prediction from half a
millisecond of CPU into a few tens of microseconds. Elsewhere zlib's gives the same values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["crc32"]

crc32: Callable[[Any, int], int]
try:
    from isal.isal_zlib import crc32
except ImportError:  # a platform without isal wheels
    from zlib import crc32
