"""A CSV table of rows its caller wrote as text: Lighter's ``CsvWriter`` table (see :mod:`lighter_sink.lighter`).

A prediction is one row's line, UTF-8 and ending in ``"\\n"``, as a 1-d uint8 tensor; trailing ``0xFF`` bytes,
which UTF-8 never holds, are padding, so that a batch of lines of different lengths is one ``(B, L)`` tensor.
The table is the header (the column names) and the lines, in id order, as they came: it has no id column. Its
rows are sorted, merged, recorded and checked as :class:`~lighter_sink.formats.CsvFormat`'s (parts, manifest,
CRC-32 of each line); ``verify`` and a resumed run pair its lines with the recorded ids by that order.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import torch

from lighter_sink._errors import ConfigurationError, PredictionError
from lighter_sink.formats._base import Format
from lighter_sink.formats._table import CsvFormat, Layout

__all__ = ["CsvTextFormat"]

_PADDING = b"\xff"


class CsvTextFormat(CsvFormat):
    """One CSV table with a header line ``<columns>`` and the caller's lines; see the module docstring.

    Args:
        columns: the names of the columns, as the header gives them (any text; CSV quotes it when it must).
        filename: the table's name under the url.

    Raises:
        ConfigurationError: as :class:`~lighter_sink.formats.TableFormat`.
    """

    name = "csv_text"
    ids_in_rows = False

    @property
    def namespace(self) -> str:
        # Written beside other outputs as a rule (Lighter's CsvWriter in a FileWriter's directory), whatever its name.
        return self.filename

    def layout(self, shape: tuple[int, ...]) -> Layout:
        if self.columns is None:
            raise ConfigurationError(f"format {self.name!r} needs columns=[...], the names of its header")
        if len(shape) != 1:
            raise PredictionError(
                f"format {self.name!r} stores one row's CSV line per prediction, a 1-d uint8 tensor; got shape {shape}"
            )
        return self.columns, None

    def check(self, value: torch.Tensor) -> None:
        Format.check(self, value)  # (not CsvFormat's: its rows are numbers)
        if value.dtype != torch.uint8:
            raise PredictionError(
                f"format {self.name!r} stores one row's CSV line per prediction, as UTF-8 bytes in a uint8 tensor; "
                f"got {value.dtype}"
            )
        self.layout(tuple(value.shape))

    def header(self, columns: Sequence[str]) -> bytes:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerow(columns)
        return out.getvalue().encode()

    def columns_of(self, first_lines: Sequence[bytes]) -> tuple[str, ...]:
        return tuple(next(csv.reader([first_lines[0].decode()]))) if first_lines else ()

    def row_lines(
        self, ids: Sequence[str], samples: Sequence[torch.Tensor], layout: Layout
    ) -> tuple[list[bytes], tuple[int, ...], str]:
        lines = [sample.numpy().tobytes().rstrip(_PADDING) for sample in samples]
        for identifier, line in zip(ids, lines, strict=True):
            if not line.endswith(b"\n"):
                raise PredictionError(f"row {identifier!r} of format {self.name!r} does not end its line: {line!r}")
        return lines, (len(layout[0]),), "text"

    def split_lines(self, data: bytes) -> list[bytes]:
        """The table's lines: a quoted cell may hold line breaks, and then its line goes on to the next one."""
        lines: list[bytes] = []
        pending = b""
        for piece in data.splitlines(keepends=True):
            pending += piece
            if pending.count(b'"') % 2 == 0 and pending.endswith(b"\n"):
                lines.append(pending)
                pending = b""
        if pending:
            lines.append(pending)
        return lines

    def row_id(self, line: bytes) -> str:
        raise NotImplementedError(f"the rows of format {self.name!r} hold no id: they are paired with ids by order")
