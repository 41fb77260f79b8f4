"""Write predictions to S3 or any S3-compatible server (MinIO, Ceph, R2, ...).

    export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...   # read by s3fs/botocore, as usual
    export AWS_ENDPOINT_URL=http://127.0.0.1:9000            # optional: an S3-compatible server
    python examples/s3_endpoint.py s3://my-bucket/run-1/preds

Credentials stay in the environment (or ~/.aws, an instance role, ...); only the endpoint is passed on as a
storage option. Check the output afterwards with
`lighter-sink verify s3://my-bucket/run-1/preds --storage-option endpoint_url=$AWS_ENDPOINT_URL`.
"""

from __future__ import annotations

import os
import sys

import torch

from lighter_sink import Sink


def main() -> None:
    if len(sys.argv) != 2 or not sys.argv[1].startswith("s3://"):
        sys.exit("usage: python examples/s3_endpoint.py s3://BUCKET/PREFIX")
    url = sys.argv[1]
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    storage_options = {"endpoint_url": endpoint} if endpoint else {}

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3).eval()
    with Sink(url, format="npy", storage_options=storage_options) as sink, torch.inference_mode():
        for start in range(0, 100, 25):
            batch = torch.randn(25, 8)
            sink.put_batch(range(start, start + 25), model(batch))

    print(f"wrote {sink.stats.items} predictions to {url} at {sink.stats.mb_per_second:.2f} MB/s")
    print(f"retried {sink.stats.retries} transient errors")


if __name__ == "__main__":
    main()
