"""A prediction job run as a real process by the distributed and crash tests.

``python tests/_job.py URL --devices 2`` runs Lightning's ``ddp`` strategy on the CPU (gloo): Lightning starts
rank 1 by running this script again. Options make a rank fail, or kill the process hard mid-run; ``--format``
picks the sink's format, and ``--summarise`` makes the model return ``[mean, max]`` per image (for tables).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lighter_sink import PredictionSink, remaining
from lighter_sink._demo import DemoModel, SyntheticImages


class JobModel(DemoModel):
    def __init__(
        self, fail_rank: int | None, fail_batch: int | None, exit_batch: int | None, summarise: bool = False
    ) -> None:
        super().__init__()
        self.fail_rank = fail_rank
        self.fail_batch = fail_batch
        self.exit_batch = exit_batch
        self.summarise = summarise
        self.computed = 0

    def predict_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        if self.exit_batch is not None and batch_idx == self.exit_batch:
            os._exit(17)  # a hard kill: no hook, no flush, no atexit
        if self.fail_batch is not None and batch_idx == self.fail_batch and self.global_rank == self.fail_rank:
            raise RuntimeError(f"rank {self.global_rank} failed on purpose")
        self.computed += len(batch)
        out = super().predict_step(batch, batch_idx, dataloader_idx)
        return summarise(out) if self.summarise else out


def summarise(images: torch.Tensor) -> torch.Tensor:
    """``[mean, max]`` of each image: a small vector per sample, what a table holds."""
    return torch.stack([images.mean(dim=(1, 2)), images.amax(dim=(1, 2))], dim=1)


class Data(pl.LightningDataModule):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args

    def predict_dataloader(self) -> Any:
        dataset = SyntheticImages(self.args.n, size=self.args.size)
        if self.args.skip_done:
            dataset = remaining(self.args.url, dataset, storage_options=_options(self.args))  # type: ignore[assignment]
        sampler = DistributedSampler(dataset, shuffle=False) if self.args.padding_sampler else None
        return DataLoader(dataset, batch_size=self.args.batch_size, sampler=sampler)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return json.loads(args.storage_options) if args.storage_options else {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--n", type=int, default=1001)
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=7)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--mode", default="overwrite")
    parser.add_argument("--storage-options", default="")
    parser.add_argument("--fail-rank", type=int)
    parser.add_argument("--fail-batch", type=int)
    parser.add_argument("--exit-batch", type=int)
    parser.add_argument("--padding-sampler", action="store_true")
    parser.add_argument("--skip-done", action="store_true", help="compute only what remaining() returns")
    parser.add_argument("--report", help="file where rank 0 writes its sink statistics as JSON")
    parser.add_argument("--format", default="npy", help="the sink's format (npy, zarr, csv, ...)")
    parser.add_argument("--shard-bytes", type=int, help="for the formats that pack shards (tar, parquet)")
    parser.add_argument("--summarise", action="store_true", help="predict [mean, max] per image instead of images")
    args = parser.parse_args()

    sink = PredictionSink(
        args.url,
        format=args.format,
        mode=args.mode,
        storage_options=_options(args),
        max_queue_bytes=64 * 2**10,
        shard_bytes=args.shard_bytes,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        callbacks=[sink],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=not args.padding_sampler,
    )
    model = JobModel(args.fail_rank, args.fail_batch, args.exit_batch, args.summarise)
    trainer.predict(model, datamodule=Data(args), return_predictions=False)
    if args.report and trainer.is_global_zero:
        assert sink.sink is not None
        report = {**sink.sink.stats.as_dict(), "computed": model.computed}
        Path(args.report).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
