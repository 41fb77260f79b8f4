"""S3 through s3fs: the client options that give the sink's retry policy sole control, and the bulk delete.

botocore and s3fs each retry and time out on their own, under the sink's own retries; these options turn theirs
off and size the connection pool to the sink's concurrency. Here too: DeleteObjects, whose answer must be read
key by key (S3 answers 200 even when keys were refused).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Mapping, MutableSet, Sequence
from typing import Any

from lighter_sink._store._base import Retrying, RetryPolicy
from lighter_sink._store._retry import DeleteError

logger = logging.getLogger(__name__)

__all__ = ["S3_DELETE_BATCH", "S3_SINGLE_PUT", "abort_s3_uploads", "delete_objects", "s3_options"]

# DeleteObjects takes at most 1,000 keys per request.
S3_DELETE_BATCH = 1000
# s3fs's _pipe_file sends one PUT below twice its 50 MiB chunk size, a multipart upload from there on.
S3_SINGLE_PUT = 100 * 2**20


def s3_options(options: dict[str, Any], concurrency: int, retry: RetryPolicy, upload_checksums: bool) -> dict[str, Any]:
    """s3fs's storage options, completed with the client configuration the sink's policy needs.

    Options the caller set win (``setdefault``); the caller's dict is not changed.
    """
    # botocore's pool of 10 connections silently caps concurrency, and botocore (5 attempts) and s3fs
    # (5 retries) stack their own retries under ours: give the sink's policy sole control of retries and time.
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("max_pool_connections", max(10, concurrency + 4))
    # (botocore's max_attempts counts retries after the first try; total_max_attempts counts every try)
    config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
    # botocore checksums every PUT body (CRC32) by default, a CPU cost per byte on the event loop's thread. The
    # sink's own objects come with their CRC-32 and skip it; the rest (parts, manifest, marker) are small.
    config.setdefault("request_checksum_calculation", "when_supported" if upload_checksums else "when_required")
    # What the sink reads back it checks against its own records (the manifest's CRC-32), and servers such as rclone
    # and Ceph answer a ranged GET with the whole object's checksum, which botocore would compare with the range.
    config.setdefault("response_checksum_validation", "when_required")
    if upload_checksums and _is_https(options):
        # botocore skips hashing a body for the signature over TLS only when it computed the checksum header
        # itself; for a header the caller provides it would SHA-256 every body on the loop. Over TLS the signed
        # CRC-32 header and TLS's own integrity make that hash redundant (what botocore does with its own
        # checksums); plain http keeps the signed payload hash, as botocore does there.
        s3_config = dict(config.get("s3") or {})
        s3_config.setdefault("payload_signing_enabled", False)
        config["s3"] = s3_config
    if retry.timeout is not None:
        config.setdefault("connect_timeout", min(10.0, retry.timeout))
        config.setdefault("read_timeout", retry.timeout)
    return {**options, "config_kwargs": config}


def _is_https(options: Mapping[str, Any]) -> bool:
    """Whether an s3fs client with these options talks TLS (AWS's default endpoints do)."""
    client_kwargs = options.get("client_kwargs") or {}
    endpoint = options.get("endpoint_url") or client_kwargs.get("endpoint_url")
    if endpoint:
        return str(endpoint).lower().startswith("https://")
    return bool(options.get("use_ssl", client_kwargs.get("use_ssl", True)))


async def delete_objects(fs: Any, paths: Sequence[str], url: str) -> None:
    """One DeleteObjects request through the s3fs filesystem ``fs``, every per-key error checked.

    Raises:
        DeleteError: S3 refused some keys (missing ones are not refused); it names how many and the first.
    """
    bucket = fs.split_path(paths[0])[0]
    objects = [{"Key": fs.split_path(p)[1]} for p in paths]
    out = await fs._call_s3("delete_objects", Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
    fs.invalidate_cache()
    errors = [e for e in out.get("Errors", []) if e.get("Code") != "NoSuchKey"]
    if errors:
        first = errors[0]
        raise DeleteError(
            f"{len(errors)} of {len(paths)} objects could not be deleted from {url}, for example "
            f"{first.get('Key')!r}: {first.get('Code')}: {first.get('Message', '')}",
            code=str(first.get("Code")),
        )


async def abort_s3_uploads(fs: Any, root: str, retrying: Retrying, keep: MutableSet[str]) -> int:
    """Abort the multipart uploads under ``root`` (``bucket/prefix``) but those in ``keep``; return how many.

    What a killed run left: parts S3 stores and bills until the upload is aborted, and never shows. Best effort:
    they are never read, so a store that cannot list them (rclone answers ``NoSuchUpload`` when there is none, a
    policy may not grant ``s3:ListBucketMultipartUploads``) leaves them to the bucket's lifecycle rule rather than
    failing the run.
    """
    bucket, prefix, _ = fs.split_path(root)
    prefix = f"{prefix.rstrip('/')}/" if prefix else ""
    markers: dict[str, str] = {}
    found: list[tuple[str, str]] = []
    while True:
        try:
            page = await retrying(
                "listing incomplete uploads",
                functools.partial(fs._call_s3, "list_multipart_uploads", Bucket=bucket, Prefix=prefix, **markers),
            )
        except OSError as exc:
            logger.info("cannot list the incomplete uploads under s3://%s/%s (%r); leaving them", bucket, prefix, exc)
            break
        found += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", []) if u["UploadId"] not in keep]
        if not page.get("IsTruncated"):
            break
        markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}
    for key, upload_id in found:
        abort = functools.partial(fs._call_s3, "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
        with contextlib.suppress(FileNotFoundError):  # (aborted meanwhile)
            await retrying(key, abort)
    return len(found)
