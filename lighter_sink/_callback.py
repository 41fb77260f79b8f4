"""PredictionSink: the Lightning callback. It knows Lightning and hands batches to a :class:`Sink`."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lighter_sink._errors import ConfigurationError, DestinationError, PredictionError
from lighter_sink._ids import RankCounter, validate_identifiers
from lighter_sink._resume import RemainingSubset
from lighter_sink._sink import DEFAULT_CONCURRENCY, DEFAULT_MAX_QUEUE_BYTES, Backend, Mode, Sink, _num_samples
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
        storage_options: passed to fsspec (credentials, ``endpoint_url``); never logged.
        value_key: for dict outputs, the entry holding the batched predictions (default ``"pred"`` if present).
        id_key: for dict outputs, the entry holding per-sample ids; default: a rank-aware counter.
        max_queue_bytes: host bytes queued before the predict loop is made to wait.
        concurrency: writes in flight.
        retries: attempts per object for transient storage errors.
        timeout: seconds one write attempt may take.
        mode: ``"overwrite"``, ``"resume"`` or ``"error"`` (see :class:`~lighter_sink.Sink`).
        backend: ``"fsspec"`` or ``"obstore"`` (S3 only, faster per request; see :class:`~lighter_sink.Sink`).
        upload_checksums: have the server verify upload bodies (see :class:`~lighter_sink.Sink`).
        num_samples: samples in the run, for formats that size their output up front (``zarr``); by default
            the length of the (single) predict dataset.
        key: object key template, e.g. ``"{id:08d}"`` or ``"{hash:.2}/{id}"`` (see :class:`~lighter_sink.Sink`).
        copy: copy each batch's predictions at the end of its step, so a model may reuse its output buffers
            (``out=``, CUDA graphs); ``False`` saves the copy when predict_step returns fresh tensors each time
            (see :class:`~lighter_sink.Sink`).

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
        storage_options: Mapping[str, Any] | None = None,
        value_key: str | None = None,
        id_key: str | None = None,
        key: str = "{id}",
        backend: Backend = "fsspec",
        upload_checksums: bool = True,
        num_samples: int | None = None,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        concurrency: int = DEFAULT_CONCURRENCY,
        retries: int = 5,
        timeout: float | None = 60.0,
        mode: Mode = "overwrite",
        copy: bool = True,
    ) -> None:
        super().__init__()
        self.url = os.fspath(url)
        self.format = get_format(format)
        self.value_key = value_key
        self.id_key = id_key
        self._sink_kwargs: dict[str, Any] = {
            "format": self.format,
            "storage_options": storage_options,
            "max_queue_bytes": max_queue_bytes,
            "concurrency": concurrency,
            "retries": retries,
            "timeout": timeout,
            "mode": mode,
            "key": key,
            "backend": backend,
            "upload_checksums": upload_checksums,
            "num_samples": num_samples,
            "copy": copy,
        }
        # Validate everything now, before any compute: building a Sink checks arguments and starts nothing.
        # (A format that needs the number of samples gets it from the predict dataset in setup.)
        Sink(self.url, **{**self._sink_kwargs, "num_samples": self._sink_kwargs["num_samples"] or 0})
        self._sink: Sink | None = None
        self._counters: dict[int, RankCounter] = {}
        self._lengths: list[int | None] = []
        self._index_maps: list[Sequence[int] | None] = []
        self._padding_dropped = 0
        self._shown_at = 0.0

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
        num_samples = self._sink_kwargs.get("num_samples")
        if num_samples is None and self.format.needs_num_samples:
            num_samples = _predict_length(trainer)
        self._sink = Sink(
            url,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            all_ok=lambda ok: bool(strategy.reduce_boolean_decision(ok, all=True)),
            **{**self._sink_kwargs, "num_samples": num_samples},
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
        for loader in loaders:
            dataset = getattr(loader, "dataset", None)
            try:
                length: int | None = len(dataset)  # type: ignore[arg-type]
            except TypeError:
                length = None
            self._lengths.append(length)
            self._index_maps.append(dataset.indices if isinstance(dataset, RemainingSubset) else None)
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
        values, ids = self._split(outputs)
        count = _num_samples(values)
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
            sink._put([f"{prefix}{p}" for p in positions], values, unique=True)
        else:
            if len(ids) != count:
                raise PredictionError(
                    f"id_key {self.id_key!r} gives {len(ids)} ids but value_key holds {count} predictions"
                )
            sink._put(validate_identifiers([f"{prefix}{i}" for i in ids] if prefix else ids), values, unique=False)
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
        queued, mb_per_second, stall = sink._engine.progress()
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

    def _split(self, outputs: Any) -> tuple[Any, list[Any] | None]:
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
                ids = _as_id_list(outputs[self.id_key], self.id_key)
            return outputs[value_key], ids
        if self.value_key is not None or self.id_key is not None:
            raise PredictionError(f"value_key/id_key need predict_step to return a dict, got {type(outputs).__name__}")
        return outputs, None


def _as_id_list(ids: Any, key: str) -> list[Any]:
    if isinstance(ids, torch.Tensor):
        # (the dtype's flag, not Tensor.is_floating_point(): torch gives up the GIL in that call, and getting it
        # back from the sink's busy threads costs the predict loop milliseconds)
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.ndim != 1:
            raise PredictionError(
                f"id_key {key!r} must hold a 1-d integer tensor or a list, got {ids.dtype} {tuple(ids.shape)}"
            )
        return [int(i) for i in ids.tolist()]
    if isinstance(ids, Sequence) and not isinstance(ids, str | bytes):
        return list(ids)
    raise PredictionError(f"id_key {key!r} must hold a list of ids or an integer tensor, got {type(ids).__name__}")


def _predict_length(trainer: pl.Trainer) -> int | None:
    """The length of the single predict dataloader's dataset, when it has one (setup runs before the loop)."""
    source = trainer.predict_loop._data_source
    try:
        loaders = source.dataloader()
    except Exception:  # a datamodule that needs its own setup first
        return None
    if isinstance(loaders, list | tuple):
        if len(loaders) != 1:
            return None
        loaders = loaders[0]
    try:
        return len(loaders.dataset)
    except (AttributeError, TypeError):
        return None
