"""Accuracy of every compression method and allocation on the real MiniLM, without and with one recovery epoch.

For each task (``benchmarks/tasks.py``: Rotten Tomatoes, the task the defaults are tuned on, and two held-out
tasks) all-MiniLM-L6-v2 is fine-tuned once (cached under --work), one calibration pass collects the Fisher and the
input statistics on 512 training examples, then a copy is compressed per setting x kept fraction and evaluated on
the test split; with --recovery each is then fine-tuned for one epoch (the default pipeline's recovery) and
evaluated again.

    python benchmarks/accuracy.py --tasks rotten_tomatoes,convention-party,debate-party --ratios 0.5,0.3 --recovery

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
    compress,
    evaluate,
    finetune,
    load_classifier,
    load_splits,
    load_tokenizer,
    save_model,
)
from fwsvd_deploy.compression import collect_statistics, resolve_targets
from fwsvd_deploy.compression.fisher import classifier_batches
from fwsvd_deploy.manifest import package_versions
from fwsvd_deploy.modeling import EMBEDDED_MODEL

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tasks import TASKS, task_files  # noqa: E402

# one column per setting: CompressionConfig fields besides the ratio
SETTINGS = (
    {"method": "svd"},
    {"method": "fwsvd", "fisher_axis": "both"},
    {"method": "fwsvd", "fisher_axis": "both", "allocation": "fisher"},
    {"method": "fwsvd", "fisher_axis": "both", "allocation": "loss"},
    {"method": "asvd"},
    {"method": "svd-llm"},
    {"method": "svd-llm", "allocation": "loss"},
    {"method": "fisher-whitened"},
    {"method": "fisher-whitened", "allocation": "loss"},
    {"method": "svd-llm", "qkv": "joint"},
)
# how each task's baseline is fine-tuned: (training examples, epochs, max length)
TRAINING = {"rotten_tomatoes": (3000, 1, 64), "convention-party": (None, 2, 128), "debate-party": (None, 3, 128)}


def label(setting: dict) -> str:
    """Column name: method[-axis][-allocation][-joint][-xN]."""
    name = setting["method"] + (f"-{setting['fisher_axis']}" if "fisher_axis" in setting else "")
    name += f"-{setting['allocation']}-alloc" if setting.get("allocation", "uniform") != "uniform" else ""
    name += "-joint" if setting.get("qkv") == "joint" else ""
    return name + (f"-x{setting['rank_multiple']}" if setting.get("rank_multiple", 1) > 1 else "")


def task_data(task: str, work: Path) -> DataConfig:
    samples, _, max_length = TRAINING[task]
    if task == "rotten_tomatoes":
        return DataConfig(max_length=max_length, max_train_samples=samples, eval_split="test")
    train, test = task_files(task, work)
    return DataConfig(dataset=str(train), eval_dataset=str(test), max_length=max_length,
                      max_train_samples=samples)


def baseline_model(task: str, work: Path):
    """The fine-tuned MiniLM of a task (trained once, cached), its tokenizer and the task's splits."""
    samples, epochs, length = TRAINING[task]
    data = task_data(task, work)
    splits = load_splits(data)
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    folder = work / f"minilm-{task}-{samples}-{epochs}-{length}"
    if not (folder / "config.json").is_file():
        model = load_classifier(EMBEDDED_MODEL, label_names=splits.label_names)
        finetune(model, splits.train, tokenizer, FinetuneConfig(epochs=epochs), max_length=length)
        save_model(model, folder, tokenizer, overwrite=True)
    return load_classifier(str(folder)), tokenizer, splits


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(HERE.parent / ".cache" / "bench"))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--ratios", default="0.5,0.3")
    p.add_argument("--calibration-samples", type=int, default=512)
    p.add_argument("--recovery", action="store_true", help="also fine-tune each compressed model for one epoch")
    p.add_argument("--settings", default=None, help="comma-separated column names to run (default: all)")
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args(argv)
    work = Path(a.work)
    wanted = None if a.settings is None else set(a.settings.split(","))
    settings = [s for s in SETTINGS if wanted is None or label(s) in wanted]
    results = []
    for task in a.tasks.split(","):
        base, tokenizer, splits = baseline_model(task, work)
        length = TRAINING[task][2]
        baseline = evaluate(base, splits.eval, tokenizer, max_length=length).accuracy
        print(f"{task}: baseline {baseline:.4f} on {len(splits.eval)} test examples", flush=True)
        start = time.perf_counter()
        batches = classifier_batches(splits.train.sample(a.calibration_samples, seed=0), tokenizer, 16, length)
        stats = collect_statistics(base, batches, resolve_targets(base), kinds=("fisher", "inputs"),
                                   cache_dir=str(work / "statistics"))
        rows = []
        for ratio in (float(r) for r in a.ratios.split(",")):
            for setting in settings:
                model = copy.deepcopy(base)
                # a setting without an allocation is uniform (CompressionConfig's default depends on the method)
                report = compress(model, CompressionConfig(ratio=ratio, **{"allocation": "uniform", **setting}), stats)
                row = {"ratio": ratio, "setting": label(setting), "kept_fraction": report.kept_fraction,
                       "accuracy": evaluate(model, splits.eval, tokenizer, max_length=length).accuracy}
                if a.recovery:
                    finetune(model, splits.train, tokenizer, FinetuneConfig(epochs=1), max_length=length,
                             progress=False)
                    row["accuracy_recovered"] = evaluate(model, splits.eval, tokenizer, max_length=length).accuracy
                rows.append(row)
                print(task, row, flush=True)
        results.append({"task": task, "baseline_accuracy": baseline, "eval_examples": len(splits.eval),
                        "calibration_seconds": stats.seconds, "seconds": time.perf_counter() - start, "rows": rows})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps({
        "benchmark": "accuracy", "model": EMBEDDED_MODEL, "calibration_samples": a.calibration_samples,
        "training": {t: dict(zip(("train_samples", "epochs", "max_length"), TRAINING[t], strict=True))
                     for t in a.tasks.split(",")},
        "tasks": results, "versions": package_versions()}, indent=2))
    lines = []
    for task in results:
        lines += [f"**{task['task']}** — {task['eval_examples']} test examples, baseline "
                  f"{task['baseline_accuracy']:.4f}; accuracy without fine-tuning after compression"
                  + (" / after one recovery epoch" if a.recovery else ""), "",
                  "| setting | " + " | ".join(f"keep {r}" for r in sorted({r["ratio"] for r in task["rows"]},
                                                                           reverse=True)) + " |",
                  "|---|" + "---:|" * len({r["ratio"] for r in task["rows"]})]
        for setting in settings:
            cells = []
            for row in sorted((r for r in task["rows"] if r["setting"] == label(setting)), key=lambda r: -r["ratio"]):
                cell = f"{row['accuracy']:.4f}"
                if "accuracy_recovered" in row:
                    cell += f" / {row['accuracy_recovered']:.4f}"
                cells.append(cell)
            lines.append(f"| {label(setting)} | " + " | ".join(cells) + " |")
        lines.append("")
    (out / "accuracy.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
