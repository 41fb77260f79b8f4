"""Which failures are worth another attempt: the one place that classifies storage errors.

Every backend retries (or lets its client retry) only what :func:`is_transient` accepts, so the classification
lives here once. It looks at exception types, HTTP statuses and service error codes, never at message text.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping

__all__ = ["DeleteError", "is_transient"]

# HTTP statuses and S3/GCS error codes that mean "try again", per AWS's and Google's retry guidance.
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "BandwidthLimitExceeded",
        "500",
        "502",
        "503",
        "504",
    }
)
_TRANSIENT_ERRNOS = frozenset(
    {errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE, errno.EAGAIN}
)


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [TimeoutError, ConnectionError]
    try:
        from botocore import exceptions as botocore_exceptions

        types += [botocore_exceptions.HTTPClientError, botocore_exceptions.ConnectionError]
    except ImportError:  # the s3 extra is not installed
        pass
    try:
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ServerTimeoutError]
    except ImportError:
        pass
    return tuple(types)


_TRANSIENT_TYPES = _transient_types()


def _status_and_code(exc: BaseException) -> tuple[int | None, str | None]:
    # botocore's ClientError keeps the parsed response; aiohttp/gcsfs errors carry .status or .code.
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        error = response.get("Error", {}) or {}
        meta = response.get("ResponseMetadata", {}) or {}
        status = meta.get("HTTPStatusCode")
        return (status if isinstance(status, int) else None), error.get("Code")
    status = getattr(exc, "status", None)
    if not isinstance(status, int):
        code_attr = getattr(exc, "code", None)
        status = code_attr if isinstance(code_attr, int) else None
    return status, None


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is worth retrying.

    Transient: timeouts, connection resets, throttling (``SlowDown``, 429) and server errors (5xx). Permanent:
    everything else, such as missing buckets, denied access or a full disk, which retrying cannot fix.
    Classification uses exception types, HTTP statuses and service error codes, never message text.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _TRANSIENT_TYPES):
            return True
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        status, code = _status_and_code(current)
        if (code is not None and code in _TRANSIENT_CODES) or (status is not None and status in _TRANSIENT_STATUS):
            return True
        current = current.__cause__ or current.__context__
    return False


class DeleteError(OSError):
    """Objects a bulk delete refused; ``response`` carries the service's code, as botocore's errors do."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.response = {"Error": {"Code": code}}
