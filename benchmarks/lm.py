"""Perplexity of every compression method and allocation on the real SmolLM2-135M, without and with recovery.

The embedded SmolLM2-135M-Instruct on the built-in convention speeches: one calibration pass (Fisher and input
statistics on --calibration windows of --length tokens from the training split), then a copy per setting x kept
fraction of the block-linear parameters, scored by perplexity on --eval windows of the test split (non-overlapping,
token-weighted). With --recovery the settings named by --recover are trained for --recovery-steps on the training
split's windows (factors only, best held-out perplexity on the validation split kept) and scored again.
--dense-recovery trains the dense model the same way (every weight) as a control: how much of a recovered
perplexity is adaptation to the speeches rather than repair of the compression.

    python benchmarks/lm.py --ratios 0.8,0.6 --recovery

With --memory it measures instead the peak resident memory of the default compression's phases on SmolLM2 (the
Fisher pass, the input-moment pass, both computed into an empty cache, then the compression reading them back
layer by layer), accounts for it by what each phase holds (``shapes.calibration_bytes``: the float32 model, the
Fisher, the float64 input moments) and projects the same accounting to Llama-3.2-1B and Llama-2-7B: each phase's
peak there is its terms at that size plus what SmolLM2's peak held beyond its own terms (the runtime, the data, the
activations of one window), taken as fixed. Writes benchmarks/results/lm_memory.json and lm_memory.md.

    python benchmarks/lm.py --memory

Rows are appended to <out>/lm.partial.jsonl as they finish, so an interrupted run resumes where it stopped.
Writes benchmarks/results/lm.json and lm.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from fwsvd_deploy import CompressionConfig, DataConfig, FinetuneConfig, compress
from fwsvd_deploy.compression import collect_statistics, resolve_targets
from fwsvd_deploy.data import lm_windows, load_text, window_batches
from fwsvd_deploy.modeling import EMBEDDED_DECODER, load_causal_lm, load_tokenizer, package_versions
from fwsvd_deploy.training import evaluate_lm, finetune_lm

HERE = Path(__file__).resolve().parent
SETTINGS = (
    {"method": "svd"},
    {"method": "fwsvd", "fisher_axis": "output"},
    {"method": "fwsvd", "fisher_axis": "both"},
    {"method": "fwsvd", "fisher_axis": "input"},
    {"method": "fwsvd", "fisher_axis": "both", "allocation": "loss"},
    {"method": "asvd"},
    {"method": "svd-llm"},
    {"method": "svd-llm", "allocation": "loss"},
    {"method": "fisher-whitened", "fisher_power": 0.5},
    {"method": "fisher-whitened", "fisher_power": 0.5, "allocation": "loss"},
    {"method": "fisher-whitened", "fisher_power": 1.0, "allocation": "loss"},
    {"method": "fisher-whitened", "fisher_power": 0.5, "allocation": "loss", "qkv": "joint"},
)


DENSE = "dense"  # the row of --dense-recovery


def recovery_config(a: argparse.Namespace, trainable: str) -> FinetuneConfig:
    return FinetuneConfig(max_steps=a.recovery_steps, learning_rate=a.recovery_lr, batch_size=4,
                          eval_steps=max(1, a.recovery_steps // 4), trainable=trainable, warmup_ratio=0.05)


def label(setting: dict) -> str:
    name = setting["method"] + (f"-{setting['fisher_axis']}" if "fisher_axis" in setting else "")
    name += f"-p{setting['fisher_power']}" if "fisher_power" in setting else ""
    name += f"-{setting['allocation']}-alloc" if setting.get("allocation", "uniform") != "uniform" else ""
    return name + ("-joint" if setting.get("qkv") == "joint" else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", default="0.8,0.6")
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--calibration", type=int, default=64, help="calibration windows")
    p.add_argument("--eval", type=int, default=40, help="test windows scored")
    p.add_argument("--settings", default=None, help="comma-separated setting names to run (default: all)")
    p.add_argument("--recovery", action="store_true")
    p.add_argument("--recover", default="svd-llm,fisher-whitened-p0.5-loss-alloc",
                   help="settings that get recovery training")
    p.add_argument("--recovery-steps", type=int, default=200)
    p.add_argument("--recovery-lr", type=float, default=1e-4)
    p.add_argument("--dense-recovery", action="store_true", help="also train the dense model the same way (control)")
    p.add_argument("--cache", default=str(HERE.parent / ".cache" / "bench" / "statistics"))
    p.add_argument("--memory", action="store_true", help="measure the default compression's peak memory instead "
                   "(at the first of --ratios) and project it to 1 B and 7 B Llamas")
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.memory:
        return memory_run(a, out, argv)
    partial = out / "lm.partial.jsonl"
    done = [json.loads(line) for line in partial.read_text().splitlines()] if partial.is_file() else []
    # the last row of a setting and ratio wins (one with recovery, appended after the same row without)
    done = list({(r["setting"], r["ratio"]): r for r in done}.values())
    data = DataConfig(dataset="speeches", max_length=a.length)
    model = load_causal_lm(EMBEDDED_DECODER)
    tokenizer = load_tokenizer(EMBEDDED_DECODER)
    train = load_text(data, "train")
    calib = lm_windows(train, tokenizer, a.length, count=a.calibration, seed=0)
    test = lm_windows(load_text(data, "test"), tokenizer, a.length, count=a.eval, seed=0)
    valid = lm_windows(load_text(data, "validation"), tokenizer, a.length, count=16, seed=0)
    train_windows = lm_windows(train, tokenizer, a.length)
    start = time.perf_counter()
    baseline = evaluate_lm(model, test).metrics["perplexity"]
    eval_seconds = time.perf_counter() - start
    print(f"baseline perplexity {baseline:.3f} on {test.shape[0]} windows of {a.length} ({eval_seconds:.0f} s)",
          flush=True)
    start = time.perf_counter()
    stats = collect_statistics(model, window_batches(calib, 4), resolve_targets(model), kinds=("fisher", "inputs"),
                               cache_dir=a.cache)
    stats_seconds = time.perf_counter() - start
    print(f"calibration: {stats.num_examples} windows, {stats_seconds:.0f} s (cached: {stats.from_cache})", flush=True)
    wanted = None if a.settings is None else set(a.settings.split(","))
    recover = set(a.recover.split(",")) if a.recovery else set()
    rows = list(done)
    if a.dense_recovery and not any(r["setting"] == DENSE for r in done):
        dense = copy.deepcopy(model)
        result = finetune_lm(dense, train_windows, recovery_config(a, "all"), eval_windows=valid)
        row = {"ratio": 1.0, "setting": DENSE, "kept_fraction": 1.0, "perplexity": baseline,
               "recovered": evaluate_lm(dense, test).metrics["perplexity"], "recovery_seconds": result.seconds,
               "recovery_best_step": result.best_step}
        rows.append(row)
        with partial.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(row, flush=True)
    for ratio in (float(r) for r in a.ratios.split(",")):
        for setting in SETTINGS:
            name = label(setting)
            if (wanted is not None and name not in wanted) or any(
                    r["setting"] == name and r["ratio"] == ratio and ("recovered" in r or name not in recover)
                    for r in done):
                continue
            compressed = copy.deepcopy(model)
            began = time.perf_counter()
            # a setting without an allocation is uniform (CompressionConfig's default depends on the method)
            report = compress(compressed, CompressionConfig(ratio=ratio, **{"allocation": "uniform", **setting}), stats)
            row = {"ratio": ratio, "setting": name, "kept_fraction": report.kept_fraction,
                   "compress_seconds": time.perf_counter() - began,
                   "perplexity": evaluate_lm(compressed, test).metrics["perplexity"]}
            if name in recover:
                result = finetune_lm(compressed, train_windows, recovery_config(a, "factors"), eval_windows=valid)
                row.update(recovered=evaluate_lm(compressed, test).metrics["perplexity"],
                           recovery_seconds=result.seconds, recovery_best_step=result.best_step)
            # a row measured again with recovery replaces the one without
            rows = [r for r in rows if not (r["setting"] == name and r["ratio"] == ratio)] + [row]
            with partial.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(row, flush=True)
    recovered = a.recovery or any("recovered" in r for r in rows)  # rows kept from an earlier --recovery run
    result = {"benchmark": "lm", "model": EMBEDDED_DECODER, "data": "speeches", "window": a.length,
              "calibration_windows": a.calibration, "eval_windows": int(test.shape[0]),
              "baseline_perplexity": baseline, "calibration_seconds": stats_seconds,
              "calibration_from_cache": stats.from_cache,
              "recovery": {"steps": a.recovery_steps, "learning_rate": a.recovery_lr, "batch_windows": 4,
                           "trainable": "factors"} if recovered else None,
              "rows": rows, "versions": package_versions()}
    (out / "lm.json").write_text(json.dumps(result, indent=2))
    ratios = sorted({r["ratio"] for r in rows if r["setting"] != DENSE}, reverse=True)
    control = next((r for r in rows if r["setting"] == DENSE), None)
    lines = [f"Perplexity of SmolLM2-135M on {test.shape[0]} held-out windows of {a.length} tokens of the convention "
             f"speeches (baseline {baseline:.2f}); no fine-tuning after compression"
             + (" / after recovery" if recovered else "")
             + ("" if control is None else f"; the dense model after the same recovery (every weight trained): "
                f"{control['recovered']:.2f}"), "",
             "| setting | " + " | ".join(f"keep {r}" for r in ratios) + " |", "|---|" + "---:|" * len(ratios)]
    for setting in SETTINGS:
        cells = []
        for ratio in ratios:
            row = next((r for r in rows if r["setting"] == label(setting) and r["ratio"] == ratio), None)
            cell = "" if row is None else f"{row['perplexity']:,.2f}"
            if row is not None and "recovered" in row:
                cell += f" / {row['recovered']:.2f}"
            cells.append(cell)
        lines.append(f"| {label(setting)} | " + " | ".join(cells) + " |")
    (out / "lm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


PROJECTED = ("smollm2-135m", "llama-3.2-1b", "llama-2-7b")
# what each phase holds beyond the process's fixed part, from calibration_bytes' terms
PHASE_TERMS = {"fisher": ("model", "fisher"), "inputs": ("model", "moments"), "compress": ("model", "model")}


def memory_run(a: argparse.Namespace, out: Path, argv: list[str] | None) -> int:
    sys.path.insert(0, str(HERE))
    from common import PeakRSS, provenance
    from shapes import calibration_bytes, shape_config

    ratio = float(a.ratios.split(",")[0])
    model = load_causal_lm(EMBEDDED_DECODER)
    tokenizer = load_tokenizer(EMBEDDED_DECODER)
    calib = lm_windows(load_text(DataConfig(dataset="speeches", max_length=a.length), "train"), tokenizer, a.length,
                       count=a.calibration, seed=0)
    batches, targets = window_batches(calib, 4), resolve_targets(model)
    loaded = PeakRSS.current()
    peaks, seconds = {}, {}
    with tempfile.TemporaryDirectory() as cache:  # computed, not read from an earlier run's cache
        for kind in ("fisher", "inputs"):
            start = time.perf_counter()
            with PeakRSS() as peak:
                collect_statistics(model, batches, targets, kinds=(kind,), cache_dir=cache)
            peaks[kind], seconds[kind] = peak.peak, time.perf_counter() - start
        stats = collect_statistics(model, batches, targets, kinds=("fisher", "inputs"), cache_dir=cache)
        start = time.perf_counter()
        with PeakRSS() as peak:
            report = compress(model, CompressionConfig(ratio=ratio), stats)
        peaks["compress"], seconds["compress"] = peak.peak, time.perf_counter() - start
    terms = {name: calibration_bytes(shape_config(name)) for name in PROJECTED}
    smol = terms["smollm2-135m"]
    fixed = {phase: peaks[phase] - sum(smol[t] for t in PHASE_TERMS[phase]) for phase in peaks}
    projection = {name: {phase: fixed[phase] + sum(t[k] for k in PHASE_TERMS[phase]) for phase in peaks}
                  for name, t in terms.items()}
    result = {**provenance("lm.py", argv), "model": EMBEDDED_DECODER, "ratio": ratio,
              "kept_fraction": report.kept_fraction, "calibration_windows": a.calibration, "window": a.length,
              "loaded_rss_bytes": loaded, "peak_rss_bytes": peaks, "seconds": seconds, "terms": terms,
              "phase_terms": PHASE_TERMS, "fixed_bytes": fixed, "projected_peak_bytes": projection,
              "versions": package_versions()}
    (out / "lm_memory.json").write_text(json.dumps(result, indent=2))
    gb = 1e9
    lines = ["# Peak memory of the default compression, and its projection", "", f"`{result['command']}`", "",
             f"{result['date']}, commit {result['commit']}, {result['machine']}. SmolLM2-135M, the default method "
             f"(`fisher-whitened`, `loss` allocation) at keep {ratio:g}, {a.calibration} calibration windows of "
             f"{a.length} tokens; the statistics computed into an empty cache, one pass per kind, then read back "
             f"one layer at a time by the compression. Resident after loading the model: {loaded / gb:.2f} GB.", "",
             "| phase | measured peak (GB) | seconds | held (terms) |", "|---|---:|---:|---|"]
    for phase in peaks:
        lines.append(f"| {phase} | {peaks[phase] / gb:.2f} | {seconds[phase]:.1f} | "
                     f"{' + '.join(PHASE_TERMS[phase])} |")
    lines += ["", "Terms (GB): " + "; ".join(f"{name}: " + ", ".join(f"{k} {v / gb:.2f}" for k, v in t.items())
                                          for name, t in terms.items()), "",
              "Projected peak per phase (GB): each phase's terms at that size, plus what SmolLM2's peak held beyond "
              "its own terms.", "",
              "| model | fisher | inputs | compress | peak |", "|---|---:|---:|---:|---:|"]
    for name, p in projection.items():
        lines.append(f"| {name} | " + " | ".join(f"{p[k] / gb:.1f}" for k in peaks)
                     + f" | **{max(p.values()) / gb:.1f}** |")
    (out / "lm_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
