"""PNG plots for reports: latency per grid cell, and the search's accuracy/latency against the kept fraction."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_plot(latency: dict[str, Any], path: Path) -> Path:
    """Grouped bars of median latency (p10-p90 of each model's runs as error bars) per batch x sequence."""
    plt = _pyplot()
    cells = latency["cells"]
    names = list(cells[0]["models"])
    labels = [f"{c['batch']}x{c['sequence']}" for c in cells]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cells)), 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        med = [c["models"][name]["p50_ms"] for c in cells]
        hi = [c["models"][name]["p90_ms"] - c["models"][name]["p50_ms"] for c in cells]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(cells))]
        ax.bar(xs, med, width, yerr=[[0] * len(hi), hi], capsize=2, label=name)
    ax.set_xticks(range(len(cells)), labels)
    ax.set_yscale("log")
    ax.set_xlabel("batch x sequence")
    ax.set_ylabel("median latency, ms (bar to p90)")
    ax.set_title(f"{latency['device']} execution provider, {latency['threads']} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def generation_plot(generation: dict[str, Any], path: Path) -> Path:
    """Prefill time and per-token decode time per batch size, one bar per model (bar to p90)."""
    plt = _pyplot()
    cells = generation["cells"]
    names = list(cells[0]["models"])
    fig, axes = plt.subplots(1, 2, figsize=(max(7, 2.4 * len(cells)), 4))
    width = 0.8 / len(names)
    for ax, phase, label, stat in ((axes[0], "prefill", f"prefill of {generation['prompt_tokens']} tokens", "p50_ms"),
                                   (axes[1], "decode", "decode, per token", "mean_ms")):
        for i, name in enumerate(names):
            mid = [c["models"][name][phase][stat] for c in cells]
            hi = [max(0.0, c["models"][name][phase]["p90_ms"] - m) for c, m in zip(cells, mid, strict=True)]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(cells))]
            ax.bar(xs, mid, width, yerr=[[0] * len(hi), hi], capsize=2, label=name)
        ax.set_xticks(range(len(cells)), [str(c["batch"]) for c in cells])
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"{'median' if stat == 'p50_ms' else 'mean'} ms (bar to p90)")
        ax.set_title(label)
        ax.legend()
    fig.suptitle(f"Generation with the KV cache: {generation['device']} execution provider, "
                 f"{generation['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def search_plot(trials: list[dict[str, Any]], max_accuracy_drop: float | None, path: Path) -> Path:
    """The task's main metric and the worst latency ratio against the kept fraction, with the gate's drop line."""
    plt = _pyplot()
    trials = sorted(trials, key=lambda t: t["ratio"])
    ratios = [t["ratio"] for t in trials]
    fig, ax = plt.subplots(figsize=(6, 4))
    metric = trials[0]["metric"]
    ax.plot(ratios, [t["metric_candidate"] for t in trials], "o-", label=f"candidate {metric}")
    base = trials[0]["metric_baseline"]
    ax.axhline(base, color="gray", linestyle=":", label=f"baseline {metric}")
    if max_accuracy_drop is not None:
        ax.axhline(base - max_accuracy_drop / 100.0, color="red", linestyle="--", label="gate")
    for t in trials:
        ax.annotate("pass" if t["passed"] else "fail", (t["ratio"], t["metric_candidate"]), fontsize=7,
                    textcoords="offset points", xytext=(0, 6), ha="center")
    ax.set_xlabel("kept fraction of block-linear parameters")
    ax.set_ylabel(metric)
    lat = [t["worst_latency_ratio"] for t in trials]
    if all(v is not None for v in lat):
        twin = ax.twinx()
        twin.plot(ratios, lat, "s--", color="tab:green", label="worst latency ratio")
        twin.set_ylabel("latency ratio to baseline")
        twin.legend(loc="lower right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
