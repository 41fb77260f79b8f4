"""Where an output's objects live: the control keys of one output, what it is, and the run's name.

Several outputs may share a directory (a table beside one-file-per-prediction objects): each has its own control
objects, under ``_{name}/`` for every output but the one that fills the url. Layout of one output's control
objects (``base`` is ``""`` or ``_{name}/``)::

    {base}_lease.json                                         the run that owns the output now
    {base}_output.json                                        how it is written, for readers (until committed)
    {base}_parts/{generation}/{run}/rank-00000-000001.jsonl   records, written as the run goes
    {base}_table_parts/                                       a format's intermediate objects (a table's runs)
    {base}_manifest.jsonl                                     every record, merged at commit
    {base}_SUCCESS                                            written last
"""

from __future__ import annotations

import json
import time
import uuid
import zlib
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["CONTROL_BEGINS", "ControlKeys", "OutputInfo", "new_token"]


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
    def description(self) -> str:
        """The :class:`OutputInfo` of a run that has not committed (``_SUCCESS`` says the same once it has)."""
        return f"{self.base}_output.json"

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

    @classmethod
    def owning(cls, key: str) -> ControlKeys | None:
        """The output whose control object ``key`` (relative to the url) is; None for any other object."""
        head, _, rest = key.partition("/")
        if head in _TOP_LEVEL:
            return cls()
        if len(head) > 1 and head[0] == "_" and rest.partition("/")[0] in _TOP_LEVEL:
            return cls(head[1:])
        return None


_ROOT = ControlKeys()
_TOP_LEVEL = frozenset((_ROOT.manifest, _ROOT.success, _ROOT.lease, _ROOT.description, _ROOT.parts, _ROOT.scratch))
#: How the key of every output's control objects begins (a named output's folder, the url's own objects): a
#: listing of the names that begin so finds a url's outputs without walking its predictions.
CONTROL_BEGINS = "_"


@dataclass(frozen=True, slots=True)
class OutputInfo:
    """What a reader of an output needs to know of how it is written (``remaining()`` finds its ids with it).

    Attributes:
        format: the format's name (a registered name, or a writer function's).
        key: the key template.
        extension: what the format appends to each key (``""`` for formats without per-item objects).
        name: the name of the output's control objects (:class:`ControlKeys`).
    """

    format: str
    key: str
    extension: str
    name: str

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> OutputInfo:
        """Parse one; raises ``ValueError`` for anything that is not one."""
        try:
            raw: Any = json.loads(data)
            return cls(str(raw["format"]), str(raw["key"]), str(raw["extension"]), str(raw["name"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an output description: {exc!r}") from None
