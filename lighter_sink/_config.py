"""One configuration for every entry point: :class:`~lighter_sink.Sink`, ``PredictionSink`` and the Lighter classes.

Each option is declared once, as a field of :class:`SinkConfig` (documented and checked there), and taken as a
keyword by every entry point through :class:`SinkOptions` (``**options: Unpack[SinkOptions]``), which a test keeps
equal to the fields. A bad value fails at construction, before any compute, with what was expected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal, TypedDict

from lighter_sink._errors import ConfigurationError
from lighter_sink._ids import KeyTemplate
from lighter_sink._store import RetryPolicy, protocol_of
from lighter_sink.formats import Format, get_format

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_MAX_QUEUE_BYTES",
    "Backend",
    "Mode",
    "SinkConfig",
    "SinkOptions",
]

Mode = Literal["overwrite", "resume", "error"]
Backend = Literal["fsspec", "obstore"]
MODES: tuple[Mode, ...] = ("overwrite", "resume", "error")
BACKENDS: tuple[Backend, ...] = ("fsspec", "obstore")
OBSTORE_PROTOCOLS = ("s3", "s3a")  # what backend="obstore" opens (lighter_sink._store._obstore)
DEFAULT_MAX_QUEUE_BYTES = 512 * 2**20
DEFAULT_CONCURRENCY = 16


class SinkOptions(TypedDict, total=False):
    """The keyword options every entry point takes; each is a field of :class:`SinkConfig`, documented there."""

    storage_options: Mapping[str, Any] | None
    max_queue_bytes: int
    concurrency: int
    retries: int
    timeout: float | None
    mode: Mode
    key: str
    backend: Backend
    upload_checksums: bool
    durable: bool
    num_samples: int | None
    copy: bool
    shard_bytes: int | None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SinkConfig:
    """The checked options of one sink.

    Attributes:
        format: a registered format name (``"npy"``, ``"pt"``, ...) or a :class:`~lighter_sink.formats.Format`;
            held as the format itself.
        storage_options: passed to fsspec (credentials, ``endpoint_url``); never logged nor shown in reprs.
        max_queue_bytes: host bytes queued before ``put`` blocks (a single larger batch is still accepted); ``put``
            also blocks while 131,072 predictions are queued, whatever their bytes (their ids are not counted).
        concurrency: writes in flight at once.
        retries: attempts per object for transient errors (throttling, 5xx, resets, timeouts), the first included.
        timeout: seconds one write attempt may take; with ``retries`` it bounds how long a dead store stalls.
        mode: ``"overwrite"`` replaces a previous run's output; ``"error"`` refuses a url that holds anything;
            ``"resume"`` keeps what the resumed run stored and skips ids whose object it recorded.
        key: object key template: ``{id}`` and ``{hash}`` fields (``"{id:08d}"``, ``"{hash:.2}/{id}"``); the
            object of an id is ``{url}/{key}{extension}``.
        backend: ``"fsspec"`` (any url) or ``"obstore"`` (S3 through the Rust object_store client: several
            times fewer CPU cycles per request; ``pip install 'lighter-sink[obstore]'``).
        upload_checksums: have the server verify each upload body. On S3 through s3fs the manifest's CRC-32 is
            sent as the object's checksum (no extra client work); through obstore, obstore's SHA-256. Off, none
            is sent; the manifest's crc32 still lets ``lighter-sink verify`` check every object.
        durable: on local and mounted filesystems, make objects, manifest parts and the manifest durable (synced
            to disk) before ``_SUCCESS`` is written, so that a power loss cannot leave a marker over empty files.
            ``False`` skips the syncs, for scratch space. Object stores are durable once a write is answered.
        num_samples: number of samples in the run, for formats that size their output up front (``zarr``);
            ``PredictionSink`` takes it from the predict dataset's length.
        copy: copy CPU tensors and numpy arrays at ``put`` (CUDA tensors on the device), so that the caller may
            reuse or change them once ``put`` returns (output buffers, ``out=``, CUDA graphs). ``False`` saves
            the copy (0.1-0.3 ms per MiB on the caller's thread) for callers that never touch a buffer after
            putting it; one that does gets its later values stored.
        shard_bytes: formats that pack predictions into shards (``"tar"``, ``"parquet"``): the size at which a
            rank closes its shard and starts the next (a shard ends at the first prediction that reaches it);
            ``None`` is the format's default (256 MiB). Other formats refuse it.

    Raises:
        ConfigurationError: a value of the wrong type or out of range, naming what was expected.
        MissingDependencyError: the format needs a package that is not installed, naming the extra to install.
    """

    format: Format
    storage_options: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES
    concurrency: int = DEFAULT_CONCURRENCY
    retries: int = 5
    timeout: float | None = 60.0
    mode: Mode = "overwrite"
    key: str = "{id}"
    backend: Backend = "fsspec"
    upload_checksums: bool = True
    durable: bool = True
    num_samples: int | None = None
    copy: bool = True
    shard_bytes: int | None = None

    def __post_init__(self) -> None:
        self.format.require()  # a missing extra fails here, before any compute, not at the first batch
        options: object = self.storage_options
        if options is None:
            options = {}
        elif not isinstance(options, Mapping):
            raise ConfigurationError(f"storage_options must be a mapping, got {type(options).__name__}")
        object.__setattr__(self, "storage_options", dict(options))
        if self.num_samples is not None and (not isinstance(self.num_samples, int) or self.num_samples < 0):
            raise ConfigurationError(f"num_samples must be an int >= 0 or None, got {self.num_samples!r}")
        if not isinstance(self.max_queue_bytes, int) or self.max_queue_bytes < 1:
            raise ConfigurationError(f"max_queue_bytes must be a positive int, got {self.max_queue_bytes!r}")
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ConfigurationError(f"concurrency must be a positive int, got {self.concurrency!r}")
        if not isinstance(self.retries, int) or self.retries < 1:
            raise ConfigurationError(f"retries must be an int >= 1 (attempts per object), got {self.retries!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigurationError(f"timeout must be > 0 seconds or None, got {self.timeout!r}")
        if self.mode not in MODES:
            raise ConfigurationError(f"mode must be one of {', '.join(map(repr, MODES))}, got {self.mode!r}")
        if self.backend not in BACKENDS:
            raise ConfigurationError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {self.backend!r}")
        KeyTemplate(self.key)  # a malformed template fails here, naming what is wrong
        if self.shard_bytes is not None:
            if not self.format.packs_shards:
                raise ConfigurationError(
                    f"shard_bytes applies to formats that pack predictions into shards ('tar', 'parquet'); "
                    f"format {self.format.name!r} writes otherwise"
                )
            if type(self.shard_bytes) is not int or self.shard_bytes < 1:
                raise ConfigurationError(f"shard_bytes must be a positive int or None, got {self.shard_bytes!r}")
        if self.format.packs_shards and self.key != "{id}":
            raise ConfigurationError(
                f"format {self.format.name!r} names each prediction in its shard by its id; key={self.key!r} "
                "applies to one object per prediction"
            )
        for name in ("upload_checksums", "durable", "copy"):
            object.__setattr__(self, name, bool(getattr(self, name)))

    @classmethod
    def of(cls, format: str | Format, options: Mapping[str, Any]) -> SinkConfig:
        """The configuration of ``format`` and the keyword ``options`` of an entry point.

        Raises:
            ConfigurationError: an unknown option (the known ones are listed) or a bad value.
            FormatNotFoundError: an unknown format name (the known ones are listed).
        """
        unknown = sorted(set(options) - OPTION_NAMES)
        if unknown:
            raise ConfigurationError(
                f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; the options are "
                f"{', '.join(sorted(OPTION_NAMES))}"
            )
        return cls(format=get_format(format), **options)

    def check_url(self, url: str) -> None:
        """Refuse a ``backend`` that cannot serve ``url`` here, at construction, rather than ignore it or fail at open.

        Raises:
            ConfigurationError: ``backend="obstore"`` with a url that is not on S3 (a local path, say).
        """
        if self.backend == "obstore" and protocol_of(url) not in OBSTORE_PROTOCOLS:
            raise ConfigurationError(
                f"backend='obstore' serves S3 urls (s3:// urls), got {url!r}; use backend='fsspec' (the default) for it"
            )

    def replace(self, **changes: Any) -> SinkConfig:
        """A copy with ``changes`` applied and checked."""
        return dataclasses.replace(self, **changes)

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(attempts=self.retries, timeout=self.timeout)

    @property
    def key_template(self) -> KeyTemplate:
        return KeyTemplate(self.key)


OPTION_NAMES = frozenset(SinkOptions.__annotations__)
