"""A writer function ``(path, value) -> None``, as Lighter's ``FileWriter`` took, used as a format."""

from __future__ import annotations

import functools
import inspect
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from lighter_sink._errors import ConfigurationError, PredictionError
from lighter_sink.formats._base import EncodedItem, Format

__all__ = ["FunctionFormat", "WriterFunction"]

WriterFunction = Callable[[Path, torch.Tensor], object]

# The path handed to the function: a bare name, so that ``path.with_suffix(".nii.gz")`` gives "prediction.nii.gz".
_STEM = "prediction"


def _declared_suffix(fn: Callable[..., object]) -> str | None:
    """The default of a ``suffix`` parameter, which Lighter's writer functions declare (``suffix=".pt"``)."""
    try:
        parameter = inspect.signature(fn).parameters.get("suffix")
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return None
    if parameter is None or not isinstance(parameter.default, str):
        return None
    return parameter.default


def _function_name(fn: Callable[..., object]) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__)


class FunctionFormat(Format):
    """Store what ``fn(path, value)`` writes: one object ``{url}/{key}{extension}`` per prediction.

    In a worker thread, ``fn`` receives a :class:`~pathlib.Path` without suffix inside a fresh temporary
    directory and the prediction (a CPU tensor holding only that sample); it writes either that path or that
    path with ``extension`` as suffix (``path.with_suffix(extension)``, as Lighter's writers do). The file's bytes
    become the object, so the function works for local and remote urls alike. The temporary directory is removed
    whether ``fn`` succeeds or raises. Several worker threads may call ``fn`` at once: it must be thread-safe.

    Example::

        def write_nifti(path, value):
            nibabel.save(nibabel.Nifti1Image(value.numpy(), numpy.eye(4)), path.with_suffix(".nii.gz"))

        PredictionSink("s3://bucket/run-7/masks", format=FunctionFormat(write_nifti, extension=".nii.gz"))

    Args:
        fn: the writer function.
        extension: the suffix of the objects (with its dot; ``""`` for none). Defaults to the default of ``fn``'s
            ``suffix`` parameter when it has one, as Lighter's writer functions do.
        temp_dir: where the temporary directories go; default: the system's temporary directory.

    Raises:
        ConfigurationError: ``fn`` is not callable, or no extension was given and ``fn`` declares none.
    """

    name = "function"
    extension = ""

    def __init__(
        self,
        fn: WriterFunction,
        extension: str | None = None,
        *,
        temp_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if not callable(fn):
            raise ConfigurationError(
                f"FunctionFormat expects a callable (path, value) -> None, got {type(fn).__name__}"
            )
        name = _function_name(fn)
        if extension is None:
            extension = _declared_suffix(fn)
            if extension is None:
                raise ConfigurationError(
                    f"FunctionFormat cannot tell which suffix {name!r} writes; pass extension='.ext' "
                    "(the suffix of the file it writes, with its dot)"
                )
        if not isinstance(extension, str) or (extension and not extension.startswith(".")) or extension == ".":
            raise ConfigurationError(f"extension must be '' or start with a dot, such as '.nii.gz'; got {extension!r}")
        if "/" in extension or "\\" in extension:
            raise ConfigurationError(f"extension must not contain path separators, got {extension!r}")
        self.fn = fn
        self.temp_dir = os.fspath(temp_dir) if temp_dir is not None else None
        # name and extension are per instance here; the base class declares them per class.
        self.__dict__["name"] = name
        self.__dict__["extension"] = extension

    def __repr__(self) -> str:
        return f"<FunctionFormat {self.name!r} extension={self.extension!r}>"

    def encode(self, value: torch.Tensor) -> EncodedItem:
        """Run the function on a temporary path and return the file it wrote.

        Raises:
            PredictionError: the function wrote no file, several files, or a file with another suffix.
            Exception: whatever the function raises, unchanged.
        """
        # A row of a batch shares the batch's storage: a function that torch.saves it would save the whole batch.
        if value.untyped_storage().nbytes() != value.nbytes or not value.is_contiguous():
            value = value.clone(memory_format=torch.contiguous_format)
        with tempfile.TemporaryDirectory(prefix="lighter-sink-", dir=self.temp_dir) as directory:
            path = Path(directory) / _STEM
            self.fn(path, value)
            data = self._read_output(path)
        return EncodedItem((data,), tuple(value.shape), str(value.dtype).removeprefix("torch."))

    def _read_output(self, path: Path) -> bytes:
        expected = path.with_name(_STEM + self.extension)
        if expected.is_file():
            return expected.read_bytes()
        written = sorted(p.name for p in path.parent.iterdir())
        if written == [_STEM] and path.is_file():
            return path.read_bytes()  # the function wrote the path it was given, without adding a suffix
        raise PredictionError(
            f"writer function {self.name!r} was given the path {_STEM!r} and expected to write "
            f"{expected.name!r} (extension={self.extension!r}); it wrote {written or 'nothing'}"
        )
