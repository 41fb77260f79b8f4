"""From a url to the backend that serves it: the one place that knows every backend.

Local directories get :class:`~._local.LocalStore`; ``backend="obstore"`` on S3 gets obstore's store; async
fsspec filesystems (s3fs, gcsfs) are created inside the caller's event loop, which owns them; other fsspec
filesystems are driven from worker threads. ``gs://`` gets gcsfs's plain filesystem class, whatever fsspec's
registry names (see :func:`_gcs_filesystem`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any

import anyio
import anyio.to_thread
import fsspec
from fsspec.core import url_to_fs

from lighter_sink._store._base import RetryPolicy, Store
from lighter_sink._store._fsspec import AsyncFsStore, ThreadFsStore
from lighter_sink._store._local import TEMP_PREFIX, LocalStore
from lighter_sink._store._obstore import open_obstore
from lighter_sink._store._s3 import s3_options
from lighter_sink._store._uploader import UploadingStore, usable
from lighter_sink._store._urls import is_local_url, local_path, protocol_of

__all__ = ["open_store"]

GCS_PROTOCOLS = ("gs", "gcs")


def _gcs_filesystem(url: str, options: dict[str, Any], loop: asyncio.AbstractEventLoop) -> tuple[Any, str]:
    """gcsfs's plain ``GCSFileSystem`` for a ``gs://`` url, and the url's path; chosen, not looked up.

    What fsspec's registry gives for ``gs`` depends on the environment: from gcsfs 2026 on, unless
    ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` is false, it is gcsfs's ``ExtendedGcsFileSystem``, which asks the
    storage-control gRPC API for each bucket's layout before it uploads, reads, lists or deletes, caches no
    failed answer, and waits up to a minute on each: every operation, against an emulator (which has no such
    API) or for an account that may not read the bucket's layout. The store needs only the JSON API's object
    calls (one-request uploads, ``ifGenerationMatch=0`` creates, reads, listings, deletes), which serve flat
    and hierarchical-namespace buckets alike (zonal, Rapid storage, buckets are another matter: gcsfs writes
    to them through that class's gRPC path only).
    """
    from gcsfs.core import GCSFileSystem  # (after fsspec's lookup, whose ImportError says to install gcsfs)

    kwargs = {**GCSFileSystem._get_kwargs_from_urls(url), **options}
    fs = GCSFileSystem(asynchronous=True, skip_instance_cache=True, loop=loop, **kwargs)
    return fs, fs._strip_protocol(url)


async def open_store(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    concurrency: int = 16,
    retry: RetryPolicy | None = None,
    backend: str = "fsspec",
    upload_checksums: bool = True,
    temp_prefix: str = TEMP_PREFIX,
    run: str | None = None,
    durable: bool = True,
    upload_process: bool = False,
) -> Store:
    """Open the store for ``url``. Must run inside the event loop that will use the store.

    ``backend`` is ``"fsspec"`` (every protocol) or ``"obstore"`` (S3 only; see :mod:`._obstore`).
    ``upload_checksums`` has the server verify each upload body: on S3 through s3fs with the CRC-32 a caller
    passes to :meth:`Store.put` (botocore computes its own CRC32 for bodies that come without one).
    Local directories only: temporary files are named ``{temp_prefix}{run}.{n}.tmp`` (``run``: unique per
    process; a fresh one when None), and ``durable`` fsyncs control objects and lets :meth:`Store.sync` make
    the rest durable. ``upload_process``: on S3 through s3fs, :meth:`Store.put` is made by a process of its own
    (see :mod:`._uploader`), where the storage options can be passed to one.
    """
    retry = retry or RetryPolicy()
    options = dict(storage_options or {})
    if backend == "obstore" and not is_local_url(url):
        return open_obstore(url, options, retry, upload_checksums)
    limiter = anyio.CapacityLimiter(concurrency)
    if is_local_url(url):
        # Writes to one local directory contend on the directory lock and, for small files, on the GIL: more
        # threads than cores only add switching, and the caller's thread (the predict loop) and the event loop
        # need a core of their own: on 2 cores a second writer halved the tiny predictions stored per second.
        threads = min(concurrency, max(1, (os.cpu_count() or 2) - 1))
        limiter = anyio.CapacityLimiter(threads)
        return LocalStore(url, retry, local_path(url), limiter, temp_prefix=temp_prefix, run=run, durable=durable)
    protocol = protocol_of(url)
    cls = fsspec.get_filesystem_class(protocol)
    if getattr(cls, "async_impl", False):
        s3 = protocol in ("s3", "s3a")
        # (the caller's options stay as given: the upload process completes them for its own client)
        fs_options = s3_options(options, concurrency, retry, upload_checksums) if s3 else options
        if protocol in GCS_PROTOCOLS:
            fs, root = _gcs_filesystem(url, fs_options, asyncio.get_running_loop())
        else:
            fs, root = url_to_fs(
                url, asynchronous=True, skip_instance_cache=True, loop=asyncio.get_running_loop(), **fs_options
            )
        if s3:
            fs.retries = 1  # s3fs's own retry loop; ours decides
        if s3 and upload_process and usable(options):
            config = {
                "url": url,
                "storage_options": options,
                "concurrency": concurrency,
                "retry": retry,
                "upload_checksums": upload_checksums,
            }
            store: AsyncFsStore = UploadingStore(
                url, retry, fs, root, limiter, s3_crc32=upload_checksums, s3=True, config=config
            )
        else:
            store = AsyncFsStore(url, retry, fs, root, limiter, s3_crc32=s3 and upload_checksums, s3=s3)
        try:
            await store.connect()
        except BaseException:
            await store.aclose()  # (what it opened before it failed)
            raise
        return store
    fs, root = await anyio.to_thread.run_sync(lambda: url_to_fs(url, **options))
    return ThreadFsStore(url, retry, fs, root, limiter)
