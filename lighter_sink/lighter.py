"""Lighter compatibility: Lighter 0.1's ``FileWriter`` signature on top of :class:`~lighter_sink.PredictionSink`.

A Lighter config switches by changing its ``_target_`` from ``lighter.callbacks.FileWriter`` to
``lighter_sink.lighter.FileWriter``; the files are named as Lighter named them, ``{directory}/{name}{suffix}``,
and are now written in the background, to a local directory or any fsspec url::

    trainer:
      callbacks:
        - _target_: lighter_sink.lighter.FileWriter
          directory: s3://bucket/run-7/predictions
          value_key: pred
          writer_fn: image_2d

Lighter's ``CsvWriter(path, keys)`` becomes ``lighter_sink.lighter.CsvWriter`` the same way: one CSV file at
``path`` (local or any fsspec url) with a column per key, written at the end of predict from per-rank parts that
are streamed during the run.
"""

from __future__ import annotations

import numbers
import os
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any, Unpack

import torch
from typing_extensions import override

from lighter_sink._callback import PredictionSink
from lighter_sink._config import SinkOptions
from lighter_sink._errors import ConfigurationError, FormatNotFoundError, PredictionError
from lighter_sink._ids import as_id_list
from lighter_sink._store import is_local_url
from lighter_sink.formats import CsvFormat, Format, FunctionFormat, WriterFunction, available_formats, get_format

__all__ = ["WRITERS", "CsvWriter", "FileWriter"]

#: Lighter's writer names and the formats that store the same files.
WRITERS: Mapping[str, str] = {"tensor": "pt", "image_2d": "png", "image_3d": "png", "text": "txt"}


def _resolve(writer_fn: object, extension: str | None) -> Format:
    if isinstance(writer_fn, Format):
        return writer_fn
    if isinstance(writer_fn, str):
        name = WRITERS.get(writer_fn, writer_fn)
        if name not in available_formats():
            writers = ", ".join(sorted(WRITERS))
            raise FormatNotFoundError(
                f"writer_fn {writer_fn!r} is not a Lighter writer ({writers}) nor a registered format "
                f"({', '.join(available_formats())}); a callable (path, value) -> None is accepted too"
            )
        fmt = get_format(name)
        fmt.require()  # before any compute, not at the first batch
        return fmt
    if callable(writer_fn):
        fn: WriterFunction = writer_fn
        return FunctionFormat(fn, extension)
    raise TypeError(
        f"writer_fn must be a writer name or a callable (path, value) -> None, got {type(writer_fn).__name__}"
    )


class FileWriter(PredictionSink):
    """Write one file per prediction, as Lighter's ``FileWriter``, in the background and to any url.

    The first four arguments are Lighter 0.1's; the keyword-only ones are :class:`~lighter_sink.PredictionSink`'s.
    Files are ``{directory}/{name}{suffix}``: ``name`` comes from ``name_key`` or, without it, from Lighter's
    rank-aware counter (rank ``r`` of ``W`` numbers its samples ``r, r + W, ...``). Unlike Lighter, the directory
    also receives ``_manifest.jsonl`` and, once every rank succeeded, ``_SUCCESS``.

    Args:
        directory: a local directory or an fsspec url (``s3://bucket/prefix``).
        value_key: the entry of the ``predict_step`` output dict holding the batched predictions.
        writer_fn: a Lighter writer name, ``"tensor"`` (``.pt``), ``"image_2d"`` or ``"image_3d"`` (``.png``, see
            :class:`~lighter_sink.formats.PngFormat`) or ``"text"`` (``.txt``); a registered format name
            (``"npy"``); a :class:`~lighter_sink.formats.Format`; or a Lighter writer function
            ``(path, value) -> None`` (see :class:`~lighter_sink.formats.FunctionFormat`).
        name_key: the entry holding per-sample names (ints or strings, ``/`` makes sub-directories).
        extension: for a writer function, the suffix of the files it writes when it declares no ``suffix``
            parameter.
        **options: the options every entry point shares, documented in :class:`~lighter_sink.SinkConfig`
            (``storage_options``, ``concurrency``, ``mode``: ``"overwrite"`` is Lighter's behaviour, ``copy``, ...).

    Raises:
        FormatNotFoundError: ``writer_fn`` names no writer nor format; the message lists them.
        TypeError: ``writer_fn`` is neither a name, a format nor a callable.
        ImportError: an image writer was chosen and Pillow is missing.
        ConfigurationError: any other invalid argument.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        value_key: str,
        writer_fn: str | Format | WriterFunction,
        name_key: str | None = None,
        *,
        extension: str | None = None,
        **options: Unpack[SinkOptions],
    ) -> None:
        super().__init__(
            directory, format=_resolve(writer_fn, extension), value_key=value_key, id_key=name_key, **options
        )
        self.writer_fn = writer_fn

    @property
    def directory(self) -> str:
        """Where the files go (Lighter's name for ``url``)."""
        return self.url

    @property
    def name_key(self) -> str | None:
        """The output entry naming the files (Lighter's name for ``id_key``)."""
        return self.id_key

    def __repr__(self) -> str:
        writer = self.writer_fn if isinstance(self.writer_fn, str) else self.format.name
        return f"FileWriter({self.url!r}, value_key={self.value_key!r}, writer_fn={writer!r})"


def _split_path(path: str) -> tuple[str, str]:
    """``(directory url, file name)`` of a file path or url."""
    if is_local_url(path):
        directory, name = os.path.split(os.path.abspath(path))
    else:
        directory, name = posixpath.split(path.rstrip("/"))
    if not name or not directory or directory.endswith("://"):
        raise ConfigurationError(f"path must name a CSV file inside a directory or bucket, got {path!r}")
    return directory, name


class CsvWriter(PredictionSink):
    """Write the ``keys`` of every ``predict_step`` output as one CSV file, as Lighter's ``CsvWriter``.

    The rows are written in the background while predict runs (per-rank parts), and merged at the end into
    ``path``, sorted by id. ``path`` may be a local file or any fsspec url. The table's own control objects go
    under ``_{file name}/`` in its directory (``_scores.csv/_manifest.jsonl`` and, once every rank succeeded,
    ``_scores.csv/_SUCCESS``), apart from those of a ``FileWriter`` writing to the same directory.

    Columns: ``id`` first, then the other keys in their order. The ``id`` column holds the output's ``"id"``
    entry when ``keys`` names it and the output has it (ints or strings), otherwise Lighter's rank-aware counter.
    Every other key holds one number per sample (a tensor of shape ``(B,)``, a list of ``B`` numbers, or a
    Python number for the whole batch) or a vector per sample (shape ``(B, w)``, written as a list cell
    ``"[0.1, 0.9]"``, the same ``w`` for every vector key). Unlike Lighter, the values of one row share a dtype:
    when keys mix integers and floats, integers are written as floats (``1.0``).

    Args:
        path: the CSV file: a local path or an fsspec url (``s3://bucket/run/predictions.csv``).
        keys: the entries of the ``predict_step`` output dict to write, as Lighter's ``keys``.
        **options: the options every entry point shares, documented in :class:`~lighter_sink.SinkConfig`
            (``storage_options``, ``concurrency``, ``mode``: ``"overwrite"`` is Lighter's behaviour, ...).
            ``copy`` defaults to ``False`` here: the columns are stacked into a new tensor every batch already.

    Raises:
        ConfigurationError: ``keys`` names no output besides ``id``, repeats a key, or ``path`` names no file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        keys: Sequence[str],
        **options: Unpack[SinkOptions],
    ) -> None:
        if isinstance(keys, str) or not all(isinstance(k, str) for k in keys):
            raise ConfigurationError(f"keys must be a list of output names, got {keys!r}")
        self.keys = list(keys)
        self.value_keys = [k for k in self.keys if k != "id"]
        if not self.value_keys:
            raise ConfigurationError(f"keys must name at least one output besides 'id', got {self.keys!r}")
        self._path = os.fspath(path)
        directory, name = _split_path(self._path)
        options.setdefault("copy", False)  # (split_outputs stacks the columns into a new tensor every batch)
        super().__init__(directory, format=CsvFormat(columns=self.value_keys, filename=name), **options)

    @property
    def path(self) -> str:
        """The CSV file (Lighter's name)."""
        return self._path

    def __repr__(self) -> str:
        return f"CsvWriter({self._path!r}, keys={self.keys!r})"

    @override
    def split_outputs(self, outputs: Any) -> tuple[Any, list[Any] | None]:
        if not isinstance(outputs, Mapping):
            raise PredictionError(
                f"CsvWriter needs predict_step to return a dict with the keys {self.keys}, got {type(outputs).__name__}"
            )
        missing = [k for k in self.value_keys if k not in outputs]
        if missing:
            raise PredictionError(
                f"CsvWriter keys {missing} are not in the predict_step output; keys: {sorted(map(str, outputs))}"
            )
        ids = as_id_list(outputs["id"], "id") if "id" in self.keys and "id" in outputs else None
        count = len(ids) if ids is not None else _batch_size(outputs, self.value_keys)
        columns = [_column(outputs[k], k, count) for k in self.value_keys]
        widths = {tuple(c.shape[1:]) for c in columns}
        if len(widths) > 1:
            shapes = {k: tuple(c.shape) for k, c in zip(self.value_keys, columns, strict=True)}
            raise PredictionError(
                f"CsvWriter keys must hold one number per sample, or vectors of one length: got shapes {shapes}"
            )
        device = next((c.device for c in columns if c.device.type != "cpu"), torch.device("cpu"))
        dtype = columns[0].dtype
        for column in columns[1:]:
            dtype = torch.promote_types(dtype, column.dtype)
        return torch.stack([c.to(device=device, dtype=dtype) for c in columns], dim=1), ids


def _batch_size(outputs: Mapping[str, Any], keys: Sequence[str]) -> int:
    for key in keys:
        value = outputs[key]
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
        if isinstance(value, list | tuple):
            return len(value)
    return 1  # only Python numbers: one sample, as Lighter counted it


def _column(value: Any, key: str, count: int) -> torch.Tensor:
    """One key's values for the batch: a tensor of shape ``(count,)`` or ``(count, w)``."""
    if isinstance(value, numbers.Real):  # Python and numpy scalars: the same value for every sample
        return torch.tensor(value).expand(count)
    if isinstance(value, list | tuple):
        try:
            value = torch.tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise PredictionError(
                f"CsvWriter key {key!r} must hold numbers; its list holds {type(value[0]).__name__ if value else None} "
                "values (per-sample names belong in the 'id' key)"
            ) from None
    if not isinstance(value, torch.Tensor):
        raise PredictionError(f"CsvWriter key {key!r} must hold a tensor, a list of numbers or a number, got {value!r}")
    if value.ndim == 0:
        return value.expand(count)
    if value.shape[0] != count or value.ndim > 2:
        raise PredictionError(
            f"CsvWriter key {key!r} has shape {tuple(value.shape)}; expected ({count},) or ({count}, width) "
            f"for a batch of {count}"
        )
    return value
