"""``lighter-sink``: a thin command line over the public API."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lighter_sink import PredictionSink
    from lighter_sink._demo import DemoModel, SyntheticImages

    storage_options = dict(args.storage_option or [])
    sink = PredictionSink(args.url, format=args.format, storage_options=storage_options)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=[sink],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(SyntheticImages(args.n, size=args.size), batch_size=args.batch_size)
    print(f"lighter-sink demo: {args.n} predictions of {args.size}x{args.size} float32 -> {args.url} ({args.format})")
    started = time.perf_counter()
    trainer.predict(DemoModel(), loader, return_predictions=False)
    wall = time.perf_counter() - started
    assert sink.sink is not None
    stats = sink.sink.stats
    summary = sink.sink.summary or {}
    print(f"  wrote     {summary.get('count', stats.items)} predictions, {stats.bytes / 1e6:.1f} MB")
    print(f"  speed     {stats.mb_per_second:.1f} MB/s, {stats.items / wall:.0f} predictions/s (wall {wall:.2f}s)")
    print(
        f"  stalled   {stats.stall_seconds * 1000:.1f} ms in total "
        f"(queue high-water {stats.queue_high_water_bytes / 2**20:.1f} MiB)"
    )
    print(f"  where     {sink.sink.url}  (_manifest.jsonl, _SUCCESS)")
    return 0


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lighter-sink", description="Asynchronous prediction sink for PyTorch and Lightning."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the sink does")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="run a small model through Trainer.predict on the CPU and write its predictions"
    )
    demo.add_argument("--url", default="./predictions", help="where to write (local path or fsspec url)")
    demo.add_argument("--format", default="npy", help="format name (default: npy)")
    demo.add_argument("-n", type=int, default=1000, help="number of predictions (default: 1000)")
    demo.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    demo.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    demo.add_argument(
        "--storage-option",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="fsspec storage option, repeatable (e.g. endpoint_url=http://127.0.0.1:9000)",
    )
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
