"""PredictionSink: the Lightning callback. It knows Lightning and hands batches to a :class:`Sink`."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Unpack

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lighter_sink._config import SinkOptions
from lighter_sink._errors import ConfigurationError, DestinationError, PredictionError
from lighter_sink._ids import CounterIds, RankCounter, as_id_list
from lighter_sink._resume import RemainingSubset
from lighter_sink._sink import Sink
from lighter_sink._staging import count_samples
from lighter_sink._store import check_local_destination, is_local_url, local_path
from lighter_sink.formats import Format, get_format

__all__ = ["PredictionSink"]

logger = logging.getLogger(__name__)
_PROGRESS_EVERY = 0.5  # seconds between progress-bar updates


class PredictionSink(Callback):
    """Write every prediction of ``Trainer.predict`` to ``url`` without making the predict loop wait.

    Each batch's predictions are detached, copied to host memory and queued; workers encode and write them
    while the model computes the next batches. At the end of predict every rank flushes, and rank 0 writes
    ``_manifest.jsonl`` and ``_SUCCESS`` once every rank succeeded. Use ``return_predictions=False`` in
    ``trainer.predict`` so Lightning does not also keep every prediction in memory.

    Args:
        url: a local directory or an fsspec url (``s3://bucket/prefix``, ``gs://...``, ``memory://...``).
        format: a registered format name or a :class:`~lighter_sink.formats.Format`.
        value_key: for dict outputs, the entry holding the batched predictions (default ``"pred"`` if present).
        id_key: for dict outputs, the entry holding per-sample ids; default: a rank-aware counter.
        **options: the options every entry point shares, documented in :class:`~lighter_sink.SinkConfig`
            (``storage_options``, ``max_queue_bytes``, ``concurrency``, ``retries``, ``timeout``, ``mode``,
            ``key``, ``backend``, ``upload_checksums``, ``durable``, ``num_samples``, ``copy``). ``num_samples``
            defaults to the length of the (single) predict dataset; ``copy`` copies each batch's predictions at
            the end of its step, so a model may reuse its output buffers (``out=``, CUDA graphs).

    Ids: without ``id_key``, rank ``r`` of ``W`` numbers its samples ``r, r + W, ...`` per dataloader, which is
    the dataset index with Lightning's distributed sampler and an unshuffled dataloader. Counter ids at or past
    the dataset's length are the duplicates a padding ``DistributedSampler`` adds: they are not stored. With
    several predict dataloaders, dataloader ``k``'s ids (counter or ``id_key``) are prefixed ``dataloader_k/``.

    Raises:
        ConfigurationError: invalid arguments, at construction (an unknown format lists the known names).
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        format: str | Format = "npy",
        value_key: str | None = None,
        id_key: str | None = None,
        **options: Unpack[SinkOptions],
    ) -> None:
        super().__init__()
        self.url = os.fspath(url)
        self.format = get_format(format)
        self.value_key = value_key
        self.id_key = id_key
        self._options = options
        # Validate everything now, before any compute: building a Sink checks arguments and starts nothing.
        # (A format that needs the number of samples gets it from the predict dataset in setup.)
        checked: SinkOptions = {**options, "num_samples": options.get("num_samples") or 0}
        Sink(self.url, format=self.format, **checked)
        self._sink: Sink | None = None
        self._counters: dict[int, RankCounter] = {}
        self._lengths: list[int | None] = []
        self._index_maps: list[Sequence[int] | None] = []
        self._padding_dropped = 0
        self._shown_at = 0.0
        self._batch_samplers: list[Any] = []
        self._per_sample_lists = False

    def __repr__(self) -> str:
        return f"PredictionSink({self.url!r}, format={self.format.name!r})"

    @property
    def sink(self) -> Sink | None:
        """The running sink (its ``stats`` in particular) during predict, or the last one afterwards."""
        return self._sink

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        strategy = trainer.strategy
        # Rank 0's url wins: a url computed per process (a timestamp, say) must not split the output.
        url = strategy.broadcast(self.url, src=0)
        if is_local_url(url):
            path = local_path(url)
            if trainer.is_global_zero:
                check_local_destination(path)
            strategy.barrier("lighter_sink.setup")
            if not os.path.isdir(path):
                raise DestinationError(
                    f"rank {trainer.global_rank} cannot see {path}, which rank 0 created: every rank must write "
                    "to storage shared by all nodes (a shared filesystem or an object store url)"
                )
        self._counters = {}
        num_samples = self._options.get("num_samples")
        if num_samples is None and self.format.needs_num_samples:
            num_samples = _predict_length(trainer)
        run_options: SinkOptions = {**self._options, "num_samples": num_samples}
        self._sink = Sink(
            url,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            all_ok=lambda ok: bool(strategy.reduce_boolean_decision(ok, all=True)),
            format=self.format,
            **run_options,
        )
        self._sink.open()

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaders = trainer.predict_dataloaders
        if loaders is None:
            loaders = []
        elif not isinstance(loaders, list | tuple):
            loaders = [loaders]
        self._lengths = []
        self._index_maps = []
        self._batch_samplers = []
        self._per_sample_lists = False
        for loader in loaders:
            dataset = getattr(loader, "dataset", None)
            try:
                length: int | None = len(dataset)  # type: ignore[arg-type]
            except TypeError:
                length = None
            self._lengths.append(length)
            self._index_maps.append(dataset.indices if isinstance(dataset, RemainingSubset) else None)
            # Lightning wraps a predict DataLoader's batch sampler to record each batch's dataset indices
            sampler = getattr(loader, "batch_sampler", None)
            self._batch_samplers.append(sampler if hasattr(sampler, "seen_batch_indices") else None)
        self._padding_dropped = 0
        self._shown_at = 0.0

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
        sink = self._sink
        if sink is None:
            raise ConfigurationError("PredictionSink received a batch before setup(stage='predict')")
        values, ids = self.split_outputs(outputs)
        count = count_samples(values)
        if ids is None:  # counter ids stand for the batch's samples: the predictions must be those samples
            samples = self._batch_size(batch, batch_idx, dataloader_idx)
            if samples is not None:
                self._check_samples(outputs, values, count, samples)
        prefix = f"dataloader_{dataloader_idx}/" if len(self._lengths) > 1 else ""
        if ids is None:
            counter = self._counters.get(dataloader_idx)
            if counter is None:
                counter = self._counters[dataloader_idx] = RankCounter(trainer.global_rank, trainer.world_size)
            positions = list(counter.take(count))
            length = self._lengths[dataloader_idx] if dataloader_idx < len(self._lengths) else None
            if length is not None and positions and positions[-1] >= length:
                # a padding DistributedSampler repeats samples to even out ranks: those are not predictions
                keep = [i for i, p in enumerate(positions) if p < length]
                self._padding_dropped += count - len(keep)
                values = [values[i] for i in keep] if isinstance(values, list | tuple) else values[keep]
                positions = [positions[i] for i in keep]
            index_map = self._index_maps[dataloader_idx] if dataloader_idx < len(self._index_maps) else None
            if index_map is not None:
                positions = [index_map[p] for p in positions]
            sink.put_batch(CounterIds(f"{prefix}{p}" for p in positions), values)
        else:
            if len(ids) != count:
                raise PredictionError(
                    f"id_key {self.id_key!r} gives {len(ids)} ids but value_key holds {count} predictions"
                )
            sink.put_batch([f"{prefix}{i}" for i in ids] if prefix else ids, values)
        # Lightning appends this batch after the hook returns; drop what it kept so host memory stays flat.
        for kept in trainer.predict_loop._predictions:
            kept.clear()
        now = time.monotonic()
        if now - self._shown_at >= _PROGRESS_EVERY:
            self._shown_at = now
            self._show_progress(trainer)

    def progress_metrics(self) -> dict[str, str]:
        """What the progress bar shows: queue fill, throughput and time the predict loop waited on the sink."""
        sink = self._sink
        if sink is None:
            return {}
        # (every half second from the predict loop's thread: the three figures, not a full stats snapshot)
        queued, mb_per_second, stall = sink.progress()
        return {
            "queue": f"{100 * queued / sink.max_queue_bytes:.0f}%",
            "MB/s": f"{mb_per_second:.1f}",
            "stall": f"{stall:.2f}s",
        }

    def _show_progress(self, trainer: pl.Trainer) -> None:
        # Lightning's own predict bar (tqdm's), not a second bar: the sink's figures become its postfix.
        bar = getattr(trainer.progress_bar_callback, "predict_progress_bar", None)
        if bar is not None and hasattr(bar, "set_postfix"):
            bar.set_postfix(self.progress_metrics(), refresh=False)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._padding_dropped:
            logger.info(
                "rank %d: %d padding samples of a DistributedSampler were not stored",
                trainer.global_rank,
                self._padding_dropped,
            )
        if self._sink is not None:
            self._sink.commit()
            self._show_progress(trainer)
            stats = self._sink.stats
            logger.info(
                "rank %d stored %d predictions (%.1f MB, %.1f MB/s); the predict loop waited %.3fs on the sink, "
                "queue high-water %.1f MiB; %d retries",
                trainer.global_rank,
                stats.items,
                stats.bytes / 1e6,
                stats.mb_per_second,
                stats.stall_seconds,
                stats.queue_high_water_bytes / 2**20,
                stats.retries,
            )

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._sink is not None:
            self._sink.abort()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict" and self._sink is not None:
            self._sink.abort()  # a no-op after a commit; stops workers after anything else

    # ------------------------------------------------------------------ outputs

    def _batch_size(self, batch: Any, batch_idx: int, dataloader_idx: int) -> int | None:
        """The batch's number of samples, or None when neither Lightning's sampler nor the batch tells it.

        Lightning records the dataset indices of every predict batch (for prediction writers); a stream or
        another iterable has none, and then a tensor batch, or a dict of tensors, says it through dim 0.
        """
        samplers = self._batch_samplers
        sampler = samplers[dataloader_idx] if dataloader_idx < len(samplers) else None
        if sampler is not None:
            seen = sampler.seen_batch_indices
            if batch_idx < len(seen):
                return len(seen[batch_idx])
        return _rows(batch)

    def _check_samples(self, outputs: Any, values: Any, count: int, samples: int) -> None:
        """Refuse predictions that are not one per sample of the batch, rather than guess which is which."""
        if count != samples:
            raise PredictionError(
                f"{self._where(outputs)} holds {count} predictions ({_described(values)}) for a batch of "
                f"{samples} samples; {_NAMING}"
            )
        if self._per_sample_lists or not isinstance(values, list | tuple) or count < 2:
            return
        # A list whose every element has the batch's length along dim 0 may be one prediction per sample, or
        # several batched outputs (predictions, ids, ...) that happen to number as many as the samples. Once
        # a list was plainly per-sample, later ones are too (a last, smaller batch often looks ambiguous).
        if all(isinstance(v, torch.Tensor) and not v.is_nested and v.ndim and v.shape[0] == count for v in values):
            raise PredictionError(
                f"{self._where(outputs)} is ambiguous: {_described(values)}, for a batch of {samples} samples, "
                f"may be one prediction per sample or {count} batched outputs; {_NAMING}"
            )
        self._per_sample_lists = True

    def _where(self, outputs: Any) -> str:
        key = self.value_key or "pred"
        return (
            f"predict_step's {key!r} entry"
            if isinstance(outputs, Mapping) and key in outputs
            else "predict_step's output"
        )

    def split_outputs(self, outputs: Any) -> tuple[Any, list[Any] | None]:
        """``(predictions, ids or None)`` of one ``predict_step`` output; override it for outputs of your own shape.

        Raises:
            PredictionError: the output does not hold what ``value_key``/``id_key`` name.
        """
        if isinstance(outputs, Mapping):
            value_key = self.value_key or ("pred" if "pred" in outputs else None)
            if value_key is None:
                raise PredictionError(
                    f"predict_step returned a dict with keys {sorted(map(str, outputs))}; "
                    "pass value_key=... to name the entry that holds the predictions"
                )
            if value_key not in outputs:
                raise PredictionError(
                    f"value_key {value_key!r} is not in the predict_step output; keys: {sorted(map(str, outputs))}"
                )
            ids = None
            if self.id_key is not None:
                if self.id_key not in outputs:
                    raise PredictionError(
                        f"id_key {self.id_key!r} is not in the predict_step output; keys: {sorted(map(str, outputs))}"
                    )
                ids = as_id_list(outputs[self.id_key], self.id_key)
            return outputs[value_key], ids
        if self.value_key is not None or self.id_key is not None:
            raise PredictionError(f"value_key/id_key need predict_step to return a dict, got {type(outputs).__name__}")
        return outputs, None


_NAMING = (
    "return the batched predictions as one tensor (dim 0 = samples), or "
    "return a dict and name its entries: value_key=... for the predictions, id_key=... for one id per sample"
)


def _rows(batch: Any) -> int | None:
    """Dim 0 of a tensor batch, or of a dict's tensors when they agree; None for any other batch.

    A list or tuple batch is not read: it may hold fields (``[x, y]``) or samples (inputs of varying size).
    """
    if isinstance(batch, torch.Tensor):
        return int(batch.size(0)) if batch.ndim else None
    if not isinstance(batch, Mapping):
        return None
    rows = None
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim:
            if rows is None:
                rows = int(value.size(0))
            elif value.size(0) != rows:
                return None
    return rows


def _described(values: Any) -> str:
    """What came, for an error: a tensor's shape, or a list's length and its first elements' shapes."""
    if isinstance(values, torch.Tensor):
        return "a nested tensor" if values.is_nested else f"a tensor of shape {tuple(values.shape)}"
    if isinstance(values, list | tuple):
        shapes = [
            str(tuple(v.shape)) if isinstance(v, torch.Tensor) and not v.is_nested else type(v).__name__
            for v in values[:4]
        ]
        more = ", ..." if len(values) > 4 else ""
        return f"a {type(values).__name__} of {len(values)} with shapes {', '.join(shapes)}{more}"
    return type(values).__name__


def _predict_length(trainer: pl.Trainer) -> int | None:
    """The length of the single predict dataloader's dataset, when it has one (setup runs before the loop).

    For a :class:`RemainingSubset` it is the full dataset's: the resumed run's ids are its indices there.
    """
    source = trainer.predict_loop._data_source
    try:
        loaders = source.dataloader()
    except Exception:  # a datamodule that needs its own setup first
        return None
    if isinstance(loaders, list | tuple):
        if len(loaders) != 1:
            return None
        loaders = loaders[0]
    dataset = getattr(loaders, "dataset", None)
    if isinstance(dataset, RemainingSubset):
        dataset = dataset.dataset
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None
