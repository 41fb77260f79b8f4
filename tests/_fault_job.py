"""A prediction job run as a real process by the fault tests (tests/test_faults.py).

``python tests/_fault_job.py URL --storage-options JSON`` runs ``Trainer.predict`` into a PredictionSink.
It prints ``WROTE <items>`` once the sink has stored ``--marker-items`` predictions (the test waits for that
line before interrupting it), ``RAISED`` when predict raised (after writing a JSON report of the error), and
``DONE`` when predict returned. Whatever happens, the interpreter is then left to exit on its own: a thread that
the sink forgot to stop would keep the process alive past the test's bound.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lighter_sink import PredictionSink
from lighter_sink._demo import DemoModel, SyntheticImages


class Marker(Callback):
    """Prints ``WROTE <items>`` once, when the sink has stored at least ``items`` predictions."""

    def __init__(self, sink: PredictionSink, items: int) -> None:
        self.sink = sink
        self.items = items
        self.printed = False

    def on_predict_batch_end(self, *args: Any, **kwargs: Any) -> None:
        running = self.sink.sink
        if self.printed or running is None:
            return
        stored = running.stats.items
        if stored >= self.items:
            print(f"WROTE {stored}", flush=True)
            self.printed = True


def _chain(exc: BaseException) -> list[dict[str, str]]:
    out = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        out.append({"type": type(current).__name__, "message": str(current), "repr": repr(current)})
        current = current.__cause__ or current.__context__
    return out


def main() -> None:
    # A test that gives up on this job sends SIGUSR1 first: every thread's stack goes to stderr, into its report.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # Ctrl-C as in a terminal, whatever this process inherited: a shell starts background commands with SIGINT
    # ignored, and Python keeps an inherited SIG_IGN (a suite launched with `&` then never saw KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--storage-options", default="{}")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--retries", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--marker-items", type=int, help="print WROTE once this many predictions are stored")
    parser.add_argument("--report", help="where to write a JSON report of the error predict raised")
    args = parser.parse_args()

    sink = PredictionSink(
        args.url,
        storage_options=json.loads(args.storage_options),
        retries=args.retries,
        timeout=args.timeout,
        max_queue_bytes=64 * 2**10,
    )
    callbacks: list[Callback] = [sink]
    if args.marker_items is not None:
        callbacks.append(Marker(sink, args.marker_items))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    loader = DataLoader(SyntheticImages(args.n, size=args.size), batch_size=args.batch_size)
    torch.set_num_threads(1)
    started = time.monotonic()
    try:
        trainer.predict(DemoModel(), loader, return_predictions=False)
    except Exception as exc:
        report = {
            "seconds": time.monotonic() - started,
            "chain": _chain(exc),
            "url": getattr(exc, "url", None),
            "ids": getattr(exc, "ids", None),
            "stats": sink.sink.stats.as_dict() if sink.sink is not None else None,
            "state": sink.sink.state.value if sink.sink is not None else None,
            # threads that would keep the interpreter from exiting
            "threads": [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon],
        }
        if args.report:
            Path(args.report).write_text(json.dumps(report))
        print("RAISED", flush=True)
        return
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
