"""A plain PyTorch inference loop (no Lightning) writing through Sink.

    python examples/torch_loop.py [OUTPUT_DIR]      # default: ./predictions-loop

The sink encodes and writes in the background while the loop computes the next batch; leaving the `with` block
flushes and writes _manifest.jsonl and _SUCCESS (an exception inside the block commits nothing).
"""

from __future__ import annotations

import json
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lighter_sink import Sink


def main() -> None:
    output = sys.argv[1] if len(sys.argv) > 1 else "./predictions-loop"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1)).eval()
    images = torch.rand(200, 1, 32, 32)
    names = [f"scan-{i:04d}" for i in range(len(images))]
    loader = DataLoader(TensorDataset(torch.arange(len(images)), images), batch_size=25)

    with Sink(output, format="npy") as sink, torch.inference_mode():
        for indices, batch in loader:
            # Any ids will do: here a name per sample, so the objects are scan-0000.npy, scan-0001.npy, ...
            sink.put_batch([names[i] for i in indices.tolist()], model(batch).squeeze(1))

    print(f"wrote {sink.stats.items} predictions ({sink.stats.bytes / 1e6:.1f} MB) to {output}")
    print(f"stalled {sink.stats.stall_seconds * 1000:.1f} ms waiting for storage")
    with open(f"{output}/_SUCCESS") as f:
        print(f"_SUCCESS: {json.load(f)['count']} predictions committed")


if __name__ == "__main__":
    main()
