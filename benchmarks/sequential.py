"""Sequential calibration x closed-form refit on the real SmolLM2-135M, on two unrelated corpora.

For each corpus (the built-in convention speeches, and the built-in Guardian headlines: news, unrelated to the
speeches), calibrated on --calibration windows of its own training split and scored by perplexity on --eval windows
of its own test split: one pass over the dense model (Fisher and input statistics, cached), then per method x kept
fraction x variant a copy of the model compressed

* ``one-pass``: every layer fitted to the dense model's statistics (``compress``);
* ``refit``: the same, then ``up`` solved by least squares (for the whitened methods this is the factors they already
  have: a control that must equal ``one-pass``);
* ``sequential``: block by block, each on the outputs of the compressed blocks before it (``--sequential``);
* ``sequential+refit``: and ``up`` solved against the dense layer's output (``--refit up``);
* ``sequential+alternate``: and then ``down`` given ``up``, and ``up`` again (``--refit alternate``).

Each row records the compression's own seconds and peak resident memory (sampled, the statistics pass excluded), at
the same ranks (the allocation is the same: one global greedy over the dense statistics, or uniform ranks).
``--allocation method`` gives each method the allocation it takes by default (``loss`` for the default method,
``uniform`` for svd-llm), ``--allocation loss`` (the default) the same greedy allocation to all.

    python benchmarks/sequential.py
    python benchmarks/sequential.py --corpora speeches --methods fisher-whitened --ratios 0.8

Rows are appended to <out>/<name>.<allocation>.partial.jsonl as they finish, so an interrupted run resumes where it
stopped.
Writes benchmarks/results/sequential.json and sequential.md (``--name`` another stem).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from common import PeakRSS, provenance

from fwsvd_deploy import CompressionConfig, DataConfig, compress
from fwsvd_deploy.compression import collect_statistics, resolve_targets
from fwsvd_deploy.compression.sequential import compress_sequential
from fwsvd_deploy.data import lm_windows, load_text, window_batches
from fwsvd_deploy.modeling import EMBEDDED_DECODER, load_causal_lm, load_tokenizer, package_versions
from fwsvd_deploy.training import evaluate_lm

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "one-pass": (False, "none"),
    "refit": (False, "up"),
    "sequential": (True, "none"),
    "sequential+refit": (True, "up"),
    "sequential+alternate": (True, "alternate"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpora", default="speeches,headlines")
    p.add_argument("--methods", default="fisher-whitened,svd-llm")
    p.add_argument("--ratios", default="0.8,0.6")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--calibration", type=int, default=64, help="calibration windows")
    p.add_argument("--eval", type=int, default=40, help="test windows scored")
    p.add_argument("--batch", type=int, default=4, help="calibration windows per batch")
    p.add_argument("--cache", default=str(HERE.parent / ".cache" / "bench" / "statistics"))
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--allocation", default="loss", choices=("loss", "fisher", "uniform", "method"),
                   help="rank allocation; method: each method's own default (default: %(default)s)")
    p.add_argument("--name", default="sequential", help="results file stem (default: %(default)s)")
    a = p.parse_args(argv)
    for name in a.variants.split(","):
        if name not in VARIANTS:
            p.error(f"--variants: unknown {name!r}; choose from {', '.join(VARIANTS)}")
    torch.manual_seed(0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"{a.name}.{a.allocation}.partial.jsonl"  # rows of one allocation resume only that allocation
    rows = [json.loads(line) for line in partial.read_text().splitlines()] if partial.is_file() else []
    key = lambda r: (r["corpus"], r["method"], r["ratio"], r["variant"])  # noqa: E731
    done = {key(r) for r in rows}
    model = load_causal_lm(EMBEDDED_DECODER)
    tokenizer = load_tokenizer(EMBEDDED_DECODER)
    chosen = {} if a.allocation == "method" else {"allocation": a.allocation}  # "method": each method's default
    corpora = {}
    for corpus in a.corpora.split(","):
        data = DataConfig(dataset=corpus, max_length=a.length)
        calib = lm_windows(load_text(data, "train"), tokenizer, a.length, count=a.calibration, seed=0)
        test = lm_windows(load_text(data, "test"), tokenizer, a.length, count=a.eval, seed=0)
        batches = window_batches(calib, a.batch)
        baseline = evaluate_lm(model, test).metrics["perplexity"]
        with PeakRSS() as peak:
            began = time.perf_counter()
            stats = collect_statistics(model, batches, resolve_targets(model), kinds=("fisher", "inputs"),
                                       cache_dir=a.cache)
        corpora[corpus] = {"baseline_perplexity": baseline, "calibration_windows": int(calib.shape[0]),
                           "eval_windows": int(test.shape[0]), "statistics_seconds": time.perf_counter() - began,
                           "statistics_from_cache": stats.from_cache, "statistics_peak_rss_gb": peak.peak / 1e9}
        print(corpus, corpora[corpus], flush=True)
        for method in a.methods.split(","):
            for ratio in (float(r) for r in a.ratios.split(",")):
                for variant in a.variants.split(","):
                    if (corpus, method, ratio, variant) in done:
                        continue
                    sequential, refit = VARIANTS[variant]
                    cfg = CompressionConfig(method=method, ratio=ratio, refit=refit, **chosen)
                    compressed = copy.deepcopy(model)
                    with PeakRSS() as peak:
                        began = time.perf_counter()
                        if sequential:
                            report = compress_sequential(compressed, cfg, batches, stats, progress=False)
                        else:
                            report = compress(compressed, cfg, stats)
                        seconds = time.perf_counter() - began
                    row = {"corpus": corpus, "method": method, "ratio": ratio, "variant": variant,
                           "allocation": report.allocation,
                           "kept_fraction": report.kept_fraction, "compress_seconds": seconds,
                           "compress_peak_rss_gb": peak.peak / 1e9,
                           "perplexity": evaluate_lm(compressed, test).metrics["perplexity"]}
                    row["perplexity_ratio"] = row["perplexity"] / baseline
                    rows.append(row)
                    with partial.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(row, flush=True)
                    del compressed
    known = {r["corpus"] for r in rows} - set(corpora)
    if known:
        print(f"note: rows of {sorted(known)} come from an earlier run of this file (their baselines are in it)")
    previous = json.loads((out / f"{a.name}.json").read_text()).get("corpora", {}) \
        if (out / f"{a.name}.json").is_file() else {}
    corpora = {**{k: v for k, v in previous.items() if k in known}, **corpora}
    result = {"benchmark": "sequential", "model": EMBEDDED_DECODER, "window": a.length, "corpora": corpora,
              "allocation": a.allocation, "provenance": provenance("sequential.py", argv), "rows": rows,
              "versions": package_versions()}
    (out / f"{a.name}.json").write_text(json.dumps(result, indent=2))
    allocation = "each method's own" if a.allocation == "method" else f"`{a.allocation}`"
    lines = [f"Perplexity of SmolLM2-135M (ratio to its dense baseline) on held-out windows of {a.length} tokens, "
             f"calibrated on each corpus's own training split; no fine-tuning; {allocation} allocation (the same "
             "ranks in every variant). Seconds and peak RSS are the compression's own (statistics pass excluded).",
             "",
             f"`{result['provenance']['command']}` — {result['provenance']['date']}, "
             f"{result['provenance']['machine']}, commit {result['provenance']['commit']}", ""]
    for corpus, info in corpora.items():
        lines += [f"### {corpus} (baseline {info['baseline_perplexity']:.2f}, {info['calibration_windows']} "
                  f"calibration / {info['eval_windows']} test windows)", "",
                  "| method | allocation | keep | variant | perplexity | ratio | seconds | peak RSS GB |",
                  "|---|---|---:|---|---:|---:|---:|---:|"]
        for r in rows:
            if r["corpus"] == corpus:
                lines.append(f"| {r['method']} | {r.get('allocation', 'loss')} | {r['ratio']} | {r['variant']} "
                             f"| {r['perplexity']:.2f} | "
                             f"{r['perplexity_ratio']:.3f} | {r['compress_seconds']:.0f} | "
                             f"{r['compress_peak_rss_gb']:.2f} |")
        lines.append("")
    (out / f"{a.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
