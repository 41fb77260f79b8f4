"""From what a model returns to detached host tensors the workers can read, owned by the sink.

Once ``put`` returns, the caller may reuse or change what it put (a preallocated output buffer, ``out=``, CUDA
graphs, in-place post-processing), so the sink stores copies of its own. CPU tensors and numpy arrays are copied
into compact memory on the caller's thread, one copy per batch (per sample for a list), large batches holding
the interpreter lock (see ``_cpu_copy``). A sink's large copies go into buffers recycled from the batches it
stored (``BufferPool``): a memcpy into warm pages, 0.1 ms per MiB here, against 0.3-0.8 ms into fresh ones.
``copy=False`` hands them over as they are, for callers that never touch a buffer after putting it. CUDA tensors
are cloned on the device, then copied with ``non_blocking=True`` into pinned host memory on a side stream, and an
event is recorded that the worker waits on before reading: reading a non-blocking device-to-host copy before it
completes gives zeros (Lightning #11287). Pinned buffers come from torch's caching host allocator, which reuses a block
only after the copies using it completed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lighter_sink._errors import PredictionError

__all__ = ["BufferPool", "HostBatch", "count_samples", "numpy_view", "stage", "stage_one"]

_NUMPY_DTYPES = frozenset(
    {
        torch.float64,
        torch.float32,
        torch.float16,
        torch.complex128,
        torch.complex64,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    }
)
_HOLD_LOCK_FROM = 2**20  # bytes of a CPU batch from which its copy keeps the interpreter lock
_POOL_FROM = 64 * 2**10  # bytes of a CPU copy from which it goes into a recycled buffer
_streams: dict[int, torch.cuda.Stream] = {}
_streams_lock = threading.Lock()


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _streams_lock:
        stream = _streams.get(index)
        if stream is None:
            stream = _streams[index] = torch.cuda.Stream(device=index)  # type: ignore[no-untyped-call]
        return stream


class BufferPool:
    """Staging buffers given back once the batch they held is stored, so that later copies write into warm pages.

    A fresh buffer costs a page fault per page on its first write: copying 8 MiB took 6-7 ms instead of 0.8.
    Buffers are matched by exact size (models put batches of one shape; nothing over-allocated escapes the
    ``max_queue_bytes`` count). The sink gives a batch's buffers back only once every object made from them was
    stored at the first attempt, so that nothing (a write that timed out and still runs) can read them any more,
    and only while the pooled bytes and the queued ones together stay within ``max_queue_bytes``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[int, list[np.ndarray]] = {}
        self.nbytes = 0  # bytes of the free buffers
        self.reused = 0  # buffers taken from the pool rather than allocated
        self._closed = False

    def take(self, nbytes: int) -> np.ndarray | None:
        """A pooled buffer of ``nbytes`` bytes (uint8), or None."""
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                self.nbytes -= nbytes
                self.reused += 1
                return free.pop()
        return None

    def give_back(self, buffers: Iterable[np.ndarray], room: int) -> None:
        """Keep ``buffers`` for reuse while the pool holds at most ``room`` bytes; nothing may read them any more.

        Buffers of other sizes make way for them (the sizes being put now); what does not fit is dropped.
        """
        with self._lock:
            for buffer in buffers:
                size = buffer.nbytes
                if self._closed or size > room:
                    continue
                if self.nbytes + size > room:
                    for other in [s for s in self._free if s != size]:
                        self.nbytes -= other * len(self._free.pop(other))
                    if self.nbytes + size > room:
                        continue
                self._free.setdefault(size, []).append(buffer)
                self.nbytes += size

    def close(self) -> None:
        """Free every pooled buffer, and keep none given back from now on."""
        with self._lock:
            self._closed = True
            self._free.clear()
            self.nbytes = 0


@dataclass(slots=True)
class HostBatch:
    """Predictions on the host: one batched tensor (dim 0 = samples) or one tensor per sample."""

    values: torch.Tensor | list[torch.Tensor]
    count: int
    nbytes: int
    wait: Callable[[], None] | None = None
    pooled: list[np.ndarray] | None = None  # the buffers under ``values`` taken from a BufferPool

    def ready(self) -> torch.Tensor | list[torch.Tensor]:
        """The values, once any device-to-host copy completed (waits on its event)."""
        if self.wait is not None:
            self.wait()
            self.wait = None
        return self.values

    def samples(self) -> Sequence[torch.Tensor]:
        values = self.ready()
        return values.unbind(0) if isinstance(values, torch.Tensor) else values


def _as_tensor(value: object, what: str | int) -> torch.Tensor:
    """``value`` as a dense tensor; ``what`` names it in errors (an int: the prediction at that position)."""
    if isinstance(value, torch.Tensor) and not value.is_nested and value.layout == torch.strided:
        return value  # (the common case, once per sample for Sink.put: no name to build)
    if isinstance(what, int):
        what = f"prediction {what}"
    if isinstance(value, torch.Tensor):
        if value.is_nested:
            raise PredictionError(
                f"{what} is a nested tensor; expected a dense one: put its samples as a list of tensors, "
                "or pad them into one tensor"
            )
        raise PredictionError(f"{what} is a {value.layout} tensor; expected a dense one: call .to_dense() first")
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise PredictionError(f"{what} is a numpy array of Python objects; expected numbers")
        return torch.from_numpy(value)
    raise PredictionError(
        f"{what} must be a torch.Tensor (or numpy array), got {type(value).__name__}; "
        "return tensors from predict_step, or a dict and name the entry with value_key"
    )


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A compact copy of a CPU tensor (a view such as ``logits[:, :10]`` keeps only the bytes it shows, the ones
    ``max_queue_bytes`` counts), made on the caller's thread without giving up the interpreter lock if it can.

    Torch's ``clone`` gives up the lock for the copy, and with the sink's threads busy, getting it back cost the
    predict loop more than the copy itself: 8 MiB batches took 7-13 ms a put at the median, against 2-10 ms for
    ``bytearray``, which copies a C-contiguous buffer holding the lock. Below ``_HOLD_LOCK_FROM`` the copy is too
    short for that wait to be likely and ``clone`` costs fewer calls (5 against 10 us for a tiny sample). Dtypes
    numpy has no view for (bfloat16), lazily negated tensors and strided views are cloned.
    """
    if tensor.dtype in _NUMPY_DTYPES and tensor.nbytes >= _HOLD_LOCK_FROM:
        try:
            array = tensor.numpy()
        except RuntimeError:  # a lazy negation, as x.conj().imag: clone resolves it
            return tensor.clone(memory_format=torch.contiguous_format)
        if array.flags.c_contiguous:
            # (array.data, a memoryview: bytearray(array) would read a 0-d integer array as a length)
            owned = np.frombuffer(bytearray(array.data), dtype=array.dtype)
            return torch.from_numpy(owned.reshape(array.shape))
    return tensor.clone(memory_format=torch.contiguous_format)


def _pooled_copy(tensor: torch.Tensor, pool: BufferPool, pooled: list[np.ndarray]) -> torch.Tensor:
    """``_cpu_copy`` into a buffer from ``pool`` (appended to ``pooled``), holding the interpreter lock."""
    if tensor.dtype in _NUMPY_DTYPES:
        try:
            array = tensor.numpy()
        except RuntimeError:  # a lazy negation, as x.conj().imag
            array = None
        if array is not None:
            buffer = pool.take(array.nbytes)
            contiguous = array.flags.c_contiguous
            if buffer is None:
                # A miss copies as _cpu_copy does (np.empty would ask for huge pages from 4 MiB on: the kernel
                # may compact memory to find them, while this thread holds the lock).
                buffer = np.frombuffer(bytearray(array.data) if contiguous else bytearray(array.nbytes), np.uint8)
            elif contiguous:
                buffer.data[:] = array.data.cast("B")  # (a memcpy that keeps the lock: see _cpu_copy)
            target = buffer.view(array.dtype).reshape(array.shape)
            if not contiguous:
                np.copyto(target, array)  # a strided view: numpy gathers it
            pooled.append(buffer)
            return torch.from_numpy(target)
    return _cpu_copy(tensor)


def _to_host(
    tensor: torch.Tensor, copy: bool, pool: BufferPool | None = None, pooled: list[np.ndarray] | None = None
) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    if tensor.requires_grad:  # (detach makes a new tensor object: skipped when there is no graph to drop)
        tensor = tensor.detach()
    if tensor.is_cpu:
        if not copy:
            return tensor, None
        if pool is not None and pooled is not None and tensor.nbytes >= _POOL_FROM:
            return _pooled_copy(tensor, pool, pooled), None
        return _cpu_copy(tensor), None
    if tensor.is_cuda:
        stream = _side_stream(tensor.device)
        if copy:
            # Work the producer queues after put (the next batch into the same buffer) must not overwrite the
            # source before the side stream read it. A clone on the producer's stream is ordered before that
            # work and runs at device-memory speed; making the producer wait for the device-to-host copy instead
            # would hold its next kernels for the whole (tens of times slower) transfer, the overlap the side
            # stream is for. The clone's memory returns to the allocator once the copy read it (record_stream).
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        # The copy must see the producer's writes; the allocator must not recycle the source before it ran.
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        tensor.record_stream(stream)
        return host, event
    # other accelerators (mps, xpu): a synchronous copy is correct everywhere, and is the sink's own already
    return tensor.to("cpu", memory_format=torch.contiguous_format), None


def stage(values: object, count: int, *, copy: bool = True, pool: BufferPool | None = None) -> HostBatch:
    """Detach ``values`` and bring them to host memory; ``count`` is the number of identifiers.

    With ``copy`` (the default) the result shares no memory with ``values``: the caller may change them as soon
    as this returns. Without it, CPU tensors and numpy arrays are handed over as they are. Large CPU copies go
    into buffers from ``pool`` when one is given (listed in ``HostBatch.pooled``).

    Raises:
        PredictionError: not tensors, or a number of samples that differs from ``count``.
    """
    if isinstance(values, list | tuple):
        if len(values) != count:
            raise PredictionError(f"got {len(values)} predictions for {count} ids; expected one per id")
        hosts: list[torch.Tensor] = []
        events: list[torch.cuda.Event] = []
        taken: list[np.ndarray] = []
        nbytes = 0
        for index, value in enumerate(values):  # (a plain loop: Sink.put comes through here once per sample)
            host, event = _to_host(_as_tensor(value, index), copy, pool, taken)
            hosts.append(host)
            nbytes += host.nbytes
            if event is not None:
                events.append(event)
        return HostBatch(hosts, count, nbytes, _waiter(events), taken or None)
    tensor = _as_tensor(values, "the prediction batch")
    if tensor.ndim == 0:
        raise PredictionError(f"the prediction batch is a 0-dim tensor; expected dim 0 to hold {count} samples")
    if tensor.shape[0] != count:
        raise PredictionError(
            f"the prediction batch has {tensor.shape[0]} samples along dim 0 but {count} ids were given"
        )
    pooled: list[np.ndarray] = []
    host, event = _to_host(tensor, copy, pool, pooled)
    return HostBatch(host, count, host.nbytes, _waiter([event] if event is not None else []), pooled or None)


def numpy_view(value: object, max_bytes: int) -> np.ndarray | None:
    """A numpy view of ``value`` when it is a dense CPU tensor without a graph of at most ``max_bytes`` that numpy
    can hold (the caller copies it), else None (then :func:`stage_one` stages it, and says what is wrong)."""
    if type(value) is not torch.Tensor or value.layout != torch.strided or value.is_nested or not value.is_cpu:
        return None
    if value.requires_grad or value.dtype not in _NUMPY_DTYPES or value.nbytes > max_bytes:
        return None
    try:
        return value.numpy()
    except RuntimeError:  # a lazy negation or conjugation: staging resolves it
        return None


def stage_one(value: object, *, copy: bool = True, pool: BufferPool | None = None) -> HostBatch:
    """``stage([value], 1, ...)`` without the bookkeeping of a list: ``Sink.put``'s path, once per prediction."""
    taken: list[np.ndarray] = []
    host, event = _to_host(_as_tensor(value, 0), copy, pool, taken)
    return HostBatch([host], 1, host.nbytes, None if event is None else _waiter([event]), taken or None)


def _waiter(events: list[torch.cuda.Event]) -> Callable[[], None] | None:
    if not events:
        return None

    def wait() -> None:
        for event in events:
            event.synchronize()

    return wait


def count_samples(values: object) -> int:
    """The number of samples in a batch of predictions (dim 0, or a list's length).

    Raises:
        PredictionError: neither a batched tensor nor a list of tensors.
    """
    if isinstance(values, list | tuple):
        return len(values)
    if isinstance(values, torch.Tensor) and values.is_nested:
        return values.size(0)  # (a nested tensor has no shape; staging refuses it with the reason)
    shape = getattr(values, "shape", None)
    if shape is None:
        raise PredictionError(
            f"predictions must be a batched tensor or a list of tensors, got {type(values).__name__}; "
            "return tensors from predict_step, or a dict and name the entry with value_key"
        )
    if len(shape) == 0:
        raise PredictionError("the prediction batch is a 0-dim tensor; expected a batch with samples along dim 0")
    return int(shape[0])
