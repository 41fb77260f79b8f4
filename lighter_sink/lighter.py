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

Lighter's ``CsvWriter`` is not provided here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lighter_sink._callback import PredictionSink
from lighter_sink._errors import FormatNotFoundError
from lighter_sink._sink import DEFAULT_CONCURRENCY, DEFAULT_MAX_QUEUE_BYTES, Mode
from lighter_sink.formats import Format, FunctionFormat, WriterFunction, available_formats, get_format
from lighter_sink.formats._image import require_pillow

__all__ = ["WRITERS", "FileWriter"]

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
        if name == "png":
            require_pillow()  # before any compute, not at the first batch
        return get_format(name)
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
        storage_options: passed to fsspec (credentials, ``endpoint_url``); never logged.
        max_queue_bytes: host bytes queued before the predict loop is made to wait.
        concurrency: writes in flight.
        retries: attempts per file for transient storage errors.
        timeout: seconds one write attempt may take.
        mode: ``"overwrite"`` (Lighter's behaviour), ``"resume"`` or ``"error"``.

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
        storage_options: Mapping[str, Any] | None = None,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        concurrency: int = DEFAULT_CONCURRENCY,
        retries: int = 5,
        timeout: float | None = 60.0,
        mode: Mode = "overwrite",
    ) -> None:
        super().__init__(
            directory,
            format=_resolve(writer_fn, extension),
            storage_options=storage_options,
            value_key=value_key,
            id_key=name_key,
            max_queue_bytes=max_queue_bytes,
            concurrency=concurrency,
            retries=retries,
            timeout=timeout,
            mode=mode,
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
