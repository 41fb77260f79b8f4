"""Reading a finished output back: check every object against the manifest (``_inspect`` summarises it).

Both work from what the sink leaves under the url (``_SUCCESS``, ``_manifest.jsonl``, the objects) through the
same stores the sink writes with, so every fsspec url and storage option the sink accepts works here too.
Nothing is printed: the functions return results and the command line formats them.

Records are checked as the output's format says (:meth:`~lighter_sink.formats.Format.open_check`): an object of
its own is read whole and compared with its record; the rows of a ``zarr`` array or of a ``csv`` / ``jsonl``
table are read back by their format. When no marker names the format (an unfinished run), every registered format
is asked whether the stored records look like its own.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream

from lighter_sink._checksum import crc32
from lighter_sink._commit import owned_key
from lighter_sink._errors import ConfigurationError, IdentifierError
from lighter_sink._ids import KeyTemplate, validate_identifier
from lighter_sink._layout import ControlKeys
from lighter_sink._lease import current_generation
from lighter_sink._manifest import id_order, read_records, sorted_ids
from lighter_sink._store import RetryPolicy, Store, open_store
from lighter_sink._types import Problem, ProblemKind, Record, decode_records
from lighter_sink.formats import CheckContext, RecordCheck, available_formats, get_format

__all__ = [
    "READ_RETRY",
    "Problem",
    "ProblemKind",
    "VerifyResult",
    "get_optional",
    "parse_summary",
    "stored_records",
    "verify",
]

#: ``progress(done, total)``: called after every ``progress_every`` objects checked.
ProgressCallback = Callable[[int, int], None]

# Objects at least this large are checksummed in a worker thread, so the event loop keeps reading meanwhile.
_THREAD_CRC_BYTES = 1 << 20
# Reads only: a few attempts are enough to ride out throttling without hiding a dead store for minutes.
READ_RETRY = RetryPolicy(attempts=3, timeout=60.0)


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """What :func:`verify` found.

    Attributes:
        url: the output checked.
        summary: the parsed ``_SUCCESS`` marker, or ``None`` when it is absent (the output is incomplete).
        records: predictions the manifest lists (for an incomplete output: those recorded in per-rank parts).
        checked: objects read and compared.
        bytes_read: bytes read while checking.
        seconds: time spent.
        problems: everything wrong, in id order after the marker and manifest problems; empty when all is fine.
        found: whether anything is stored at the url (a mistyped url holds nothing: not a run that did not finish).
    """

    url: str
    summary: Mapping[str, Any] | None
    records: int
    checked: int
    bytes_read: int
    seconds: float
    problems: tuple[Problem, ...]
    found: bool = True

    @property
    def complete(self) -> bool:
        """Whether the ``_SUCCESS`` marker is present."""
        return self.summary is not None

    @property
    def ok(self) -> bool:
        """Whether the output is complete and every recorded object matches its record."""
        return not self.problems


def verify(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    concurrency: int = 16,
    progress: ProgressCallback | None = None,
    progress_every: int = 1000,
) -> VerifyResult:
    """Check that the output at ``url`` is complete and that every object matches the manifest.

    Reads ``_SUCCESS`` and ``_manifest.jsonl``, then every recorded object (``concurrency`` at a time), and
    compares its size and CRC-32 with its record. A missing marker makes the output incomplete; the objects
    already recorded (in the manifest or in per-rank parts) are still checked.

    Args:
        url: a local path or fsspec url, as given to the sink.
        storage_options: passed to fsspec; never logged.
        concurrency: objects read at once.
        progress: called as ``progress(done, total)`` after every ``progress_every`` objects.
        progress_every: how often ``progress`` is called, in objects.

    Returns:
        Every problem found; ``result.ok`` is true when there is none.

    Raises:
        ConfigurationError: ``concurrency`` or ``progress_every`` is not positive (a :class:`ValueError`).
        OSError: the marker or the manifest could not be read for another reason than being absent
            (denied access, unreachable endpoint, ...).
    """
    if concurrency < 1:
        raise ConfigurationError(f"concurrency must be >= 1, got {concurrency}")
    if progress_every < 1:
        raise ConfigurationError(f"progress_every must be >= 1, got {progress_every}")
    options = dict(storage_options or {})

    async def run() -> VerifyResult:
        store = await open_store(url, options, concurrency=concurrency, retry=READ_RETRY)
        try:
            return await _verify(store, concurrency, progress, progress_every)
        finally:
            await store.aclose()

    return anyio.run(run, backend="asyncio")


async def get_optional(store: Store, key: str) -> bytes | None:
    try:
        return await store.get(key)
    except FileNotFoundError:
        return None


def parse_summary(data: bytes) -> dict[str, Any]:
    summary = json.loads(data)
    if not isinstance(summary, dict):
        raise ValueError(f"expected a JSON object, got {type(summary).__name__}")
    return summary


async def stored_records(store: Store, keys: ControlKeys, manifest: bytes | None) -> list[Record]:
    if manifest is not None:
        return decode_records(manifest)
    # No merged manifest (the run did not commit): the parts of its generation say what was stored so far.
    recorded = await read_records(store, keys, await current_generation(store, keys))
    return [recorded[i] for i in sorted_ids(recorded)]


def _outputs(listing: Sequence[str]) -> list[ControlKeys]:
    """The outputs at a url: the one that fills it, and each named one whose control objects are under ``_{name}/``."""
    names = {""}
    for key in listing:
        head, _, rest = key.partition("/")
        if head.startswith("_") and rest in ("_SUCCESS", "_manifest.jsonl", "_lease.json"):
            names.add(head[1:])
    return [ControlKeys(name) for name in sorted(names)]


async def _verify(
    store: Store,
    concurrency: int,
    progress: ProgressCallback | None,
    progress_every: int,
) -> VerifyResult:
    """Every output at the url (one, or a table beside one-file-per-prediction objects), reported as one."""
    started = time.perf_counter()
    listing = await store.list()
    if not listing:
        nothing = Problem("missing", ".", None, "nothing is stored here: no _SUCCESS, no manifest, no object")
        return VerifyResult(store.url, None, 0, 0, 0, time.perf_counter() - started, (nothing,), found=False)
    outputs = _outputs(listing)
    results = []
    for keys in outputs:
        if (
            keys.name == ""
            and len(outputs) > 1
            and not any(k.startswith(("_SUCCESS", "_manifest", "_parts/")) for k in listing)
        ):
            continue  # only named outputs live here
        results.append(await _verify_output(store, keys, listing, concurrency, progress, progress_every))
    summary = next((summary for summary, *_ in results if summary is not None), None)
    return VerifyResult(
        url=store.url,
        summary=summary,
        records=sum(r[1] for r in results),
        checked=sum(r[2] for r in results),
        bytes_read=sum(r[3] for r in results),
        seconds=time.perf_counter() - started,
        problems=tuple(p for r in results for p in r[4]),
    )


async def _verify_output(  # noqa: PLR0917 - private, called once
    store: Store,
    keys: ControlKeys,
    listing: Sequence[str],
    concurrency: int,
    progress: ProgressCallback | None,
    progress_every: int,
) -> tuple[dict[str, Any] | None, int, int, int, list[Problem]]:
    problems: list[Problem] = []
    summary: dict[str, Any] | None = None
    marker = await get_optional(store, keys.success)
    if marker is None:
        problems.append(
            Problem("incomplete", keys.success, None, "no _SUCCESS marker: the run did not finish, or a rank failed")
        )
    else:
        try:
            summary = parse_summary(marker)
        except ValueError as exc:
            problems.append(Problem("invalid", keys.success, None, f"not a JSON summary: {exc}"))
            summary = {}

    manifest = await get_optional(store, keys.manifest)
    if manifest is None and marker is not None:
        problems.append(Problem("missing", keys.manifest, None, "_SUCCESS is present but the manifest is absent"))
    try:
        records = await stored_records(store, keys, manifest)
    except (ValueError, KeyError, TypeError) as exc:
        problems.append(Problem("invalid", keys.manifest, None, f"a record cannot be parsed: {exc!r}"))
        records = []

    if summary and manifest is not None:
        expected = summary.get("count")
        if isinstance(expected, int) and expected != len(records):
            problems.append(
                Problem(
                    "mismatch",
                    keys.manifest,
                    None,
                    f"_SUCCESS counts {expected} predictions, the manifest lists {len(records)}",
                )
            )
    problems += _duplicates_and_unlisted(records, summary, listing, keys)

    checks: list[RecordCheck] = []
    try:
        await _open_checks(store, records, summary.get("format") if summary else None, keys, checks)
        checked, bytes_read, object_problems = await _check_objects(
            _dispatch(store, checks), records, concurrency, progress, progress_every
        )
    finally:
        for check in checks:
            await check.aclose()
    object_problems += [problem for check in checks for problem in check.problems]
    object_problems.sort(key=lambda p: (id_order(p.id or ""), p.path))
    return None if marker is None else summary, len(records), checked, bytes_read, [*problems, *object_problems]


def _duplicates_and_unlisted(
    records: Sequence[Record], summary: Mapping[str, Any] | None, listing: Sequence[str], keys: ControlKeys
) -> list[Problem]:
    """Ids (and one-per-prediction objects) the manifest lists twice, and objects of the output it does not list.

    What the output owns is known from the marker's format and key template; without them (an incomplete run,
    a format registered only in the writing process) objects are not judged.
    """
    problems = []
    ids = Counter(r.id for r in records)
    for identifier, count in ids.items():
        if count > 1:
            path = next(r.path for r in records if r.id == identifier)
            problems.append(Problem("duplicate", path, identifier, f"the manifest lists this id {count} times"))
    try:
        fmt = get_format(str(summary["format"])) if summary else None
        template = KeyTemplate(str(summary.get("key", "{id}"))) if summary else None
    except (ConfigurationError, KeyError):
        fmt = template = None
    if fmt is None or template is None or not fmt.per_item_objects or fmt.namespace != keys.name:
        return problems
    paths = Counter(r.path for r in records)
    for path, count in paths.items():
        if count > 1:
            problems.append(Problem("duplicate", path, None, f"{count} records list this one object"))
    for key in listing:
        if key not in paths and owned_key(key, fmt, template):
            problems.append(Problem("unlisted", key, None, "an object of this output that the manifest does not list"))
    return problems


async def _check_objects(
    check: Callable[[Record], Awaitable[tuple[Problem | None, int]]],
    records: list[Record],
    concurrency: int,
    progress: ProgressCallback | None,
    progress_every: int,
) -> tuple[int, int, list[Problem]]:
    problems: list[Problem] = []
    total = len(records)
    done = 0
    bytes_read = 0

    async def worker(receive: MemoryObjectReceiveStream[Record]) -> None:
        nonlocal done, bytes_read
        async with receive:
            async for record in receive:
                problem, nbytes = await check(record)
                bytes_read += nbytes
                if problem is not None:
                    problems.append(problem)
                done += 1
                if progress is not None and done % progress_every == 0:
                    progress(done, total)

    # A fixed pool fed through a bounded stream: memory stays flat however many objects the manifest lists.
    send, receive = anyio.create_memory_object_stream[Record](max_buffer_size=concurrency)
    async with anyio.create_task_group() as tg:
        for _ in range(min(concurrency, max(1, total))):
            tg.start_soon(worker, receive.clone())
        receive.close()
        async with send:
            for record in records:
                await send.send(record)
    return done, bytes_read, problems


async def _open_checks(
    store: Store, records: Sequence[Record], name: object, keys: ControlKeys, checks: list[RecordCheck]
) -> None:
    """Ask the output's format how its records are checked (into ``checks``, to be closed by the caller).

    Without a marker naming a format registered here, each registered format of rows (not one object per
    prediction) is asked in turn about the records no earlier one took, and answers for those it recognises from
    what is stored; the rest are checked as objects of their own.
    """
    try:
        formats = None if name is None else [get_format(str(name))]
    except ConfigurationError:  # a format registered only in the process that wrote the output
        formats = None
    if formats is not None:
        check = await formats[0].open_check(store, records, CheckContext(keys.scratch))
        checks.extend([check] if check is not None else [])
        return
    context = CheckContext(keys.scratch, guessed=True)
    left = list(records)
    for fmt in (get_format(n) for n in available_formats()):
        if not fmt.per_item_objects and left:
            check = await fmt.open_check(store, left, context)
            if check is not None:
                checks.append(check)
                left = [r for r in left if not check.covers(r)]


def _dispatch(store: Store, checks: Sequence[RecordCheck]) -> Callable[[Record], Awaitable[tuple[Problem | None, int]]]:
    """One record's check: the first format check that covers it, else as an object of its own."""

    async def check(record: Record) -> tuple[Problem | None, int]:
        for candidate in checks:
            if candidate.covers(record):
                return await candidate.check(record)
        return await _check_one(store, record)

    return check


def _crc32(data: bytes) -> int:
    return crc32(data, 0)


async def _check_one(store: Store, record: Record) -> tuple[Problem | None, int]:
    try:
        validate_identifier(record.path)
        expected_crc = int(record.crc32, 16)
    except (IdentifierError, ValueError) as exc:
        return Problem("invalid", record.path, record.id, f"unusable record: {exc}"), 0
    try:
        data = await store.get(record.path)
    except FileNotFoundError:
        return Problem("missing", record.path, record.id, "recorded in the manifest but absent"), 0
    except OSError as exc:
        return Problem("unreadable", record.path, record.id, f"{type(exc).__name__}: {exc}"), 0
    if len(data) != record.nbytes:
        detail = f"has {len(data)} bytes, the manifest says {record.nbytes}"
        return Problem("size", record.path, record.id, detail), len(data)
    if len(data) >= _THREAD_CRC_BYTES:
        crc = await anyio.to_thread.run_sync(_crc32, data)
    else:
        crc = _crc32(data)
    if crc != expected_crc:
        detail = f"crc32 is {crc:08x}, the manifest says {expected_crc:08x}"
        return Problem("checksum", record.path, record.id, detail), len(data)
    return None, len(data)
