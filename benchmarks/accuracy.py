"""Accuracy of SVD and FWSVD on every Fisher axis, without fine-tuning, on the real MiniLM and real data.

Fine-tunes all-MiniLM-L6-v2 on the built-in Rotten Tomatoes training split (cached under --work), collects one
Fisher pass, then compresses a copy per method x kept fraction and evaluates each on the test split. The
`-joint` columns factorise each attention block's q/k/v stacked, with one shared down-projection; `-x16` rounds
every rank to a multiple of 16 within the same budget (`rank_multiple=16`); `-fisher-alloc` spends the budget
greedily over the Fisher-weighted singular values instead of uniformly.

    python benchmarks/accuracy.py --ratios 0.5,0.3

Writes benchmarks/results/accuracy.json and accuracy.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from fwsvd_deploy import (
    CompressionConfig,
    DataConfig,
    FinetuneConfig,
    FisherConfig,
    collect_fisher,
    compress,
    evaluate,
    finetune,
    load_classifier,
    load_splits,
    load_tokenizer,
    save_model,
)
from fwsvd_deploy.manifest import package_versions
from fwsvd_deploy.modeling import EMBEDDED_MODEL

HERE = Path(__file__).resolve().parent
# one column per setting: CompressionConfig fields besides the ratio
METHODS = (
    {"method": "svd"},
    {"method": "fwsvd", "fisher_axis": "input"},
    {"method": "fwsvd", "fisher_axis": "output"},
    {"method": "fwsvd", "fisher_axis": "both"},
    {"method": "svd", "qkv": "joint"},
    {"method": "fwsvd", "fisher_axis": "both", "qkv": "joint"},
    {"method": "fwsvd", "fisher_axis": "both", "qkv": "joint", "rank_multiple": 16},
    {"method": "fwsvd", "fisher_axis": "both", "allocation": "fisher"},
)


def label(setting: dict) -> str:
    """Column name: method[-axis][-joint][-xN][-fisher-alloc]."""
    name = setting["method"] + (f"-{setting['fisher_axis']}" if "fisher_axis" in setting else "")
    name += "-joint" if setting.get("qkv") == "joint" else ""
    name += f"-x{setting['rank_multiple']}" if setting.get("rank_multiple", 1) > 1 else ""
    return name + ("-fisher-alloc" if setting.get("allocation") == "fisher" else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(HERE.parent / ".cache" / "bench-accuracy"))
    p.add_argument("--ratios", default="0.5,0.3")
    p.add_argument("--train-samples", type=int, default=3000)
    p.add_argument("--fisher-samples", type=int, default=512)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args(argv)

    data = DataConfig(max_length=a.max_length, max_train_samples=a.train_samples, eval_split="test")
    splits = load_splits(data)
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    folder = Path(a.work) / f"minilm-rt-{a.train_samples}-{a.max_length}"
    if not (folder / "config.json").is_file():
        model = load_classifier(EMBEDDED_MODEL, label_names=splits.label_names)
        finetune(model, splits.train, tokenizer, FinetuneConfig(epochs=1), max_length=a.max_length)
        save_model(model, folder, tokenizer, overwrite=True)
    base = load_classifier(str(folder))
    baseline = evaluate(base, splits.eval, tokenizer, max_length=a.max_length).accuracy
    start = time.perf_counter()
    fisher = collect_fisher(base, splits.train, tokenizer, FisherConfig(num_samples=a.fisher_samples),
                            max_length=a.max_length)
    fisher_seconds = time.perf_counter() - start
    rows = []
    for ratio in (float(r) for r in a.ratios.split(",")):
        for setting in METHODS:
            model = copy.deepcopy(base)
            cfg = CompressionConfig(ratio=ratio, **setting)
            report = compress(model, cfg, fisher if cfg.method == "fwsvd" else None)
            acc = evaluate(model, splits.eval, tokenizer, max_length=a.max_length).accuracy
            rows.append({"ratio": ratio, "method": label(setting), "accuracy": acc,
                         "kept_fraction": report.kept_fraction})
            print(rows[-1], flush=True)
    result = {"benchmark": "accuracy", "model": EMBEDDED_MODEL, "data": data.to_dict(),
              "eval_examples": len(splits.eval), "baseline_accuracy": baseline, "fisher_examples": a.fisher_samples,
              "fisher_seconds": fisher_seconds, "rows": rows, "versions": package_versions()}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(result, indent=2))
    ratios = sorted({r["ratio"] for r in rows}, reverse=True)
    lines = [f"Accuracy on {len(splits.eval)} Rotten Tomatoes test reviews, no fine-tuning after compression "
             f"(baseline {baseline:.4f}; MiniLM fine-tuned on {a.train_samples} reviews, 1 epoch; Fisher from "
             f"{a.fisher_samples} examples)", "",
             "| kept | " + " | ".join(label(m) for m in METHODS) + " |",
             "|---:|" + "---:|" * len(METHODS)]
    for ratio in ratios:
        accs = {r["method"]: r["accuracy"] for r in rows if r["ratio"] == ratio}
        lines.append(f"| {ratio} | " + " | ".join(f"{accs[label(m)]:.4f}" for m in METHODS) + " |")
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
