"""Stages, each artifact in -> artifact out: model folder + data -> fine-tuned or compressed model folder."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import atomic_output_dir, check_output_dir, save_compressed, save_model, write_compressed
from .compression.apply import compress
from .compression.fisher import DEFAULT_EXAMPLES, classifier_batches
from .compression.report import CompressionReport
from .compression.statistics import CalibrationStats, collect_statistics
from .compression.targets import resolve_targets
from .config import CalibrationConfig, CompressionConfig, DataConfig, FinetuneConfig
from .data import (
    BUILTIN_SPEECHES,
    TaskData,
    TextData,
    align_labels,
    lm_windows,
    load_splits,
    load_text,
    window_batches,
)
from .errors import DatasetError
from .modeling import (
    has_classification_head,
    is_causal_lm,
    is_compressed,
    load_causal_lm,
    load_classifier,
    load_config,
    load_tokenizer,
    model_fingerprint,
    model_label2id,
    read_plan,
    resolve_model,
)
from .training import EvalResult, FinetuneResult, evaluate, evaluate_lm, finetune, finetune_lm

DEFAULT_WINDOWS = 64  # calibration windows of a causal LM when CalibrationConfig.num_samples is None


@dataclass(frozen=True)
class FinetuneOutcome:
    out_dir: Path
    result: FinetuneResult
    eval_before: EvalResult | None
    eval_after: EvalResult | None
    compressed: bool


@dataclass(frozen=True)
class CompressOutcome:
    out_dir: Path
    report: CompressionReport
    statistics: CalibrationStats | None
    compress_seconds: float
    eval_before: EvalResult | None
    eval_after: EvalResult | None


def _load_task(model_spec: str, data_cfg: DataConfig, *, allow_compressed: bool) -> tuple[Any, Any, Any]:
    """Model, tokenizer and label-aligned splits; a head-less model gets a head sized from the data."""
    source = resolve_model(model_spec)
    splits = load_splits(data_cfg)
    if is_compressed(source) or has_classification_head(load_config(model_spec)):
        model = load_classifier(model_spec, allow_compressed=allow_compressed)
    elif any(isinstance(v, float) for v in splits.train.labels or ()):
        model = load_classifier(model_spec, num_labels=1, seed=data_cfg.seed)  # a regression head
    else:
        names = splits.label_names
        if names is None:
            labels = set(splits.train.labels or ())
            names = tuple(str(i) for i in range(max(labels) + 1)) if labels else None
        model = load_classifier(model_spec, label_names=names, seed=data_cfg.seed)
    label2id = model_label2id(model)
    num_labels = int(model.config.num_labels)
    train = align_labels(splits.train, label2id, num_labels)
    evaluation = align_labels(splits.eval, label2id, num_labels)
    return model, load_tokenizer(model_spec), (train, evaluation)


def run_finetune(
    model_spec: str,
    data_cfg: DataConfig,
    ft_cfg: FinetuneConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: bool | None = None,
) -> FinetuneOutcome:
    """Fine-tune a model (dense, or compressed for recovery) and save it; the output is written atomically."""
    check_output_dir(out_dir, overwrite)
    source = resolve_model(model_spec)
    compressed = is_compressed(source)
    if is_causal_lm(load_config(model_spec)):
        model, tokenizer = load_causal_lm(model_spec), load_tokenizer(model_spec)
        train_text, eval_text = _lm_texts(data_cfg)
        train_windows = lm_windows(train_text, tokenizer, data_cfg.max_length, count=data_cfg.max_train_samples,
                                   seed=data_cfg.seed)
        eval_windows = lm_windows(eval_text, tokenizer, data_cfg.max_length, count=data_cfg.max_eval_samples,
                                  seed=data_cfg.seed)
        before = evaluate_lm(model, eval_windows, progress=progress) if compressed else None
        result = finetune_lm(model, train_windows, ft_cfg, eval_windows=eval_windows, progress=progress)
        after = evaluate_lm(model, eval_windows, progress=progress)
    else:
        model, tokenizer, (train, evaluation) = _load_task(model_spec, data_cfg, allow_compressed=True)
        before = None
        if compressed:
            before = evaluate(model, evaluation, tokenizer, batch_size=data_cfg.batch_size,
                              max_length=data_cfg.max_length, progress=progress)
        result = finetune(model, train, tokenizer, ft_cfg, eval_data=evaluation, max_length=data_cfg.max_length,
                          progress=progress)
        after = evaluate(model, evaluation, tokenizer, batch_size=data_cfg.batch_size,
                         max_length=data_cfg.max_length, progress=progress)
    record = {
        "finetune": {
            "source_model": str(model_spec),
            "data": data_cfg.to_dict(),
            "config": ft_cfg.to_dict(),
            "history": result.history,
            "eval": after.metrics,
            "eval_examples": after.num_examples,
        }
    }
    if compressed:
        plan = read_plan(source)
        keep = {k: plan[k] for k in ("method", "fisher_axis", "report", "input_model_hash", "compression", "task",
                                     "calibration") if k in plan}
        report = CompressionReport.from_dict(plan["report"]) if "report" in plan else None
        keep.pop("report", None)
        save_compressed(model, out_dir, tokenizer, report=report, metadata={**keep, "recovery": record["finetune"]},
                        overwrite=overwrite)
    else:
        save_model(model, out_dir, tokenizer, metadata=record, overwrite=overwrite)
    return FinetuneOutcome(Path(out_dir), result, before, after, compressed)


def _lm_texts(data_cfg: DataConfig) -> tuple[TextData, TextData]:
    return load_text(data_cfg, data_cfg.train_split), load_text(data_cfg, data_cfg.eval_split)


def calibrate(model: Any, tokenizer: Any, comp_cfg: CompressionConfig, cal_cfg: CalibrationConfig,
              data_cfg: DataConfig, train: TaskData | TextData, *,
              progress: bool | None = None) -> CalibrationStats | None:
    """The calibration pass for ``comp_cfg.method``: Fisher and/or input statistics on the training split.

    A classifier calibrates on ``cal_cfg.num_samples`` labelled examples (512 by default), a causal LM on as many
    token windows of ``data_cfg.max_length`` (64 by default), both drawn with ``data_cfg.seed``.
    """
    kinds = comp_cfg.statistics
    if not kinds:
        return None
    targets = resolve_targets(model, comp_cfg.target_modules, comp_cfg.exclude_modules)
    if isinstance(train, TextData):
        count = DEFAULT_WINDOWS if cal_cfg.num_samples is None else cal_cfg.num_samples
        windows = lm_windows(train, tokenizer, data_cfg.max_length, count=count, seed=data_cfg.seed)
        batches = window_batches(windows, cal_cfg.batch_size)
    else:
        sample = train.sample(DEFAULT_EXAMPLES if cal_cfg.num_samples is None else cal_cfg.num_samples,
                              seed=data_cfg.seed)
        batches = classifier_batches(sample, tokenizer, cal_cfg.batch_size, data_cfg.max_length)
    return collect_statistics(model, batches, targets, kinds=kinds, estimator=cal_cfg.estimator,
                              cache_dir=cal_cfg.cache_dir, progress=progress)


def _evaluate_any(model: Any, tokenizer: Any, evaluation: TaskData | TextData, data_cfg: DataConfig,
                  progress: bool | None) -> EvalResult:
    if isinstance(evaluation, TextData):
        windows = lm_windows(evaluation, tokenizer, data_cfg.max_length, count=data_cfg.max_eval_samples,
                             seed=data_cfg.seed)
        return evaluate_lm(model, windows, batch_size=max(1, min(data_cfg.batch_size, 8)), progress=progress)
    return evaluate(model, evaluation, tokenizer, batch_size=data_cfg.batch_size, max_length=data_cfg.max_length,
                    progress=progress)


def run_compress(
    model_spec: str,
    data_cfg: DataConfig,
    cal_cfg: CalibrationConfig,
    comp_cfg: CompressionConfig,
    out_dir: str | Path,
    *,
    evaluate_model: bool = True,
    overwrite: bool = False,
    progress: bool | None = None,
) -> CompressOutcome:
    """Calibrate (when the method needs it) -> compress -> save; evaluation before and after on the eval split.

    A classifier is evaluated by accuracy (or the regression metrics), a causal LM by perplexity on token windows.
    """
    check_output_dir(out_dir, overwrite)
    causal = is_causal_lm(load_config(model_spec))
    if causal:
        model = load_causal_lm(model_spec, allow_compressed=False)
        tokenizer = load_tokenizer(model_spec)
        train, evaluation = _lm_texts(data_cfg)
    else:
        if comp_cfg.needs_fisher and data_cfg.dataset == BUILTIN_SPEECHES:
            raise DatasetError(f"method {comp_cfg.method!r} takes Fisher from a classifier's task loss, which needs "
                               "labelled examples; 'speeches' is unlabelled text (use it with causal LMs, or pick "
                               "--method svd-llm, which needs no labels)")
        model, tokenizer, (train, evaluation) = _load_task(model_spec, data_cfg, allow_compressed=False)
    input_hash = model_fingerprint(model)
    before = _evaluate_any(model, tokenizer, evaluation, data_cfg, progress) if evaluate_model else None
    stats = calibrate(model, tokenizer, comp_cfg, cal_cfg, data_cfg, train, progress=progress)
    start = time.perf_counter()
    report = compress(model, comp_cfg, stats)
    seconds = time.perf_counter() - start
    after = _evaluate_any(model, tokenizer, evaluation, data_cfg, progress) if evaluate_model else None
    metadata: dict[str, Any] = {
        "input_model": str(model_spec),
        "input_model_hash": input_hash,
        "task": "causal-lm" if causal else "sequence-classification",
        "compression": comp_cfg.to_dict(),
        "calibration": None if stats is None else {
            **cal_cfg.to_dict(), "kinds": list(comp_cfg.statistics), "num_examples": stats.num_examples,
            "seconds": stats.seconds, "from_cache": stats.from_cache, "key": stats.key,
        },
        "data": data_cfg.to_dict(),
        "compress_seconds": seconds,
        "evaluation": None if after is None else {
            "split": getattr(evaluation, "source", ""), "examples": after.num_examples,
            "baseline": before.metrics if before else None, "compressed": after.metrics,
        },
    }
    with atomic_output_dir(out_dir, overwrite) as tmp:
        write_compressed(model, tmp, tokenizer, report=report, metadata=metadata)
        (tmp / "compression_report.md").write_text(_report_markdown(report, before, after, stats, seconds))
    return CompressOutcome(Path(out_dir), report, stats, seconds, before, after)


def _report_markdown(report: CompressionReport, before: EvalResult | None, after: EvalResult | None,
                     stats: CalibrationStats | None, seconds: float) -> str:
    lines = ["# Compression report", "", report.to_markdown(), ""]
    if before is not None and after is not None:
        lines += [
            "## Evaluation (PyTorch, no fine-tuning after compression)",
            "",
            "| metric | baseline | compressed |",
            "|---|---:|---:|",
        ]
        for key in after.metrics:
            lines.append(f"| {key} | {before.metrics.get(key, float('nan')):.4f} | {after.metrics[key]:.4f} |")
        lines.append("")
    timing = f"compress {seconds:.2f} s"
    if stats is not None:
        source = "cache" if stats.from_cache else f"{stats.seconds:.1f} s"
        kinds = " and ".join(k for k, have in (("Fisher", stats.fisher is not None),
                                                ("input statistics", stats.second_moment is not None)) if have)
        timing = f"{kinds} over {stats.num_examples} calibration examples: {source}; " + timing
    lines.append(timing)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# The whole pipeline, stage by stage, each cached by a hash of its inputs and settings
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageRecord:
    name: str
    folder: Path
    cached: bool
    seconds: float


@dataclass(frozen=True)
class PipelineResult:
    out_dir: Path
    stages: list[StageRecord]
    validation: Any
    seconds: float
    candidate_dir: Path

    @property
    def passed(self) -> bool:
        return bool(self.validation.passed)


def _digest(*parts: Any) -> str:
    import hashlib
    import json as _json

    return hashlib.sha256(_json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _source_identity(spec: str) -> str:
    from .manifest import folder_fingerprint

    source = resolve_model(spec)
    return folder_fingerprint(Path(source)) if Path(source).is_dir() else source


def run_pipeline(cfg: Any, out_dir: str | Path, *, force: bool = False, progress: bool | None = None,
                 log: Any = print, report_dir: str | Path | None = None) -> PipelineResult:
    """finetune? -> compress -> recovery? -> export (both) -> optimise (both) -> validate -> gate.

    Each stage writes ``out_dir/stages/<stage>-<hash>``, where the hash covers the stage's settings and the
    hashes of its inputs; an existing stage folder is reused unless ``force``. Stage folders are written
    atomically, so an interrupted run leaves earlier stages valid and no half-written folder. The report
    goes to ``out_dir/report`` and the resolved configuration to ``out_dir/pipeline.yaml``.
    """
    from dataclasses import replace as _replace

    from .exporters import export_onnx, optimize_onnx
    from .validators.validate import validate

    out = Path(out_dir)
    stages_dir = out / "stages"
    stages_dir.mkdir(parents=True, exist_ok=True)
    records: list[StageRecord] = []
    start = time.perf_counter()

    def stage(name: str, key: str, build: Any) -> Path:
        folder = stages_dir / f"{name}-{key}"
        began = time.perf_counter()
        if folder.is_dir() and any(folder.iterdir()) and not force:
            records.append(StageRecord(name, folder, True, 0.0))
            log(f"[{name}] cached: {folder}")
            return folder
        log(f"[{name}] running")
        build(folder)
        records.append(StageRecord(name, folder, False, time.perf_counter() - began))
        log(f"[{name}] done in {records[-1].seconds:.1f} s: {folder}")
        return folder

    data = cfg.data
    source_key = _digest("source", _source_identity(cfg.model))
    if cfg.finetune.enabled:
        ft_key = _digest(source_key, data.to_dict(), cfg.finetune.to_dict())
        baseline_model = stage("finetune", ft_key, lambda f: run_finetune(
            cfg.model, data, cfg.finetune.settings, f, overwrite=force, progress=progress))
        baseline_key = ft_key
    else:
        baseline_model, baseline_key = Path(resolve_model(cfg.model)), source_key
    if cfg.fisher.cache_dir is not None:
        fisher_cfg = cfg.fisher
    else:  # the pipeline's own Fisher cache, shared by every ratio; --force empties it
        if force:
            import shutil

            shutil.rmtree(stages_dir / "fisher", ignore_errors=True)
        fisher_cfg = _replace(cfg.fisher, cache_dir=str(stages_dir / "fisher"))
    cp_key = _digest(baseline_key, data.to_dict(), cfg.fisher.to_dict(), cfg.compression.to_dict())
    candidate_model = stage("compress", cp_key, lambda f: run_compress(
        str(baseline_model), data, fisher_cfg, cfg.compression, f, evaluate_model=False, overwrite=force,
        progress=progress))
    candidate_key = cp_key
    if cfg.recovery.enabled:
        rc_key = _digest(cp_key, data.to_dict(), cfg.recovery.to_dict())
        candidate_model = stage("recovery", rc_key, lambda f: run_finetune(
            str(candidate_model), data, cfg.recovery.settings, f, overwrite=force, progress=progress))
        candidate_key = rc_key
    folders = {}
    for role, model_dir, key in (("baseline", baseline_model, baseline_key),
                                 ("candidate", candidate_model, candidate_key)):
        ex_key = _digest(key, cfg.export.to_dict())
        exported = stage(f"export-{role}", ex_key, lambda f, m=model_dir: export_onnx(m, cfg.export, f,
                                                                                      overwrite=force))
        op_key = _digest(ex_key, cfg.optimize.to_dict())
        folders[role] = stage(f"optimize-{role}", op_key, lambda f, e=exported: optimize_onnx(
            e, cfg.optimize, f, overwrite=force))
    eval_data = _replace(data, eval_split=cfg.validate.split or data.eval_split)
    log("[validate] running")
    began = time.perf_counter()
    report = Path(report_dir) if report_dir is not None else out / "report"
    result = validate(folders["baseline"], folders["candidate"], eval_data, cfg.validate, cfg.gate, report,
                      overwrite=True, progress=progress, raise_on_failure=False)
    records.append(StageRecord("validate", report, False, time.perf_counter() - began))
    (out if report_dir is None else report).joinpath("pipeline.yaml").write_text(cfg.to_yaml())
    return PipelineResult(out, records, result, time.perf_counter() - start, folders["candidate"])


@dataclass(frozen=True)
class SearchResult:
    out_dir: Path
    trials: list[dict[str, Any]]
    best_ratio: float | None
    best_dir: Path | None
    seconds: float


def search_ratio(cfg: Any, out_dir: str | Path, *, low: float = 0.1, high: float = 0.9, steps: int = 4,
                 force: bool = False, progress: bool | None = None, log: Any = print) -> SearchResult:
    """The smallest kept fraction in ``[low, high]`` whose candidate passes the gate, by bisection.

    The bisection follows the accuracy-side checks (accuracy drop, agreement, logit difference), which fail as
    compression grows; size and latency checks only get easier with compression, so they are checked on the
    result rather than steering the search (a large kept fraction may fail them while smaller ones pass).

    Every trial is a full pipeline run sharing the fine-tuned baseline, its exports and one Fisher pass (all
    cached stages); recovery fine-tuning runs per trial when the config enables it. The best candidate's
    optimised ONNX folder is copied to ``out_dir/best``; ``search.json`` and ``search.md`` list every trial.
    """
    import json as _json
    import shutil
    from dataclasses import replace as _replace

    from .checkpoint import atomic_output_dir
    from .errors import ConfigError

    if not 0 < low < high <= 1:
        raise ConfigError(f"search range [{low}, {high}] must satisfy 0 < low < high <= 1")
    if steps < 1:
        raise ConfigError(f"steps={steps} must be >= 1")
    out = Path(out_dir)
    start = time.perf_counter()
    trials: list[dict[str, Any]] = []
    results: dict[float, PipelineResult] = {}

    accuracy_checks = {"accuracy_drop", "agreement", "max_logit_diff"}

    def trial(ratio: float) -> bool:
        """Run one kept fraction; True when its accuracy-side checks pass."""
        ratio = round(ratio, 4)
        if ratio not in results:
            log(f"[search] ratio {ratio}")
            trial_cfg = _replace(cfg, compression=_replace(cfg.compression, ratio=ratio, rank=None))
            # --force recomputes the shared stages once, in the first trial; later trials reuse them
            result = run_pipeline(trial_cfg, out, force=force and not results, progress=progress, log=log,
                                  report_dir=out / "search" / f"ratio-{ratio:.4f}")
            results[ratio] = result
            report = result.validation.report
            latency = report.get("latency") or {}
            worst = max((c["ratios"]["candidate"]["p50"] for c in latency.get("cells", [])), default=None)
            failed = [c.name for c in result.validation.checks if not c.passed]
            metric = report["accuracy"].get("primary_metric", "accuracy")  # pearson for regression, f1 for QA
            trials.append({
                "ratio": ratio, "passed": result.passed,
                "accuracy_passed": not (set(failed) & accuracy_checks),
                "metric": metric,
                "metric_baseline": report["accuracy"]["baseline"][metric],
                "metric_candidate": report["accuracy"]["candidate"][metric],
                "worst_latency_ratio": worst, "failed_checks": failed,
                "report": str(result.validation.out_dir),
            })
            log(f"[search] ratio {ratio}: {'pass' if result.passed else 'fail: ' + ', '.join(failed)}")
        return next(t for t in trials if t["ratio"] == ratio)["accuracy_passed"]

    if trial(high) and not trial(low):
        lo, hi = low, high
        for _ in range(steps):
            mid = round((lo + hi) / 2, 4)
            if trial(mid):
                hi = mid
            else:
                lo = mid
    passing = [t["ratio"] for t in trials if t["passed"]]
    best: float | None = min(passing) if passing else None
    best_dir = None
    with atomic_output_dir(out / "search-summary", overwrite=True) as tmp:
        summary = {"low": low, "high": high, "steps": steps, "best_ratio": best,
                   "gate": cfg.gate.to_dict(), "trials": sorted(trials, key=lambda t: t["ratio"])}
        (tmp / "search.json").write_text(_json.dumps(summary, indent=2))
        metric = trials[0]["metric"]
        lines = [f"# Compression search: best kept fraction {best if best is not None else 'none'}", "",
                 f"| kept fraction | {metric} (baseline) | {metric} (candidate) | worst latency ratio | gate |",
                 "|---:|---:|---:|---:|---|"]
        for t in summary["trials"]:
            gate = "pass" if t["passed"] else "fail: " + ", ".join(t["failed_checks"])
            lat = "n/a" if t["worst_latency_ratio"] is None else f"{t['worst_latency_ratio']:.3f}"
            lines.append(f"| {t['ratio']} | {t['metric_baseline']:.4f} | {t['metric_candidate']:.4f} | {lat} | "
                         f"{gate} |")
        lines += ["", "![accuracy and latency against the kept fraction](search.png)"]
        (tmp / "search.md").write_text("\n".join(lines) + "\n")
        if trials:
            from .validators.plots import search_plot

            search_plot(trials, cfg.gate.max_accuracy_drop, tmp / "search.png")
    if best is not None:
        best_dir = out / "best"
        with atomic_output_dir(best_dir, overwrite=True) as tmp:
            shutil.copytree(results[best].candidate_dir, tmp, dirs_exist_ok=True)
    return SearchResult(out, trials, best, best_dir, time.perf_counter() - start)
