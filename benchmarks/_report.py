"""Turning runs into figures: the derived metrics, the markdown tables and the plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

LABELS = {
    "compute": "(a) compute only",
    "ceiling": "I/O only (raw writes)",
    "lighter": "(b) Lighter-style sync",
    "lightning": "(c) BasePredictionWriter",
    "sink": "(d) PredictionSink",
    "sink-nocopy": "(d') PredictionSink, copy=False",
}
COLORS = {
    "compute": "#9e9e9e",
    "ceiling": "#607d8b",
    "lighter": "#e57373",
    "lightning": "#ffb74d",
    "sink": "#4caf50",
    "sink-nocopy": "#81c784",
}
TICKS = {"compute": "a", "ceiling": "I/O", "lighter": "b", "lightning": "c", "sink": "d", "sink-nocopy": "d'"}
WRITERS = ("lighter", "lightning", "sink", "sink-nocopy")


def best_runs(runs: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """The fastest successful run of each (storage, workload, variant): the least disturbed by a noisy host."""
    best: dict[tuple[str, str, str], dict[str, Any]] = {}
    for run in runs:
        if not run["result"].get("ok"):
            continue
        key = (run["storage"], run["workload"], run["variant"])
        if key not in best or run["result"]["wall_s"] < best[key]["result"]["wall_s"]:
            best[key] = run
    return best


def cells(runs: Sequence[dict[str, Any]], workloads: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One cell per (storage, workload): every variant's figures and the ratios between them."""
    best = best_runs(runs)
    order: list[tuple[str, str]] = []
    for run in runs:
        key = (run["storage"], run["workload"])
        if run["variant"] != "compute" and key not in order:
            order.append(key)
    out = []
    for storage, label in order:
        workload = workloads[label]
        compute = best.get(("-", label, "compute"))
        ceiling = best.get((storage, label, "ceiling"))
        compute_s = compute["result"]["wall_s"] if compute else None
        io_s = ceiling["result"]["wall_s"] if ceiling else None
        ideal = max(compute_s, io_s) if compute_s is not None and io_s is not None else None
        nbytes = workload["items"] * workload["npy_bytes"]
        variants: dict[str, dict[str, Any]] = {}
        for variant, run in (("compute", compute), ("ceiling", ceiling)):
            if run is not None:
                variants[variant] = _figures(run["result"], nbytes, workload["items"], None)
        for variant in WRITERS:
            run = best.get((storage, label, variant))
            if run is not None:
                variants[variant] = _figures(run["result"], nbytes, workload["items"], ideal)
        sink = variants.get("sink")
        for other in ("lighter", "lightning"):
            if sink is not None and other in variants:
                sink[f"speedup_vs_{other}"] = variants[other]["wall_s"] / sink["wall_s"]
        out.append(
            {
                "storage": storage,
                "workload": label,
                "describe": workload["describe"],
                "bytes": nbytes,
                "compute_s": compute_s,
                "io_s": io_s,
                "ideal_s": ideal,
                "variants": variants,
            }
        )
    return out


def _figures(result: dict[str, Any], nbytes: int, items: int, ideal: float | None) -> dict[str, Any]:
    wall = result["wall_s"]
    figures = {
        "wall_s": wall,
        "mb_per_s": nbytes / 1e6 / wall,
        "predictions_per_s": items / wall,
        "overlap_efficiency": ideal / wall if ideal is not None else None,
    }
    for name in (
        "tail_s",
        "stall_p50_ms",
        "stall_p99_ms",
        "stall_max_ms",
        "queue_high_water_mib",
        "rss_start_mib",
        "rss_peak_mib",
        "cpu_s",
        "stored",
    ):
        if name in result:
            figures[name] = result[name]
    return figures


def _f(value: float | None, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}{suffix}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def overlap_markdown(data: dict[str, Any]) -> str:
    env = data["environment"]
    lines = [
        "# I/O-overlap benchmark",
        "",
        f"{env['when']} · {env['cpus']} CPUs · Python {env['python']} · torch {env['versions'].get('torch')} · "
        f"lightning {env['versions'].get('lightning')} · s3fs {env['versions'].get('s3fs')} · "
        f"commit {env.get('commit') or '?'} · concurrency {data['config']['concurrency']} · "
        f"sink backend {data['config'].get('backend', 'fsspec')} · "
        f"best of {data['config']['repeat']} · `{' '.join(data['config']['command'])}`",
        "",
        "Overlap efficiency = max(compute only, I/O only) / wall: 100% means writing cost nothing beyond the "
        "slower of the two (above 100%: noise in those references). Speedup = wall of (b) or (c) / wall of (d). "
        "Wall times include the writer's flush and, for the sink, the manifest and `_SUCCESS` commit. I/O only on S3 "
        "starts with creating the client (~0.3 s of botocore start-up in a fresh process), as each writer does "
        "inside its own wall time; `python -m benchmarks.ceiling` compares steady-state rates without it.",
        "",
        "| storage | workload | compute s | I/O only s | (b) Lighter s | (c) BPW s | (d) sink s | (b) eff. | "
        "(c) eff. | (d) eff. | (d) vs (b) | (d) vs (c) |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for cell in data["cells"]:
        v = cell["variants"]
        lines.append(
            f"| {cell['storage']} | {cell['workload']} | {_f(cell['compute_s'])} | {_f(cell['io_s'])} | "
            f"{_f(v.get('lighter', {}).get('wall_s'))} | {_f(v.get('lightning', {}).get('wall_s'))} | "
            f"{_f(v.get('sink', {}).get('wall_s'))} | {_pct(v.get('lighter', {}).get('overlap_efficiency'))} | "
            f"{_pct(v.get('lightning', {}).get('overlap_efficiency'))} | "
            f"{_pct(v.get('sink', {}).get('overlap_efficiency'))} | "
            f"{_f(v.get('sink', {}).get('speedup_vs_lighter'), 2, 'x')} | "
            f"{_f(v.get('sink', {}).get('speedup_vs_lightning'), 2, 'x')} |"
        )
    lines += [
        "",
        "Workloads: " + "; ".join(f"**{label}** {w['describe']}" for label, w in data["workloads"].items()) + ".",
        "",
        "## Every variant",
        "",
        "Stall = time the predict loop spent inside the writer's `on_predict_batch_end` per batch. Tail = time "
        "from the last batch's hook to the end of predict (flush and commit). Peak RSS is the run's own process.",
        "",
        "| storage | workload | variant | wall s | MB/s | pred/s | stall p50 ms | stall p99 ms | tail s | "
        "queue HWM MiB | peak RSS MiB | CPU s |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for cell in data["cells"]:
        for variant, figures in cell["variants"].items():
            lines.append(
                f"| {cell['storage']} | {cell['workload']} | {LABELS[variant]} | {_f(figures['wall_s'])} | "
                f"{_f(figures['mb_per_s'], 1)} | {_f(figures['predictions_per_s'], 0)} | "
                f"{_f(figures.get('stall_p50_ms'), 2)} | {_f(figures.get('stall_p99_ms'), 2)} | "
                f"{_f(figures.get('tail_s'), 2)} | {_f(figures.get('queue_high_water_mib'), 1)} | "
                f"{_f(figures.get('rss_peak_mib'), 0)} | {_f(figures.get('cpu_s'), 2)} |"
            )
    lines += _copy_markdown(data["cells"])
    if data.get("errors"):
        lines += ["", "## Runs that failed", ""]
        lines += [f"- {e['storage']} {e['workload']} {e['variant']}: {e['error']}" for e in data["errors"]]
    return "\n".join(lines) + "\n"


def _copy_markdown(cells: Sequence[dict[str, Any]]) -> list[str]:
    """(d) next to (d'), where both ran (``--copy both``): what the sink's copy of each batch at put costs."""
    pairs = [c for c in cells if "sink" in c["variants"] and "sink-nocopy" in c["variants"]]
    if not pairs:
        return []
    lines = [
        "",
        "## The copy at put",
        "",
        "(d) copies each batch at put (the default, `copy=True`); (d') hands the model's tensors over as they are.",
        "",
        "| storage | workload | (d) s | (d') s | (d) eff. | (d') eff. | (d) stall p50 / p99 ms | "
        "(d') stall p50 / p99 ms | (d) CPU s | (d') CPU s |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for cell in pairs:
        on, off = cell["variants"]["sink"], cell["variants"]["sink-nocopy"]
        lines.append(
            f"| {cell['storage']} | {cell['workload']} | {_f(on['wall_s'])} | {_f(off['wall_s'])} | "
            f"{_pct(on['overlap_efficiency'])} | {_pct(off['overlap_efficiency'])} | "
            f"{_f(on.get('stall_p50_ms'))} / {_f(on.get('stall_p99_ms'))} | "
            f"{_f(off.get('stall_p50_ms'))} / {_f(off.get('stall_p99_ms'))} | "
            f"{_f(on.get('cpu_s'))} | {_f(off.get('cpu_s'))} |"
        )
    return lines


def overlap_plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    storages = list(dict.fromkeys(c["storage"] for c in data["cells"]))
    workloads = list(dict.fromkeys(c["workload"] for c in data["cells"]))
    if not storages:
        return
    fig, axes = plt.subplots(
        len(storages), len(workloads), figsize=(3.3 * len(workloads), 2.6 * len(storages)), squeeze=False
    )
    by_key = {(c["storage"], c["workload"]): c for c in data["cells"]}
    variants = [v for v in LABELS if v != "sink-nocopy" or any(v in c["variants"] for c in data["cells"])]
    for row, storage in enumerate(storages):
        for col, label in enumerate(workloads):
            ax = axes[row][col]
            cell = by_key.get((storage, label))
            if cell is None:
                ax.set_axis_off()
                continue
            walls = [cell["variants"].get(v, {}).get("wall_s", 0.0) for v in variants]
            ax.bar(range(len(variants)), walls, color=[COLORS[v] for v in variants])
            if cell["ideal_s"] is not None:
                ax.axhline(cell["ideal_s"], color="black", linestyle="--", linewidth=0.8)
            sink = cell["variants"].get("sink", {})
            if sink.get("overlap_efficiency") is not None:
                ax.annotate(
                    _pct(sink["overlap_efficiency"]),
                    (variants.index("sink"), sink["wall_s"]),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
            ax.set_ylim(0, max(*walls, cell["ideal_s"] or 0.0, 1e-3) * 1.15)
            ax.set_xticks(range(len(variants)), [TICKS[v] for v in variants], fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
            ax.set_title(f"{storage} · {label}", fontsize=9)
            if col == 0:
                ax.set_ylabel("wall s", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[v]) for v in variants]
    fig.legend(handles, [LABELS[v] for v in variants], loc="lower center", ncol=len(variants), fontsize=8)
    fig.suptitle("Wall time per variant (dashed: max(compute only, I/O only); label: sink overlap efficiency)")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def memory_markdown(data: dict[str, Any]) -> str:
    env = data["environment"]
    lines = [
        "# Memory benchmark",
        "",
        f"{env['when']} · {env['cpus']} CPUs · torch {env['versions'].get('torch')} · "
        f"lightning {env['versions'].get('lightning')} · commit {env.get('commit') or '?'} · "
        f"`{' '.join(data['config']['command'])}`",
        "",
        f"Predictions of {data['config']['item']} through Trainer.predict(return_predictions=False) to a local "
        f"directory, batch {data['config']['batch']}, sink max_queue_bytes = {data['config']['max_queue_mib']} MiB; "
        "each row is its own process. Growth = RSS at the last batch minus RSS after the first tenth of the batches; "
        "'after predict' is sampled once the writer flushed (and the sink committed its manifest).",
        "",
        "| predictions | variant | wall s | pred/s | RSS at start MiB | RSS after 10% MiB | RSS at last batch MiB | "
        "RSS after predict MiB | peak RSS MiB | growth MiB | queue HWM MiB |",
        "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in data["rows"]:
        lines.append(
            f"| {row['items']:,} | {LABELS.get(row['variant'], row['variant'])} | {_f(row.get('wall_s'))} | "
            f"{_f(row.get('predictions_per_s'), 0)} | {_f(row.get('rss_start_mib'), 0)} | "
            f"{_f(row.get('rss_early_mib'), 0)} | {_f(row.get('rss_end_mib'), 0)} | {_f(row.get('rss_after_mib'), 0)} | "
            f"{_f(row.get('rss_peak_mib'), 0)} | {_f(row.get('growth_mib'), 1)} | "
            f"{_f(row.get('queue_high_water_mib'), 1)} |"
        )
    if data.get("errors"):
        lines += ["", "## Runs that failed", ""]
        lines += [f"- {e['items']} {e['variant']}: {e['error']}" for e in data["errors"]]
    return "\n".join(lines) + "\n"


def memory_plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in data["rows"]:
        trace = row.get("rss_trace") or []
        if trace:
            xs, ys = zip(*trace, strict=True)
            style = "-" if row["variant"] == "sink" else ":"
            (line,) = ax.plot(xs, ys, style, label=f"{LABELS.get(row['variant'], row['variant'])}, {row['items']:,}")
            # the peak may come after the last batch: the writer's flush and the sink's commit
            ax.plot([row["items"]], [row["rss_peak_mib"]], marker="x", color=line.get_color(), linestyle="none")
    ax.set_xlabel("predictions written")
    ax.set_ylabel("RSS MiB")
    ax.set_xscale("log")
    ax.set_title("RSS during predict (x: the run's peak, flush and commit included)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
