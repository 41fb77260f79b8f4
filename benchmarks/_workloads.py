"""What one benchmark run does, inside its own process: the models, the writers compared, and the measurements.

The orchestrators (:mod:`benchmarks.overlap`, :mod:`benchmarks.memory`) never import torch themselves; they send a
:class:`RunSpec` to a fresh process (see :mod:`benchmarks._runner`), which calls :func:`run` and sends back a
dict of figures. A run's peak RSS is therefore its own.

Variants:
  compute    Trainer.predict with no writer: the accelerator time alone.
  ceiling    raw writes of the same encoded bytes, no Lightning, no sink, at the sink's concurrency: N threads
             writing files, or N tasks calling s3fs's async ``_pipe_file`` on one event loop.
  lighter    Lighter's BaseWriter semantics: on_predict_batch_end writes each prediction synchronously on the
             loop's thread (np.save to a path, or np.save to bytes and fs.pipe for S3).
  lightning  Lightning's BasePredictionWriter(write_interval="batch"), write_on_batch_end doing the same writes.
  sink       lighter_sink.PredictionSink.
  sink-nocopy  the same with copy=False: no copy of each batch at put (the model's outputs are fresh tensors).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import resource
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from benchmarks._spec import CONV_CHANNELS, CONV_SIDE, VARIANTS, RunSpec, Workload
from lighter_sink import PredictionSink

# ---------------------------------------------------------------------------------------------------- models


def sample_values(indices: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """A fresh (len(indices), elements) float32 tensor; row i differs by its index (never all zeros)."""
    return base.unsqueeze(0) + indices.to(torch.float32).unsqueeze(1)


class SleepModel(pl.LightningModule):
    """Outputs of the requested size; the rest of each step is spent asleep, as while a GPU computes."""

    def __init__(self, elements: int, step_s: float) -> None:
        super().__init__()
        self.step_s = step_s
        self.base = torch.linspace(1.0, 2.0, elements)

    def predict_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        deadline = time.perf_counter() + self.step_s
        out = sample_values(batch[0], self.base)
        remaining = deadline - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
        return out


class ConvModel(pl.LightningModule):
    """A small conv net run on the CPU: the writer competes with real compute for the same cores."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, CONV_CHANNELS, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(CONV_CHANNELS, CONV_CHANNELS, 3, padding=1),
        )

    def predict_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        indices = batch[0]
        generator = torch.Generator().manual_seed(int(indices[0]))
        x = torch.randn(len(indices), 3, CONV_SIDE, CONV_SIDE, generator=generator)
        out: torch.Tensor = self.net(x)
        return out


def make_model(workload: Workload) -> pl.LightningModule:
    if workload.model == "conv":
        return ConvModel()
    return SleepModel(workload.elements, workload.step_s)


def make_loader(workload: Workload) -> DataLoader[tuple[torch.Tensor, ...]]:
    return DataLoader(TensorDataset(torch.arange(workload.items)), batch_size=workload.batch, num_workers=0)


# ---------------------------------------------------------------------------------------------------- writers


class ItemWriter:
    """One synchronous write per prediction, as Lighter's FileWriter does: np.save to a path, or to bytes that
    go to S3 in one ``fs.pipe`` (one PUT)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None) -> None:
        if url.startswith("s3://"):
            import fsspec

            self.fs: Any = fsspec.filesystem("s3", skip_instance_cache=True, **(storage_options or {}))
            self.root = url.removeprefix("s3://").rstrip("/")
        else:
            self.fs = None
            self.root = url
            os.makedirs(url, exist_ok=True)
        self.items = 0

    def write(self, identifier: int, tensor: torch.Tensor) -> None:
        array = tensor.detach().cpu().numpy()
        if self.fs is None:
            np.save(os.path.join(self.root, f"{identifier}.npy"), array)
        else:
            buffer = io.BytesIO()
            np.save(buffer, array)
            self.fs.pipe(f"{self.root}/{identifier}.npy", buffer.getvalue())
        self.items += 1


class LighterStyleWriter(Callback):
    """Lighter's BaseWriter: ids from a rank-aware counter, every prediction written in on_predict_batch_end."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None) -> None:
        super().__init__()
        self.url = url
        self.storage_options = storage_options
        self.writer: ItemWriter | None = None
        self.counter = 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict":
            self.writer = ItemWriter(self.url, self.storage_options)
            self.counter = trainer.global_rank

    @override
    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        assert self.writer is not None
        # As Lighter did: drop what Lightning keeps of each batch so host memory stays flat.
        for kept in trainer.predict_loop._predictions:
            kept.clear()
        for prediction in outputs:
            self.writer.write(self.counter, prediction)
            self.counter += trainer.world_size


class LightningWriter(BasePredictionWriter):
    """Lightning's own hook for writing predictions, doing the same synchronous writes per item."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None) -> None:
        super().__init__(write_interval="batch")
        self.url = url
        self.storage_options = storage_options
        self.writer: ItemWriter | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict":
            self.writer = ItemWriter(self.url, self.storage_options)

    @override
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        assert self.writer is not None
        indices = batch_indices if batch_indices is not None else [int(i) for i in batch[0]]
        for index, item in zip(indices, prediction, strict=True):
            self.writer.write(int(index), item)


class HookTimer(Callback):
    """Times ``on_predict_batch_end`` of the class it is mixed into: how long the predict loop waits on it."""

    def __init__(self, *args: Any, rss_every: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stalls: list[float] = []
        self.last_end = 0.0
        self.rss_every = rss_every
        self.rss_trace: list[tuple[int, float]] = []
        self.items = 0

    @override
    def on_predict_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any
    ) -> None:
        started = time.perf_counter()
        super().on_predict_batch_end(trainer, pl_module, outputs, *args)
        self.last_end = time.perf_counter()
        self.stalls.append(self.last_end - started)
        self.items += len(outputs)
        if self.rss_every and len(self.stalls) % self.rss_every == 0:
            self.rss_trace.append((self.items, current_rss_mib()))


class TimedLighter(HookTimer, LighterStyleWriter):
    pass


class TimedLightning(HookTimer, LightningWriter):
    pass


class TimedSink(HookTimer, PredictionSink):
    pass


class TimedNothing(HookTimer):
    """No writer at all: the hook's own cost, and RSS samples for the compute-only runs."""


# ---------------------------------------------------------------------------------------------------- measuring


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(np.ceil(q * len(ordered))) - 1))]


def _quiet() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _callback(spec: RunSpec) -> HookTimer:
    every = spec.rss_every
    if spec.variant == "compute":
        return TimedNothing(rss_every=every)
    if spec.variant == "lighter":
        return TimedLighter(spec.url, spec.storage_options, rss_every=every)
    if spec.variant == "lightning":
        return TimedLightning(spec.url, spec.storage_options, rss_every=every)
    if spec.variant in {"sink", "sink-nocopy"}:
        kwargs: dict[str, Any] = {
            "storage_options": spec.storage_options,
            "concurrency": spec.concurrency,
            "backend": spec.backend,
            "copy": spec.variant == "sink",
        }
        if spec.max_queue_bytes is not None:
            kwargs["max_queue_bytes"] = spec.max_queue_bytes
        return TimedSink(spec.url, rss_every=every, **kwargs)
    raise ValueError(f"unknown variant {spec.variant!r}; known: {', '.join(VARIANTS)}")


def _predict(spec: RunSpec) -> dict[str, Any]:
    workload = spec.workload
    model = make_model(workload)
    callback = _callback(spec)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[callback],
    )
    loader = make_loader(workload)
    started = time.perf_counter()
    trainer.predict(model, loader, return_predictions=False)
    finished = time.perf_counter()
    result: dict[str, Any] = {
        "wall_s": finished - started,
        "rss_after_mib": current_rss_mib(),  # after the writer flushed (and the sink committed)
        # after the last batch left the hook: the writer finishing what it holds (flush and commit for the sink)
        "tail_s": finished - callback.last_end if callback.last_end else None,
        "batches": len(callback.stalls),
        "stall_p50_ms": _ms(percentile(callback.stalls, 0.5)),
        "stall_p99_ms": _ms(percentile(callback.stalls, 0.99)),
        "stall_max_ms": _ms(max(callback.stalls, default=None)),
        "stall_total_s": sum(callback.stalls),
        "rss_trace": callback.rss_trace,
    }
    if isinstance(callback, TimedSink):
        sink = callback.sink
        assert sink is not None
        stats = sink.stats.as_dict()
        result["sink_stats"] = stats
        result["stored"] = stats["items"]
        result["queue_high_water_mib"] = stats["queue_high_water_bytes"] / 2**20
    elif isinstance(callback, LighterStyleWriter | LightningWriter):
        assert callback.writer is not None
        result["stored"] = callback.writer.items
    return result


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def encoded_items(workload: Workload) -> list[bytes]:
    """The ``.npy`` bytes of every prediction, as the writers store them (contents aside, same sizes)."""
    base = torch.linspace(1.0, 2.0, int(np.prod(workload.item_shape)))
    out = []
    for start in range(0, workload.items, workload.batch):
        indices = torch.arange(start, min(start + workload.batch, workload.items))
        for row in sample_values(indices, base):
            buffer = io.BytesIO()
            np.save(buffer, row.reshape(workload.item_shape).numpy())
            out.append(buffer.getvalue())
    return out


def _ceiling(spec: RunSpec) -> dict[str, Any]:
    payloads = encoded_items(spec.workload)
    if spec.url.startswith("s3://"):
        root = spec.url.removeprefix("s3://").rstrip("/")
        seconds = asyncio.run(_s3_ceiling(root, spec.storage_options or {}, payloads, spec.concurrency))
    else:
        seconds = local_ceiling(spec.url, payloads, spec.concurrency)
    return {"wall_s": seconds, "stored": len(payloads)}


def local_ceiling(directory: str, payloads: list[bytes], threads: int) -> float:
    os.makedirs(directory, exist_ok=True)

    def write(index: int) -> None:
        with open(os.path.join(directory, f"{index}.npy"), "wb") as f:
            f.write(payloads[index])

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(write, range(len(payloads))):
            pass
    return time.perf_counter() - started


async def _s3_ceiling(root: str, options: dict[str, Any], payloads: list[bytes], tasks: int) -> float:
    """Seconds for a fresh client to PUT every payload: its start-up (~0.3 s of botocore loading its models in a
    new process) included, since every writer compared with this one pays it inside its own wall time."""
    import s3fs

    started = time.perf_counter()
    # the same connection pool the sink configures: botocore's default of 10 would cap the concurrency
    config = {"max_pool_connections": max(10, tasks + 4)}
    fs = s3fs.S3FileSystem(asynchronous=True, skip_instance_cache=True, config_kwargs=config, **options)
    client = await fs.set_session()
    try:
        todo = iter(enumerate(payloads))

        async def worker() -> None:
            for index, data in todo:  # one iterator shared by every task of this loop
                await fs._pipe_file(f"{root}/{index}.npy", data)

        await asyncio.gather(*(worker() for _ in range(tasks)))
        return time.perf_counter() - started
    finally:
        await client.close()


def run(spec: RunSpec) -> dict[str, Any]:
    """Run one variant in this process; the figures include this process's peak RSS and CPU time."""
    _quiet()
    rss_start = current_rss_mib()
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = _ceiling(spec) if spec.variant == "ceiling" else _predict(spec)
    after = resource.getrusage(resource.RUSAGE_SELF)
    result.update(
        rss_start_mib=rss_start,
        rss_peak_mib=after.ru_maxrss / 1024,  # KiB on Linux
        cpu_s=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
    )
    return result
