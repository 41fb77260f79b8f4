"""The rows of Lighter 0.1's ``CsvWriter``, as text: what its CSV holds for each value of a ``predict_step`` output.

Lighter's writer takes, for each key, a list, a tuple or a tensor with a value per sample, or any other value
that stands for every sample; the batch has as many rows as the first key (in ``keys`` order) that holds a list,
a tuple or a tensor (a 0-d tensor counts one). A row's cell is the list's element, the tensor's element as a
Python number (``.item()``) or a nested list (``.tolist()``), or the value itself. Python's csv module writes
each cell as ``str()`` (``repr()`` for floats, ``""`` for ``None``). At the end of predict Lighter reads the
file back with pandas and writes it again, and that changes two things, which are reproduced here:

* Cells pandas reads as missing become empty: NaN, ``None``, and the texts ``"NA"``, ``"None"``, ``"null"``,
  ``"nan"``, ``"N/A"`` and the other defaults of ``pandas.read_csv``.
* Floats come back as pandas' default parser reads them (its C parser's ``precise_xstrtod``, the one of the pandas
  releases Lighter 0.1.0 installs: numpy<2 keeps them below 3.1), and are written as Python's ``repr``: a float
  whose ``repr`` has 17 significant digits often changes in its last digit (``0.30000001192092896`` stays,
  ``3.0000000054977558e+38`` becomes ``3.000000005497756e+38``).

pandas also types whole columns, which makes a value's text depend on the other rows of its column; that is not
reproduced (see the README's "Lighter configs"): a column of numbers-as-text (``"007"``) is written as numbers
(``7``) by Lighter, integers in a column that also holds floats or missing values as floats (``1.0``), and
``true``/``false``-only columns as ``True``/``False``; here every cell keeps its own text.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lighter_sink._errors import PredictionError

__all__ = ["batch_rows", "cell_text", "pack_lines", "pandas_float"]

# pandas.read_csv's default missing-value texts (pandas._libs.parsers.STR_NA_VALUES)
_MISSING = frozenset(
    {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA"}
    | {"NULL", "NaN", "None", "n/a", "nan", "null"}
)
_POWERS = [float(f"1e{k}") for k in range(309)]  # the C parser's table of powers of ten, as C's literals round them
_PADDING = 0xFF  # never a byte of UTF-8: pads the lines of a batch to one width


def pandas_float(text: str) -> float:
    """The float pandas' default CSV parser reads from ``text``, a finite float as Python writes it.

    The parser accumulates up to 17 digits in a double, then multiplies or divides by a power of ten: two
    roundings where an exact reader makes one.
    """
    mantissa, _, exponent_text = text.partition("e")
    negative = mantissa.startswith("-")
    whole, _, fraction = mantissa.lstrip("+-").partition(".")
    exponent = int(exponent_text) if exponent_text else 0
    digits = whole + fraction
    if len(digits) <= 15 and -22 <= exponent - len(fraction) <= 22:
        return float(text)  # an exact integer and an exact power of ten: one rounding, the exact reading
    number = 0.0
    count = 0
    for char in whole:
        if count < 17:
            number = number * 10.0 + (ord(char) - 48)
            count += 1
        else:
            exponent += 1
    for char in fraction:
        if count >= 17:
            break
        number = number * 10.0 + (ord(char) - 48)
        count += 1
        exponent -= 1
    if negative:
        number = -number
    if exponent > 308:
        return math.copysign(math.inf, number) if number else number
    if exponent > 0:
        return number * _POWERS[exponent]
    if exponent < -308:  # subnormal
        return 0.0 if exponent < -616 else number / _POWERS[-308 - exponent] / _POWERS[308]
    return number / _POWERS[-exponent]


def cell_text(value: object) -> str:
    """One cell of Lighter's CSV: the csv module's text of ``value``, as pandas reads and writes it back."""
    if value is None:
        return ""
    if isinstance(value, float):  # Python's floats (.item() of a float tensor) and numpy's float64
        if math.isnan(value):
            return ""
        text = repr(float(value))
        return repr(pandas_float(text)) if math.isfinite(value) else text
    text = str(value)
    if text in _MISSING:
        return ""
    if isinstance(value, np.floating) and math.isfinite(value):  # float32's shortest text, read as a float
        return repr(pandas_float(text))
    return text


def _length(value: object) -> int | None:
    if isinstance(value, list | tuple):
        return len(value)
    if isinstance(value, torch.Tensor):
        return 1 if value.ndim == 0 else len(value)
    return None


def _cells(value: object, count: int) -> list[Any]:
    """A key's values, one per row: Lighter's ``_get_record_value`` for each row, one ``tolist`` per tensor."""
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, torch.Tensor):
        return [value.item()] if value.ndim == 0 else value.tolist()
    return [value] * count


@contextlib.contextmanager
def _numpy_1_repr() -> Iterator[None]:
    """numpy scalars in a list cell print as numpy<2 prints them (``[0.5]``; Lighter 0.1.0 pins numpy<2)."""
    if int(np.__version__.split(".")[0]) < 2:
        yield
        return
    with np.printoptions(legacy="1.25"):
        yield


def batch_rows(outputs: Mapping[str, Any], keys: Sequence[str]) -> tuple[list[str], bool]:
    """The CSV lines (with their ``"\\n"``) Lighter writes for one output, and whether they are one per sample.

    The lines are not one per sample when no key holds a list, a tuple or a tensor of at least one dimension:
    Lighter then writes one line for the batch.

    Raises:
        PredictionError: keys hold sequences of different lengths (Lighter's ``ValueError``).
    """
    count = 0
    per_sample = False
    for key in keys:
        length = _length(outputs[key])
        if length is not None:
            count = length
            value = outputs[key]
            per_sample = not (isinstance(value, torch.Tensor) and value.ndim == 0)
            break
        count = 1
    for key in keys:
        length = _length(outputs[key])
        if length is not None and length != count:
            raise PredictionError(
                f"CsvWriter found inconsistent lengths for keys: expected {count}, but found {length} for key {key!r}"
            )
    columns = [_cells(outputs[key], count) for key in keys]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    with _numpy_1_repr():
        sizes = [writer.writerow([cell_text(column[i]) for column in columns]) for i in range(count)]
    text = out.getvalue()
    lines = []
    start = 0
    for size in sizes:
        lines.append(text[start : start + size])
        start += size
    return lines, per_sample


def pack_lines(lines: Sequence[str]) -> torch.Tensor:
    """The lines as one ``(len(lines), width)`` uint8 tensor of UTF-8, each padded with ``0xFF`` bytes."""
    encoded = [line.encode() for line in lines]
    width = max(map(len, encoded), default=0)
    block = bytearray(b"".join(line.ljust(width, bytes([_PADDING])) for line in encoded))
    if not block:
        return torch.empty(len(encoded), 0, dtype=torch.uint8)
    return torch.frombuffer(block, dtype=torch.uint8).reshape(len(encoded), width)
