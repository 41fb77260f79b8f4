"""Where an output's objects live: the control keys of one output and the run's name.

Several outputs may share a directory (a table beside one-file-per-prediction objects): each has its own control
objects, under ``_{name}/`` for every output but the one that fills the url. Layout of one output's control
objects (``base`` is ``""`` or ``_{name}/``)::

    {base}_lease.json                                         the run that owns the output now
    {base}_parts/{generation}/{run}/rank-00000-000001.jsonl   records, written as the run goes
    {base}_table_parts/                                       a format's intermediate objects (a table's runs)
    {base}_manifest.jsonl                                     every record, merged at commit
    {base}_SUCCESS                                            written last
"""

from __future__ import annotations

import time
import uuid
import zlib
from dataclasses import dataclass

__all__ = ["ControlKeys", "new_token"]


def new_token() -> str:
    """A run's name: sortable by start time, unique across hosts."""
    return f"{time.time_ns():x}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True, slots=True)
class ControlKeys:
    """The keys of one output's control objects; ``name`` is ``""`` for the output that fills the url."""

    name: str = ""

    @property
    def base(self) -> str:
        return f"_{self.name}/" if self.name else ""

    @property
    def manifest(self) -> str:
        return f"{self.base}_manifest.jsonl"

    @property
    def success(self) -> str:
        return f"{self.base}_SUCCESS"

    @property
    def lease(self) -> str:
        return f"{self.base}_lease.json"

    @property
    def parts(self) -> str:
        return f"{self.base}_parts"

    def generation_parts(self, generation: str) -> str:
        return f"{self.parts}/{generation}"

    def part(self, generation: str, run: str, rank: int, sequence: int) -> str:
        return f"{self.parts}/{generation}/{run}/rank-{rank:05d}-{sequence:06d}.jsonl"

    @property
    def temp_prefix(self) -> str:
        """How this output's temporary files begin: a sweep of one output never touches another's in flight."""
        return f".lsink-{zlib.crc32(self.name.encode()):08x}." if self.name else ".lsink."

    @property
    def scratch(self) -> str:
        """Where a format keeps this output's intermediate objects (a table's sorted runs of rows)."""
        return f"{self.base}_table_parts"
