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

Lighter's ``CsvWriter(path, keys)`` becomes ``lighter_sink.lighter.CsvWriter`` the same way: the CSV text Lighter
writes (:mod:`lighter_sink._lighter_csv`), at ``path`` (local or any fsspec url), merged at the end of predict
from per-rank parts that are streamed during the run.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any, Unpack

import lightning.pytorch as pl
from typing_extensions import override

from lighter_sink._callback import PredictionSink
from lighter_sink._config import SinkOptions
from lighter_sink._errors import ConfigurationError, FormatNotFoundError, PredictionError
from lighter_sink._lighter_csv import batch_rows, pack_lines
from lighter_sink._store import is_local_url
from lighter_sink.formats import CsvTextFormat, Format, FunctionFormat, WriterFunction, available_formats, get_format

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


class _LighterWriter(PredictionSink):
    """What Lighter's writers share: a batch without outputs (``None``, ``{}``) is passed over, as Lighter's
    ``BaseWriter`` does; the batch being written is known to :meth:`split_outputs`."""

    _batch = (0, 0)  # (rank, batch index)

    @override
    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if outputs is None or (isinstance(outputs, Mapping) and not outputs):
            return
        self._batch = (trainer.global_rank, batch_idx)
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)


class FileWriter(_LighterWriter):
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


class CsvWriter(_LighterWriter):
    """Write the ``keys`` of every ``predict_step`` output as one CSV file: the text Lighter's ``CsvWriter`` writes.

    The header is ``keys``; a row per sample follows, in the order of the samples (on one process, the order in
    which they were predicted). Each key may hold a list, a tuple or a tensor with one value per sample (a
    ``(B,)`` tensor gives numbers, a ``(B, w)`` tensor list cells ``"[0.1, 0.9]"``), or one value for every row
    (a Python number, a string); names, numbers and vectors mix freely. Each value is written as Lighter writes
    it (:mod:`lighter_sink._lighter_csv` says how, and what differs). When no key holds one value per sample
    (only 0-d tensors and Python values), the batch is one row, as in Lighter.

    The rows are stored in the background while predict runs (per-rank parts), and merged at the end into
    ``path``, which may be a local file or any fsspec url. The manifest numbers the rows with Lighter's
    rank-aware counter (the dataset index); the table's control objects go under ``_{file name}/`` in its
    directory (``_scores.csv/_manifest.jsonl`` and, once every rank succeeded, ``_scores.csv/_SUCCESS``), apart
    from those of a ``FileWriter`` writing to the same directory.

    Args:
        path: the CSV file: a local path or an fsspec url (``s3://bucket/run/predictions.csv``).
        keys: the entries of the ``predict_step`` output dict to write, in order, as Lighter's ``keys``.
        **options: the options every entry point shares, documented in :class:`~lighter_sink.SinkConfig`
            (``storage_options``, ``concurrency``, ``mode``: ``"overwrite"`` is Lighter's behaviour, ...).
            ``copy`` defaults to ``False`` here: the rows are new bytes every batch already.

    Raises:
        ConfigurationError: ``keys`` is empty or repeats a key, or ``path`` names no file.
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
        if not self.keys or len(set(self.keys)) != len(self.keys):
            # (Lighter's pandas renames a repeated column "key.1"; a repeated key is a slip)
            raise ConfigurationError(f"keys must name at least one output, each once; got {self.keys!r}")
        self._path = os.fspath(path)
        directory, name = _split_path(self._path)
        options.setdefault("copy", False)  # (split_outputs makes a new tensor of the rows every batch)
        super().__init__(directory, format=CsvTextFormat(columns=self.keys, filename=name), **options)

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
        missing = [k for k in self.keys if k not in outputs]
        if missing:
            raise PredictionError(
                f"CsvWriter keys {missing} are not in the predict_step output; keys: {sorted(map(str, outputs))}"
            )
        lines, per_sample = batch_rows(outputs, self.keys)
        if per_sample:
            return pack_lines(lines), None  # numbered by the counter: the samples' dataset indices
        rank, batch_idx = self._batch  # one row for the batch: numbered by the batch, which sorts as a number
        return pack_lines(lines), [f"batch_{batch_idx:012d}_rank_{rank:05d}"]
