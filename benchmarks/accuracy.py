"""Accuracy of every compression method and allocation on the real MiniLM, without and with one recovery epoch.

For each task (``benchmarks/tasks.py``: Rotten Tomatoes, the task the defaults are tuned on, and two held-out
tasks) all-MiniLM-L6-v2 is fine-tuned once (cached under --work), one calibration pass collects the Fisher and the
input statistics on 512 training examples, then a copy is compressed per setting x kept fraction and evaluated on
the test split; with --recovery each is then fine-tuned for one epoch (the default pipeline's recovery) and
evaluated again. The ``-sequential`` settings compress block by block on the compressed blocks' outputs
(``--sequential``), ``-refit-up`` then solves each ``up`` against the dense layer's output (``--refit up``); every row
records the compression's own seconds.

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
from fwsvd_deploy.compression.sequential import compress_sequential
from fwsvd_deploy.manifest import package_versions
from fwsvd_deploy.modeling import EMBEDDED_MODEL

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import provenance  # noqa: E402
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
    # sequential calibration (each block fitted on the compressed blocks' outputs) and the closed-form refit
    {"method": "fisher-whitened", "allocation": "loss", "sequential": True},
    {"method": "fisher-whitened", "allocation": "loss", "sequential": True, "refit": "up"},
    {"method": "svd-llm", "allocation": "loss", "sequential": True},
    {"method": "svd-llm", "allocation": "loss", "sequential": True, "refit": "up"},
)
# how each task's baseline is fine-tuned: (training examples, epochs, max length)
TRAINING = {"rotten_tomatoes": (3000, 1, 64), "convention-party": (None, 2, 128), "debate-party": (None, 3, 128)}


def label(setting: dict) -> str:
    """Column name: method[-axis][-allocation][-joint][-xN][-sequential][-refit-up]."""
    name = setting["method"] + (f"-{setting['fisher_axis']}" if "fisher_axis" in setting else "")
    name += f"-{setting['allocation']}-alloc" if setting.get("allocation", "uniform") != "uniform" else ""
    name += "-joint" if setting.get("qkv") == "joint" else ""
    name += f"-x{setting['rank_multiple']}" if setting.get("rank_multiple", 1) > 1 else ""
    name += "-sequential" if setting.get("sequential") else ""
    return name + (f"-refit-{setting['refit']}" if setting.get("refit", "none") != "none" else "")


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
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of accuracy.json in --out that this run does not redo (same task, setting and "
                        "kept fraction are replaced)")
    a = p.parse_args(argv)
    try:
        previous = earlier_run(Path(a.out), a.calibration_samples) if a.merge else None
    except ValueError as e:
        p.error(str(e))  # exits 2 before any work
    work = Path(a.work)
    wanted = None if a.settings is None else set(a.settings.split(","))
    settings = [s for s in SETTINGS if wanted is None or label(s) in wanted]
    runs = [*(previous or {}).get("runs", []), provenance("accuracy.py", argv)]
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
                fields = {k: v for k, v in setting.items() if k != "sequential"}
                # a setting without an allocation is uniform (CompressionConfig's default depends on the method)
                cfg = CompressionConfig(ratio=ratio, **{"allocation": "uniform", **fields})
                began = time.perf_counter()
                if setting.get("sequential"):
                    report = compress_sequential(model, cfg, batches, stats, progress=False)
                else:
                    report = compress(model, cfg, stats)
                row = {"ratio": ratio, "setting": label(setting), "run": len(runs) - 1,
                       "kept_fraction": report.kept_fraction,
                       "compress_seconds": time.perf_counter() - began,
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
    training = {t: dict(zip(("train_samples", "epochs", "max_length"), TRAINING[t], strict=True))
                for t in a.tasks.split(",")}
    if previous is not None:
        results = merged(previous["tasks"], results)
        training = {**previous.get("training", {}), **training}
        settings = [s for s in SETTINGS if any(r["setting"] == label(s) for t in results for r in t["rows"])]
    (out / "accuracy.json").write_text(json.dumps({
        "benchmark": "accuracy", "model": EMBEDDED_MODEL, "calibration_samples": a.calibration_samples,
        "training": training, "runs": runs, "tasks": results, "versions": package_versions()}, indent=2))
    lines = [f"Run {i}: `{r['command']}` ({r['date']}, commit {r['commit']}, {r['machine']})"
             for i, r in enumerate(runs)]
    lines += ["", "Each row comes from the run its `run` field names in accuracy.json.", ""] if len(runs) > 1 else [""]
    for task in results:
        ratios = sorted({r["ratio"] for r in task["rows"]}, reverse=True)
        recovered = any("accuracy_recovered" in r for r in task["rows"])
        lines += [f"**{task['task']}** — {task['eval_examples']} test examples, baseline "
                  f"{task['baseline_accuracy']:.4f}; accuracy without fine-tuning after compression"
                  + (" / after one recovery epoch" if recovered else ""), "",
                  "| setting | " + " | ".join(f"keep {r}" for r in ratios) + " | compression seconds |",
                  "|---|" + "---:|" * (len(ratios) + 1)]
        for setting in settings:
            by_ratio = {r["ratio"]: r for r in task["rows"] if r["setting"] == label(setting)}
            cells = []
            for ratio in ratios:
                row = by_ratio.get(ratio)
                cell = "" if row is None else f"{row['accuracy']:.4f}"
                if row is not None and "accuracy_recovered" in row:
                    cell += f" / {row['accuracy_recovered']:.4f}"
                cells.append(cell)
            seconds = [f"{by_ratio[r]['compress_seconds']:.1f}" for r in ratios
                       if "compress_seconds" in by_ratio.get(r, {})]
            lines.append(f"| {label(setting)} | " + " | ".join(cells) + f" | {' / '.join(seconds)} |")
        lines.append("")
    (out / "accuracy.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def earlier_run(out: Path, calibration_samples: int) -> dict | None:
    """The accuracy.json in ``out`` that --merge adds to (``None`` if there is none).

    Raises:
        ValueError: it was measured on another model or with other calibration; its rows would not compare.
    """
    path = out / "accuracy.json"
    if not path.is_file():
        return None
    previous = json.loads(path.read_text())
    if "runs" not in previous:
        raise ValueError(f"--merge: {path} does not record the runs that measured it; rerun without --merge")
    if (previous.get("model"), previous.get("calibration_samples")) != (EMBEDDED_MODEL, calibration_samples):
        raise ValueError(f"--merge: {path} was measured on {previous.get('model')} with "
                         f"{previous.get('calibration_samples')} calibration samples, this run {EMBEDDED_MODEL} "
                         f"with {calibration_samples}; write to another --out")
    return previous


def merged(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` task results with the rows of ``new`` put in (a row is its task, setting and kept fraction). A task
    run before keeps its own timing (calibration, total seconds); only its redone rows change."""
    tasks = {t["task"]: dict(t) for t in old}
    for task in new:
        if task["task"] not in tasks:
            tasks[task["task"]] = task
            continue
        redone = {(r["setting"], r["ratio"]) for r in task["rows"]}
        kept = [r for r in tasks[task["task"]]["rows"] if (r["setting"], r["ratio"]) not in redone]
        tasks[task["task"]] = {**tasks[task["task"]], "rows": kept + task["rows"]}
    return list(tasks.values())


if __name__ == "__main__":
    sys.exit(main())
