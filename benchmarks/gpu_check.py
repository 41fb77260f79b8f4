"""Checks that need a CUDA GPU (run by benchmarks/gpu_check.sh; a few minutes at most).

1. Device-to-host bandwidth into pinned vs pageable host memory (and whether reading a non_blocking copy before
   synchronising shows zeros on this machine: the Lightning #11287 hazard the sink guards against).
2. Overlap: a matmul model on the GPU, Trainer.predict with (a) no writer, (b) a synchronous per-item writer
   (``.cpu()`` then np.save, as Lighter's BaseWriter), (d) PredictionSink; and raw writes of the same bytes.
3. Correctness: every object the sink stored is read back and compared with the model's output, recomputed
   after the run; a file that is missing, all zeros, or differs fails the check.
4. Reused output buffers: the same model writing every batch into one preallocated device buffer that its next
   step clears first (as ``out=`` and CUDA-graph models do), through PredictionSink; and a plain ``Sink`` loop
   whose kernel right after each ``put`` overwrites the buffer just put. Each stored prediction must be the
   batch as it was put, not zeros nor a later kernel's values.

Exit status: 0 when every check passed, 1 when one failed, 2 when there is no CUDA device. ``--cpu`` runs the
same code on the CPU with small sizes, to test the script itself on a machine without a GPU.

Usage: python -m benchmarks.gpu_check [--items 512] [--batch 32] [--url DIR] [--cpu]
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._runner import RESULTS, environment, write_json
from benchmarks._workloads import HookTimer, TimedLighter, TimedNothing, TimedSink, local_ceiling
from lighter_sink import PredictionSink, Sink


class MatmulModel(pl.LightningModule):
    """Per batch: ``repeat`` products of a ``heavy`` x ``heavy`` matrix (the accelerator's time), then a small
    MLP whose output is written last, so it is ready only after the heavy kernels ran. Each sample's output
    depends only on its index (values in about [1, 3], never zero) and is ``width`` x ``outer`` float32."""

    def __init__(self, width: int, outer: int, heavy: int, repeat: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("w1", torch.randn(width, width, generator=generator) / math.sqrt(width))
        self.register_buffer("w2", torch.randn(width, width, generator=generator) / math.sqrt(width))
        self.register_buffer("a", torch.randn(heavy, heavy, generator=generator) / math.sqrt(heavy))
        self.register_buffer("freq", torch.linspace(0.01, 1.0, width))
        self.outer = outer
        self.repeat = repeat

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        z = self.a
        for _ in range(self.repeat):
            z = torch.tanh(z @ self.a)
        x = torch.sin(indices.to(self.freq.dtype).unsqueeze(1) * self.freq.unsqueeze(0) + 0.5)
        h = torch.tanh(torch.tanh(x @ self.w1) @ self.w2)
        return 2.0 + h.unsqueeze(2) * h[:, : self.outer].unsqueeze(1) + 1e-3 * torch.tanh(z.mean())

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0].to(self.device))


class BufferModel(MatmulModel):
    """MatmulModel's outputs, written into one preallocated buffer that every step clears first: the previous
    step's predictions were put from that buffer, and its first kernel overwrites them."""

    def __init__(self, width: int, outer: int, heavy: int, repeat: int) -> None:
        super().__init__(width, outer, heavy, repeat)
        self.buffer: torch.Tensor | None = None

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        indices = batch[0].to(self.device)
        if self.buffer is None or self.buffer.shape[0] < len(indices) or self.buffer.device != indices.device:
            self.buffer = torch.empty(len(indices), self.freq.numel(), self.outer, device=indices.device)
        out = self.buffer[: len(indices)]
        out.zero_()
        out.copy_(self(indices))
        return out


def _reused_buffer(model: MatmulModel, directory: Path, items: int, batch: int, device: torch.device) -> dict[str, Any]:
    """A plain Sink loop: each batch is written into one device buffer behind the model's heavy products (so the
    host runs ahead of the device), put, and overwritten by the very next kernel (in-place post-processing).
    Stored prediction ``i`` must hold ``i + 1`` everywhere: the negated values or zeros mean the kernel queued
    after put reached the copy."""
    model.to(device)
    width, outer = model.freq.numel(), model.outer
    buffer = torch.empty(batch, width, outer, device=device)
    rows = torch.arange(1, batch + 1, dtype=torch.float32, device=device).view(-1, 1, 1)
    started = time.perf_counter()
    with Sink(directory) as sink:
        for start in range(0, items, batch):
            z = model.a
            for _ in range(model.repeat):
                z = torch.tanh(z @ model.a)
            buffer.copy_((rows + start + 0 * z.mean()).expand_as(buffer))
            sink.put_batch(range(start, start + batch), buffer)
            buffer.neg_()  # the next kernel on the producing stream, queued right after put
    wall = time.perf_counter() - started
    wrong = []
    for index in range(items):
        stored = np.load(directory / f"{index}.npy")
        if stored.shape != (width, outer) or not bool((stored == index + 1).all()):
            wrong.append(index)
    return {
        "checked": items,
        "wall_s": wall,
        "wrong_count": len(wrong),
        "wrong": wrong[:20],
        "committed": (directory / "_SUCCESS").exists(),
        "ok": not wrong and (directory / "_SUCCESS").exists(),
    }


def _bandwidth(megabytes: int, repeats: int) -> dict[str, Any]:
    nbytes = megabytes * 2**20
    source = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    targets = {
        "pageable": torch.empty(nbytes, dtype=torch.uint8),
        "pinned": torch.empty(nbytes, dtype=torch.uint8, pin_memory=True),
    }
    out: dict[str, Any] = {"megabytes": megabytes}
    for name, target in targets.items():
        best = math.inf
        for _ in range(repeats + 1):  # the first is a warm-up
            torch.cuda.synchronize()
            started = time.perf_counter()
            target.copy_(source, non_blocking=name == "pinned")
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
        out[f"{name}_gb_per_s"] = nbytes / 1e9 / best
    # The hazard: a non_blocking copy into pinned memory, read before synchronising.
    pinned = targets["pinned"]
    pinned.zero_()
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(8):
        busy = busy @ busy  # keep the stream busy so the copy is still queued
    pinned.copy_(source, non_blocking=True)
    early_sum = int(pinned[: 2**20].sum())
    torch.cuda.synchronize()
    out["unsynchronised_read_saw_zeros"] = early_sum < 2**20
    return out


def _trainer(callbacks: list[Any], accelerator: str) -> pl.Trainer:
    return pl.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
    )


def _predict(model: MatmulModel, loader: DataLoader[Any], callback: HookTimer, accelerator: str) -> dict[str, Any]:
    trainer = _trainer([callback], accelerator)
    started = time.perf_counter()
    trainer.predict(model, loader, return_predictions=False)
    if accelerator == "gpu":
        torch.cuda.synchronize()  # kernels still queued count as compute
    wall = time.perf_counter() - started
    stalls = sorted(callback.stalls)
    return {
        "wall_s": wall,
        "stall_p50_ms": stalls[len(stalls) // 2] * 1e3 if stalls else None,
        "stall_max_ms": stalls[-1] * 1e3 if stalls else None,
    }


def _expected(model: MatmulModel, loader: DataLoader[Any], device: torch.device) -> dict[int, np.ndarray]:
    model.to(device).eval()
    out: dict[int, np.ndarray] = {}
    with torch.inference_mode():
        for (indices,) in loader:
            for index, row in zip(indices.tolist(), model(indices.to(device)).cpu(), strict=True):
                out[index] = row.numpy()
    return out


def _verify(directory: Path, expected: dict[int, np.ndarray], tolerance: float) -> dict[str, Any]:
    missing, zeros, mismatched = [], [], []
    worst = 0.0
    for index, want in expected.items():
        path = directory / f"{index}.npy"
        if not path.exists():
            missing.append(index)
            continue
        got = np.load(path)
        if got.shape != want.shape or not np.any(got):
            zeros.append(index)
            continue
        if np.count_nonzero(got == 0):
            zeros.append(index)  # the model never outputs an exact zero: a partial copy
            continue
        difference = float(np.max(np.abs(got - want)))
        worst = max(worst, difference)
        if difference > tolerance:
            mismatched.append(index)
    committed = (directory / "_SUCCESS").exists()
    return {
        "checked": len(expected),
        "missing": missing[:20],
        "missing_count": len(missing),
        "zero_count": len(zeros),
        "zeros": zeros[:20],
        "mismatch_count": len(mismatched),
        "mismatched": mismatched[:20],
        "max_abs_difference": worst,
        "committed": committed,
        "ok": committed and not missing and not zeros and not mismatched,
    }


def _payloads(expected: dict[int, np.ndarray]) -> list[bytes]:
    out = []
    for index in sorted(expected):
        buffer = io.BytesIO()
        np.save(buffer, expected[index])
        out.append(buffer.getvalue())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, help="predictions (default 512, or 64 with --cpu)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, help="MLP width = first output dim (default 4096, or 256 with --cpu)")
    parser.add_argument("--outer", type=int, default=64, help="second output dim: 4096 x 64 float32 = 1 MiB")
    parser.add_argument("--heavy", type=int, help="size of the matrix multiplied per batch (default 8192)")
    parser.add_argument("--repeat", type=int, default=4, help="heavy products per batch")
    parser.add_argument("--bandwidth-mib", type=int, default=512)
    parser.add_argument("--dir", type=Path, help="where the predictions go (default: a temporary directory)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference to the recomputation")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU with small sizes (tests the script)")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device here: nothing to check (use --cpu to test this script on the CPU)")
        return 2
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    accelerator, device = ("cpu", torch.device("cpu")) if args.cpu else ("gpu", torch.device("cuda"))
    items = args.items or (64 if args.cpu else 512)
    width = args.width or (256 if args.cpu else 4096)
    heavy = args.heavy or (128 if args.cpu else 8192)
    report: dict[str, Any] = {"environment": environment(), "config": {**vars(args), "out": str(args.out)}}
    if not args.cpu:
        report["device"] = torch.cuda.get_device_name(0)
        torch.backends.cuda.matmul.allow_tf32 = False  # recomputation must match to the last bits or so
        report["bandwidth"] = bw = _bandwidth(args.bandwidth_mib, repeats=5)
        print(
            f"device-to-host {args.bandwidth_mib} MiB: pageable {bw['pageable_gb_per_s']:.1f} GB/s, "
            f"pinned {bw['pinned_gb_per_s']:.1f} GB/s; unsynchronised read saw zeros: "
            f"{bw['unsynchronised_read_saw_zeros']}"
        )

    model = MatmulModel(width, args.outer, heavy, args.repeat)
    loader = DataLoader(TensorDataset(torch.arange(items)), batch_size=args.batch)
    root = args.dir or Path(tempfile.mkdtemp(prefix="lighter-sink-gpu-"))
    runs: dict[str, Any] = {}
    try:
        _predict(model, loader, TimedNothing(), accelerator)  # warm-up: cuBLAS handles, allocator, kernels
        runs["compute"] = _predict(model, loader, TimedNothing(), accelerator)
        runs["lighter"] = _predict(model, loader, TimedLighter(str(root / "lighter"), None), accelerator)
        sink_callback = TimedSink(str(root / "sink"), concurrency=args.concurrency)
        runs["sink"] = _predict(model, loader, sink_callback, accelerator)
        assert isinstance(sink_callback, PredictionSink) and sink_callback.sink is not None
        runs["sink"]["stats"] = sink_callback.sink.stats.as_dict()
        expected = _expected(model, loader, device)
        report["verify"] = verify = _verify(root / "sink", expected, args.tolerance)
        report["verify_lighter"] = _verify_plain(root / "lighter", expected, args.tolerance)
        runs["ceiling"] = {"wall_s": local_ceiling(str(root / "ceiling"), _payloads(expected), args.concurrency)}
        buffered = BufferModel(width, args.outer, heavy, args.repeat)
        buffered.load_state_dict(model.state_dict())
        runs["sink_reused_buffer"] = _predict(
            buffered, loader, TimedSink(str(root / "reused"), concurrency=args.concurrency), accelerator
        )
        report["verify_reused_buffer"] = _verify(root / "reused", expected, args.tolerance)
        loop_items = max(args.batch, items // 4 // args.batch * args.batch)
        report["reused_buffer_loop"] = _reused_buffer(model, root / "reused-loop", loop_items, args.batch, device)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    ideal = max(runs["compute"]["wall_s"], runs["ceiling"]["wall_s"])
    for name in ("lighter", "sink"):
        runs[name]["overlap_efficiency"] = ideal / runs[name]["wall_s"]
    runs["sink"]["speedup_vs_lighter"] = runs["lighter"]["wall_s"] / runs["sink"]["wall_s"]
    report["runs"] = runs
    mib = items * width * args.outer * 4 / 2**20
    print(f"{items} predictions of {width}x{args.outer} float32 ({mib:.0f} MiB) on {accelerator}:")
    for name in ("compute", "ceiling", "lighter", "sink"):
        run = runs[name]
        extra = f"  overlap {run['overlap_efficiency']:.0%}" if "overlap_efficiency" in run else ""
        print(f"  {name:<8} {run['wall_s']:7.2f} s{extra}")
    print(f"  sink vs synchronous writer: {runs['sink']['speedup_vs_lighter']:.2f}x")
    print(
        f"read back {verify['checked']} predictions: missing {verify['missing_count']}, zeros {verify['zero_count']}, "
        f"different {verify['mismatch_count']} (max abs difference {verify['max_abs_difference']:.2e}), "
        f"_SUCCESS {'present' if verify['committed'] else 'MISSING'}"
    )
    reused, loop = report["verify_reused_buffer"], report["reused_buffer_loop"]
    print(
        f"a model reusing one output buffer, {reused['checked']} predictions: missing {reused['missing_count']}, "
        f"zeros {reused['zero_count']}, different {reused['mismatch_count']}; a Sink loop overwriting its buffer "
        f"right after put: {loop['wrong_count']} of {loop['checked']} stored wrong"
    )
    write_json(args.out, report)
    print(f"wrote {args.out}")
    ok = verify["ok"] and report["verify_lighter"]["ok"] and reused["ok"] and loop["ok"]
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def _verify_plain(directory: Path, expected: dict[int, np.ndarray], tolerance: float) -> dict[str, Any]:
    """The synchronous writer's files (no _SUCCESS marker): the same comparison, as a control."""
    result = _verify(directory, expected, tolerance)
    result["ok"] = not result["missing_count"] and not result["zero_count"] and not result["mismatch_count"]
    return result


if __name__ == "__main__":
    sys.exit(main())
