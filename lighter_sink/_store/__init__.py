"""Storage: an fsspec url turned into a small async API (put, get, list, delete) with bounded retries.

The store puts bytes and knows nothing of tensors. One backend per module, behind one base class; modules
import only downwards::

    _open       open_store: url -> backend, the only module that knows them all
     ├── _local      a local directory: atomic, fenced, durable writes   (-> _files: system calls)
     ├── _fsspec     async fsspec (s3fs, gcsfs) on the loop, others in threads   (-> _s3: client options, delete)
     │    └── _uploader   S3 puts made by an upload process (-> _upload_process: that process's side)
     └── _obstore    S3 through obstore (Rust)
    _multipart  open_output streamed in parts: S3 multipart and GCS resumable uploads, obstore's writer
    _base       Store (the contract, its capability flags) and RetryPolicy   (-> _retry: what is transient;
                _deadline: the timeout of each attempt)
    _urls       what a url names, whether a local destination can be used
"""

from lighter_sink._store._base import RetryPolicy, Store
from lighter_sink._store._local import TEMP_PREFIX
from lighter_sink._store._open import open_store
from lighter_sink._store._retry import DeleteError, is_transient
from lighter_sink._store._s3 import s3_options
from lighter_sink._store._urls import check_local_destination, is_local_url, local_path, protocol_of

__all__ = [
    "TEMP_PREFIX",
    "DeleteError",
    "RetryPolicy",
    "Store",
    "check_local_destination",
    "is_local_url",
    "is_transient",
    "local_path",
    "open_store",
    "protocol_of",
    "s3_options",
]
