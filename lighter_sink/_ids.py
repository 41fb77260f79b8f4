"""Identifiers: the rank-aware counter and the rules that make an identifier a safe object key."""

from __future__ import annotations

import contextlib
import re
import reprlib
import string
import unicodedata
import zlib
from collections.abc import Sequence
from numbers import Integral
from typing import Any, TypeAlias

import numpy as np
import torch

from lighter_sink._errors import ConfigurationError, IdentifierError, PredictionError, SinkError
from lighter_sink._types import is_numeric_id

__all__ = [
    "CounterIds",
    "IdBatch",
    "KeyTemplate",
    "RankCounter",
    "as_id_list",
    "id_batch",
    "is_numeric_id",
    "validate_identifier",
    "validate_identifiers",
]

# A format spec that writes a number's digits in one base, at most signed, prefixed, grouped or padded with zeros
# or spaces on the left (no fill character, no alignment), and refuses text: one-to-one on non-negative ints.
_DIGITS_SPEC = re.compile(r"[-+ ]?#?0?[0-9]*[,_]?[bdoxX]")
_BASES = {"b": 2, "o": 8, "x": 16, "X": 16}

#: The ids of a batch as a caller holds them: a sequence of ids, or (collated by a DataLoader) an integer vector.
IdBatch: TypeAlias = "Sequence[int | str] | torch.Tensor | np.ndarray[Any, Any]"


class RankCounter:
    """Hands out the ids Lighter's writers assign: rank ``r`` numbers its samples ``r, r + W, r + 2W, ...``.

    With Lightning's non-padding distributed sampler and one unshuffled dataloader, rank ``r`` sees dataset
    indices ``r, r + W, ...`` in that order, so the counter equals the dataset index.
    """

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1:
            raise ConfigurationError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ConfigurationError(f"rank must be in [0, {world_size}), got {rank}")
        self.rank = rank
        self.world_size = world_size
        self._next = rank

    def take(self, count: int) -> range:
        """Reserve ``count`` consecutive ids of this rank and return them."""
        if count < 0:
            raise ConfigurationError(f"count must be >= 0, got {count}")
        start = self._next
        self._next += count * self.world_size
        return range(start, self._next, self.world_size)


class CounterIds(list[str]):
    """Ids a :class:`RankCounter` handed out, as text: valid keys that never repeat within a run.

    A sink takes them without validating each id again, and without checking them against the ids it saw when
    distinct ids give distinct keys (an injective key template): the predict loop's hot path.
    """

    __slots__ = ()


def validate_identifier(identifier: object) -> str:
    """Return ``identifier`` as a relative object key, or raise :class:`IdentifierError`.

    Accepted: non-negative integers and strings made of path segments separated by ``/``. Refused: empty ids,
    absolute paths, ``.`` and ``..`` segments, backslashes, NUL and other control characters, and names that start
    with ``_`` at the top level (they are reserved for ``_manifest.jsonl``, ``_SUCCESS`` and ``_parts/``).
    """
    if type(identifier) is int and identifier >= 0:  # the common case, without the ABC checks below
        return str(identifier)
    if isinstance(identifier, bool):
        raise IdentifierError(f"identifier must be an int or a str, got bool {identifier!r}")
    if isinstance(identifier, Integral):
        value = int(identifier)
        if value < 0:
            raise IdentifierError(f"identifier must be >= 0, got {value}")
        return str(value)
    if not isinstance(identifier, str):
        raise IdentifierError(f"identifier must be an int or a str, got {type(identifier).__name__} {identifier!r}")
    if not identifier:
        raise IdentifierError("identifier must not be empty")
    for char in identifier:
        if unicodedata.category(char) == "Cc":
            raise IdentifierError(f"identifier {identifier!r} contains the control character {char!r}")
    if "\\" in identifier:
        raise IdentifierError(f"identifier {identifier!r} contains a backslash; use '/' to separate segments")
    if identifier.startswith("/"):
        raise IdentifierError(f"identifier {identifier!r} is an absolute path; ids must be relative")
    segments = identifier.split("/")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise IdentifierError(
                f"identifier {identifier!r} has an empty, '.' or '..' segment; ids must stay inside the url"
            )
    if segments[0].startswith("_"):
        raise IdentifierError(
            f"identifier {identifier!r} starts with '_', which is reserved for the sink's own objects"
        )
    return identifier


def validate_identifiers(identifiers: Sequence[object]) -> list[str]:
    """Validate a batch of identifiers and refuse duplicates inside it."""
    keys = [validate_identifier(i) for i in identifiers]
    if len(keys) > 1 and len(set(keys)) != len(keys):
        seen: set[str] = set()
        for key in keys:
            if key in seen:
                raise IdentifierError(f"identifier {key!r} appears twice in one batch")
            seen.add(key)
    return keys


class KeyTemplate:
    """Turns an identifier into an object key with a ``str.format`` template.

    Fields: ``{id}`` and ``{hash}`` (8 hex digits of a CRC-32 of the id, stable across runs and machines).
    Ids are strings inside the sink: the int ``7`` and the string ``"7"`` are one id. ``{id}`` is an int for a
    numeric id (:func:`is_numeric_id`), else the id's text as given, so ``"pred-{id}"`` keeps ``"007"`` as
    ``pred-007`` and ``"{id:08d}"`` refuses it. ``"{id:08d}"`` zero-pads counter ids; ``"{hash:.2}/{id}"``
    spreads keys over 256 prefixes, which S3 rate-limits separately.

    Attributes:
        injective: distinct ids always give distinct keys (proved from the template, not sampled), so a sink
            need not check the keys of ids that cannot repeat, such as its counter's.

    Raises:
        ConfigurationError: at construction, when the template is malformed, uses unknown fields, or does
            not give a safe relative key for the id 0.
    """

    def __init__(self, template: str = "{id}") -> None:

        if not isinstance(template, str) or not template:
            raise ConfigurationError(f"key must be a non-empty format string such as '{{id}}', got {template!r}")
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as exc:
            raise ConfigurationError(f"key template {template!r} is malformed: {exc}") from None
        unknown = fields - {"id", "hash"}
        if unknown or "id" not in fields:
            raise ConfigurationError(
                f"key template {template!r} must use the field {{id}} and may use {{hash}}; "
                f"unknown fields: {', '.join(sorted(unknown)) or 'none'}"
            )
        self.template = template
        self._plain = template == "{id}"
        pattern = []
        # Distinct ids give distinct keys when every {id} field writes the id's text (no spec and no conversion: a
        # number's text is its digits) or a number's digits (_DIGITS_SPEC, which refuses text), and no spec nests
        # a field. Then {hash} fields have a fixed width and no {id} field narrows as the id grows, so two ids with
        # one key fill the first {id} field at one place and width with one text: they are one id.
        self.injective = True
        self._base = 10  # of the numbers in the first {id} field: parse reads them back
        for literal, name, field_spec, conversion in string.Formatter().parse(template):
            pattern.append(re.escape(literal))
            spec = field_spec or ""
            if name == "id":
                if "(?P<id>" not in "".join(pattern):
                    pattern.append("(?P<id>.+)")
                    self._base = _BASES.get(spec[-1:], 10)
                else:
                    pattern.append("(?P=id)")
                digits = conversion is None and _DIGITS_SPEC.fullmatch(spec) is not None
                self.injective = self.injective and (digits or (not spec and conversion is None))
            elif name == "hash":
                pattern.append("[0-9a-f]{1,8}")
            if "{" in spec:
                self.injective = False
        self._pattern = re.compile("".join(pattern))
        self._hashed = "hash" in fields
        try:
            self.render(0)
        except IdentifierError as exc:
            raise ConfigurationError(f"key template {template!r} does not give a safe key: {exc}") from None

    def __repr__(self) -> str:
        return f"KeyTemplate({self.template!r})"

    def parse(self, key: str) -> str | None:
        """The identifier whose key is ``key``, or None when no identifier renders to it."""
        if self._plain:
            return key
        match = self._pattern.fullmatch(key)
        if match is None:
            return None
        captured = match.group("id")
        candidates = [captured]
        # a number's field ("{id:08d}", "{id:x}") comes back as the number's own digits first
        with contextlib.suppress(ValueError):
            candidates.insert(0, str(int(captured.replace(",", ""), self._base)))
        for candidate in candidates:
            try:
                if self.render(validate_identifier(candidate)) == key:
                    return candidate
            except IdentifierError:
                continue
        return None

    def render(self, identifier: int | str) -> str:
        """The validated key of ``identifier`` (already validated as an identifier itself)."""
        if self._plain:
            return str(identifier)
        value: int | str = int(identifier) if isinstance(identifier, str) and is_numeric_id(identifier) else identifier
        digest = f"{zlib.crc32(str(identifier).encode()):08x}" if self._hashed else ""
        try:
            key = self.template.format(id=value, hash=digest)
        except (ValueError, TypeError) as exc:
            text = (
                ": the template formats numbers and this id is text (a number's id is its decimal digits without "
                "a leading zero, such as '7')"
                if isinstance(value, str)
                else ""
            )
            raise IdentifierError(
                f"key template {self.template!r} cannot format the id {identifier!r}{text}: {exc}"
            ) from None
        return validate_identifier(key)


def id_batch(ids: IdBatch, what: str = "ids", error: type[SinkError] = IdentifierError) -> Sequence[Any]:
    """The ids of a batch as a sequence: a 1-d integer tensor (on any device) or numpy array, as a DataLoader
    collates ids, becomes a list of ints with one ``tolist()``; a list, tuple or range passes through as it is.

    Raises:
        error: anything else (a float or bool tensor, whose values are not ids; a 2-d tensor; a str, whose
            characters are not ids), named with ``what``.
    """
    if isinstance(ids, torch.Tensor):
        # (the dtype's flags, not Tensor.is_floating_point(): torch gives up the GIL in that call, and getting it
        # back from the sink's busy threads costs the predict loop milliseconds)
        dtype = ids.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool or ids.ndim != 1:
            raise error(
                f"{what} must hold a 1-d integer tensor or a list, got {dtype} tensor of shape {tuple(ids.shape)}"
            )
        return ids.tolist()
    if isinstance(ids, np.ndarray):
        if ids.dtype.kind not in "iu" or ids.ndim != 1:
            raise error(f"{what} must hold a 1-d integer array or a list, got {ids.dtype} array of shape {ids.shape}")
        return ids.tolist()  # type: ignore[no-any-return]
    if isinstance(ids, Sequence) and not isinstance(ids, str | bytes):
        return ids
    raise error(
        f"{what} must hold a list of ids (or an integer tensor), one per prediction; "
        f"got {type(ids).__name__} {reprlib.repr(ids)}"
    )


def as_id_list(ids: Any, key: str) -> list[Any]:
    """The ids an output entry ``key`` holds, as a list (see :func:`id_batch`).

    Raises:
        PredictionError: anything else (a float tensor, a string, a 2-d tensor).
    """
    return list(id_batch(ids, f"id_key {key!r}", PredictionError))
