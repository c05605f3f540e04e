"""Stages, each artifact in -> artifact out: model folder + data -> fine-tuned or compressed model folder.

Every stage checks what it can before its first expensive step (output path, model config, tokenizer, weights
format, sequence lengths, targets, cache paths) and writes its folder atomically with a ``manifest.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .background import Background
from .checkpoint import write_model
from .compression.apply import compress, plan_units, resolve_targets
from .compression.fisher import DEFAULT_EXAMPLES, classifier_batches
from .compression.report import CompressionReport
from .compression.sequential import check_offload_dir, check_walkable, compress_sequential, find_blocks
from .compression.statistics import CalibrationStats, check_cache_dir, collect_statistics
from .compression.svd import max_saving_rank
from .config import (
    GREEDY_ALLOCATIONS,
    METHOD_STATISTICS,
    CalibrationConfig,
    CompressionConfig,
    DataConfig,
    ExportConfig,
    FinetuneConfig,
    OptimizeConfig,
    PipelineConfig,
    SearchConfig,
)
from .data import (
    BUILTIN_TEXTS,
    TaskData,
    TextData,
    align_labels,
    lm_windows,
    load_eval_split,
    load_splits,
    load_text,
    window_batches,
)
from .errors import AlreadyCompressedError, ConfigError, DatasetError
from .manifest import (
    folder_fingerprint,
    model_fingerprint,
    package_versions,
    read_manifest,
    verify_manifest,
    write_manifest,
)
from .modeling import (
    check_sequence_lengths,
    has_classification_head,
    is_causal_lm,
    load_causal_lm,
    load_classifier,
    load_config,
    load_tokenizer,
    model_label2id,
    resolve_model,
    weights_kwargs,
)
from .outputs import atomic_output_dir, check_output_dir
from .plan import is_compressed, read_plan
from .training import EvalResult, FinetuneResult, evaluate, evaluate_lm, finetune, finetune_lm

DEFAULT_WINDOWS = 64  # calibration windows of a causal LM when CalibrationConfig.num_samples is None

if TYPE_CHECKING:
    from torch import nn

    from .validators.validate import ValidationResult

Log = Callable[[str], None]


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


def _data_inputs(data_cfg: DataConfig) -> list[str | None]:
    return [data_cfg.dataset, data_cfg.eval_dataset]


def source_identity(spec: str) -> str:
    """What a model spec stands for: a folder's content hash, or a hub id at its revision."""
    source = resolve_model(spec)
    if Path(source).is_dir():
        return folder_fingerprint(Path(source))
    revision = getattr(load_config(spec), "_commit_hash", None)
    return f"{source}@{revision or 'unknown revision'}"


def check_model_input(model_spec: str, data_cfg: DataConfig, *, allow_compressed: bool,
                      allow_pickle: bool = False) -> Any:
    """What can be known about a model before loading it: its config, weights format, tokenizer, length limit.

    Returns:
        The model's transformers config.

    Raises:
        ModelLoadError: an unreadable config, pickled weights without ``allow_pickle``, no tokenizer files.
        AlreadyCompressedError: a compressed folder when ``allow_compressed`` is false.
        ConfigError: ``data_cfg.max_length`` beyond the model's positions.
    """
    source = resolve_model(model_spec)
    compressed = is_compressed(source)
    if compressed and not allow_compressed:
        raise AlreadyCompressedError(f"{model_spec} is already compressed; give the original model "
                                     "(re-compressing a factorised model compounds the error)")
    config = load_config(model_spec)
    if not compressed:
        weights_kwargs(source, allow_pickle)
    check_sequence_lengths(config, model_spec, {"max_length": data_cfg.max_length})
    load_tokenizer(model_spec)
    return config


def _load_task(model_spec: str, data_cfg: DataConfig, *, allow_compressed: bool,
               allow_pickle: bool = False) -> tuple[nn.Module, Any, tuple[TaskData, TaskData]]:
    """Model, tokenizer and label-aligned splits; a head-less model gets a head sized from the data."""
    source = resolve_model(model_spec)
    config = check_model_input(model_spec, data_cfg, allow_compressed=allow_compressed, allow_pickle=allow_pickle)
    tokenizer = load_tokenizer(model_spec)
    splits = load_splits(data_cfg)
    if is_compressed(source) or has_classification_head(config):
        model = load_classifier(model_spec, allow_compressed=allow_compressed, allow_pickle=allow_pickle)
    elif any(isinstance(v, float) for v in splits.train.labels or ()):
        model = load_classifier(model_spec, num_labels=1, seed=data_cfg.seed, allow_pickle=allow_pickle)
    else:
        names = splits.label_names
        if names is None:
            labels = set(splits.train.labels or ())
            names = tuple(str(i) for i in range(max(labels) + 1)) if labels else None
        model = load_classifier(model_spec, label_names=names, seed=data_cfg.seed, allow_pickle=allow_pickle)
    label2id = model_label2id(model)
    num_labels = int(model.config.num_labels)
    train = align_labels(splits.train, label2id, num_labels)
    evaluation = align_labels(splits.eval, label2id, num_labels)
    return model, tokenizer, (train, evaluation)


def run_finetune(
    model_spec: str,
    data_cfg: DataConfig,
    ft_cfg: FinetuneConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool | None = None,
) -> FinetuneOutcome:
    """Fine-tune a model (dense, or compressed for recovery) and save it; the output is written atomically."""
    source = resolve_model(model_spec)
    check_output_dir(out_dir, overwrite, inputs=[source, *_data_inputs(data_cfg)])
    config = check_model_input(model_spec, data_cfg, allow_compressed=True, allow_pickle=allow_pickle)
    compressed = is_compressed(source)
    if ft_cfg.trainable == "factors" and not compressed:
        raise ConfigError(f"--trainable factors trains the factorised layers of a compressed model; {model_spec} has "
                          "none (give a folder written by 'compress', or --trainable all)")
    if is_causal_lm(config):
        train_text, eval_text = _lm_texts(data_cfg)
        tokenizer = load_tokenizer(model_spec)
        _check_windows(train_text, eval_text, tokenizer, data_cfg)
        model = load_causal_lm(model_spec, allow_pickle=allow_pickle)
        train_windows = lm_windows(train_text, tokenizer, data_cfg.max_length, count=data_cfg.max_train_samples,
                                   seed=data_cfg.seed)
        eval_windows = lm_windows(eval_text, tokenizer, data_cfg.max_length, count=data_cfg.max_eval_samples,
                                  seed=data_cfg.seed)
        before = evaluate_lm(model, eval_windows, progress=progress) if compressed else None
        result = finetune_lm(model, train_windows, ft_cfg, eval_windows=eval_windows, progress=progress)
        after = evaluate_lm(model, eval_windows, progress=progress)
    else:
        model, tokenizer, (train, evaluation) = _load_task(model_spec, data_cfg, allow_compressed=True,
                                                           allow_pickle=allow_pickle)
        before = None
        if compressed:
            before = evaluate(model, evaluation, tokenizer, batch_size=data_cfg.batch_size,
                              max_length=data_cfg.max_length, progress=progress)
        result = finetune(model, train, tokenizer, ft_cfg, eval_data=evaluation, max_length=data_cfg.max_length,
                          progress=progress)
        after = evaluate(model, evaluation, tokenizer, batch_size=data_cfg.batch_size,
                         max_length=data_cfg.max_length, progress=progress)
    record = {
        "source_model": str(model_spec),
        "data": data_cfg.to_dict(),
        "config": ft_cfg.to_dict(),
        "history": result.history,
        "eval": after.metrics,
        "eval_examples": after.num_examples,
    }
    report = None
    if compressed:
        plan = read_plan(source)
        keep = {k: plan[k] for k in ("method", "fisher_axis", "input_model_hash", "compression", "task",
                                     "calibration") if k in plan}
        report = CompressionReport.from_dict(plan["report"]) if "report" in plan else None
        metadata = {**keep, "recovery": record}
    else:
        metadata = {"finetune": record}
    with atomic_output_dir(out_dir, overwrite, inputs=[source]) as tmp:
        write_model(model, tmp, tokenizer, report=report, metadata=metadata)
        write_manifest(tmp, {
            "kind": "recovery" if compressed else "finetune",
            "input": {"model": str(model_spec), "identity": source_identity(model_spec)},
            "data": data_cfg.to_dict(), "settings": ft_cfg.to_dict(),
            "ranks": None if report is None else report.ranks,
            "metrics": {"before": None if before is None else before.metrics, "after": after.metrics},
        })
    return FinetuneOutcome(Path(out_dir), result, before, after, compressed)


def _lm_texts(data_cfg: DataConfig) -> tuple[TextData, TextData]:
    return load_text(data_cfg, data_cfg.train_split), load_text(data_cfg, data_cfg.eval_split)


def _check_windows(train: TextData, evaluation: TextData, tokenizer: Any, data_cfg: DataConfig) -> None:
    """Both splits hold at least one window of ``max_length`` tokens: said before the model loads.

    Raises:
        DatasetError: from :func:`lm_windows`, naming the split and its token count.
    """
    for text in (train, evaluation):
        lm_windows(text, tokenizer, data_cfg.max_length, count=1, seed=data_cfg.seed)


def calibration_batches(tokenizer: Any, cal_cfg: CalibrationConfig, data_cfg: DataConfig,
                        train: TaskData | TextData) -> list[dict[str, Any]]:
    """The calibration batches: ``cal_cfg.num_samples`` labelled examples of a classifier (512 by default), or as many
    token windows of ``data_cfg.max_length`` of a causal LM (64 by default), drawn with ``data_cfg.seed``."""
    if isinstance(train, TextData):
        count = DEFAULT_WINDOWS if cal_cfg.num_samples is None else cal_cfg.num_samples
        windows = lm_windows(train, tokenizer, data_cfg.max_length, count=count, seed=data_cfg.seed)
        return window_batches(windows, cal_cfg.batch_size)
    sample = train.sample(DEFAULT_EXAMPLES if cal_cfg.num_samples is None else cal_cfg.num_samples,
                          seed=data_cfg.seed)
    return classifier_batches(sample, tokenizer, cal_cfg.batch_size, data_cfg.max_length)


def dense_statistics(comp_cfg: CompressionConfig, cal_cfg: CalibrationConfig) -> tuple[str, ...]:
    """What the pass over the dense model collects: the method's statistics, or under sequential calibration only
    what cannot come block by block (the Fisher, and the spectra a greedy allocation compares across layers)."""
    if not cal_cfg.sequential:
        return comp_cfg.statistics
    if comp_cfg.rank is None and comp_cfg.allocation != "uniform":
        return METHOD_STATISTICS[comp_cfg.method]  # the dense decompositions' spectra
    return tuple(k for k in comp_cfg.statistics if k == "fisher")


def calibrate(model: Any, tokenizer: Any, comp_cfg: CompressionConfig, cal_cfg: CalibrationConfig,
              data_cfg: DataConfig, train: TaskData | TextData, *, targets: list[Any] | None = None,
              progress: bool | None = None, batches: list[dict[str, Any]] | None = None) -> CalibrationStats | None:
    """The calibration pass over the dense model: Fisher and/or input statistics on the training split.

    A classifier calibrates on ``cal_cfg.num_samples`` labelled examples (512 by default), a causal LM on as many
    token windows of ``data_cfg.max_length`` (64 by default), both drawn with ``data_cfg.seed``.
    """
    kinds = dense_statistics(comp_cfg, cal_cfg)
    if not kinds:
        return None
    if targets is None:
        targets = resolve_targets(model, comp_cfg.target_modules, comp_cfg.exclude_modules)
    if batches is None:
        batches = calibration_batches(tokenizer, cal_cfg, data_cfg, train)
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


def _check_rank_saves(model: nn.Module, comp_cfg: CompressionConfig) -> list[Any]:
    """The layers to factorise, resolved before any statistics; refuses a fixed rank that would save nothing and a
    greedy allocation whose start (``loss`` floors, or rank ``rank_multiple`` everywhere) exceeds the budget (both
    depend on the layers' shapes alone)."""
    from .compression.ranks import loss_floors, starting_ranks

    targets = resolve_targets(model, comp_cfg.target_modules, comp_cfg.exclude_modules)
    units = plan_units(targets, comp_cfg.qkv)
    if comp_cfg.allocation in GREEDY_ALLOCATIONS and comp_cfg.rank is None:
        shapes = {u.name: u.shape for u in units}
        floors = None
        if comp_cfg.allocation == "loss":
            floors = loss_floors(shapes, comp_cfg.ratio, comp_cfg.min_rank_fraction)  # type: ignore[arg-type]
        starting_ranks(shapes, comp_cfg.ratio, comp_cfg.rank_multiple, floors)  # type: ignore[arg-type]
    if comp_cfg.rank is not None and not comp_cfg.rank_overrides:
        best = max(units, key=lambda u: max_saving_rank(u.shape))
        if comp_cfg.rank > max_saving_rank(best.shape):
            raise ConfigError(
                f"rank={comp_cfg.rank} saves no parameters in any targeted layer (the widest, {best.name} "
                f"{best.shape[0]}x{best.shape[1]}, saves only below rank {max_saving_rank(best.shape) + 1}); "
                "choose a smaller --rank"
            )
    return targets


def run_compress(
    model_spec: str,
    data_cfg: DataConfig,
    cal_cfg: CalibrationConfig,
    comp_cfg: CompressionConfig,
    out_dir: str | Path,
    *,
    evaluate_model: bool = True,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool | None = None,
) -> CompressOutcome:
    """Calibrate (when the method needs it) -> compress -> save; evaluation before and after on the eval split.

    A classifier is evaluated by accuracy (or the regression metrics), a causal LM by perplexity on token windows.
    """
    source = resolve_model(model_spec)
    check_output_dir(out_dir, overwrite, inputs=[source, *_data_inputs(data_cfg)])
    check_cache_dir(cal_cfg.cache_dir)
    check_offload_dir(cal_cfg.offload_dir)
    config = check_model_input(model_spec, data_cfg, allow_compressed=False, allow_pickle=allow_pickle)
    causal = is_causal_lm(config)
    if causal:
        train, evaluation = _lm_texts(data_cfg)
        tokenizer = load_tokenizer(model_spec)
        _check_windows(train, evaluation, tokenizer, data_cfg)
        model = load_causal_lm(model_spec, allow_compressed=False, allow_pickle=allow_pickle)
    else:
        if comp_cfg.needs_fisher and data_cfg.dataset in BUILTIN_TEXTS:
            raise DatasetError(f"method {comp_cfg.method!r} takes Fisher from a classifier's task loss, which needs "
                               f"labelled examples; {data_cfg.dataset!r} is unlabelled text (use it with causal LMs, "
                               "or pick --method svd-llm, which needs no labels)")
        model, tokenizer, (train, evaluation) = _load_task(model_spec, data_cfg, allow_compressed=False,
                                                           allow_pickle=allow_pickle)
    targets = _check_rank_saves(model, comp_cfg)
    if cal_cfg.sequential:
        find_blocks(model, targets)
    input_hash = model_fingerprint(model)
    before = _evaluate_any(model, tokenizer, evaluation, data_cfg, progress) if evaluate_model else None
    batches = calibration_batches(tokenizer, cal_cfg, data_cfg, train)
    stats = calibrate(model, tokenizer, comp_cfg, cal_cfg, data_cfg, train, targets=targets, progress=progress,
                      batches=batches)
    start = time.perf_counter()
    if cal_cfg.sequential:
        report = compress_sequential(model, comp_cfg, batches, stats, offload_dir=cal_cfg.offload_dir,
                                     progress=progress)
    else:
        report = compress(model, comp_cfg, stats)
    examples = sum(int(b["input_ids"].shape[0]) for b in batches)
    del batches
    if stats is not None:  # what was collected stays on record; the tensors (without a cache: in memory) go
        stats = replace(stats, **{k: {} for k in ("fisher", "second_moment", "abs_sum")
                                  if getattr(stats, k) is not None})
    seconds = time.perf_counter() - start
    after = _evaluate_any(model, tokenizer, evaluation, data_cfg, progress) if evaluate_model else None
    calibration_record = None if stats is None and not cal_cfg.sequential else {
        **cal_cfg.to_dict(), "kinds": list(comp_cfg.statistics), "num_examples": examples,
        "seconds": 0.0 if stats is None else stats.seconds, "from_cache": stats is not None and stats.from_cache,
        "key": None if stats is None else stats.key,
    }
    evaluation_record = None if after is None else {
        "split": getattr(evaluation, "source", ""), "examples": after.num_examples,
        "baseline": before.metrics if before else None, "compressed": after.metrics,
    }
    metadata: dict[str, Any] = {
        "input_model": str(model_spec),
        "input_model_hash": input_hash,
        "task": "causal-lm" if causal else "sequence-classification",
        "compression": comp_cfg.to_dict(),
        "calibration": calibration_record,
        "data": data_cfg.to_dict(),
        "compress_seconds": seconds,
        "evaluation": evaluation_record,
    }
    with atomic_output_dir(out_dir, overwrite, inputs=[source]) as tmp:
        write_model(model, tmp, tokenizer, report=report, metadata=metadata)
        (tmp / "compression_report.md").write_text(_report_markdown(report, before, after, stats, seconds))
        write_manifest(tmp, {
            "kind": "compress",
            "input": {"model": str(model_spec), "identity": source_identity(model_spec), "model_hash": input_hash},
            "data": data_cfg.to_dict(),
            "settings": {"compression": comp_cfg.to_dict(), "calibration": calibration_record},
            "ranks": report.ranks, "totals": report.to_dict()["totals"], "metrics": evaluation_record,
        })
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
    if report.settings.get("sequential"):
        timing += (f" (sequential: {report.settings['block_forwards']} block forwards, "
                   f"{report.settings['sequential_seconds']:.1f} s)")
    lines.append(timing)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# The whole pipeline, stage by stage, each cached under a key of what produces its artifact
# ---------------------------------------------------------------------------------------------------

RUN_KINDS = ("pipeline-run", "search")
# The package's own code each stage runs (files, or folders for every module in them), and the packages whose
# versions change its artifact; both are part of the stage's cache key.
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "finetune": ("training.py", "losses.py", "data.py", "modeling.py", "checkpoint.py", "plan.py", "compression",
                 "families.py"),
    "compress": ("compression", "losses.py", "data.py", "modeling.py", "checkpoint.py", "plan.py", "families.py"),
    "export": ("exporters/onnx.py", "exporters/runtime.py", "modeling.py", "checkpoint.py", "plan.py",
               "compression", "families.py"),
    "optimize": ("exporters", "families.py"),
}
STAGE_PACKAGES: dict[str, tuple[str, ...]] = {
    "finetune": ("fwsvd-deploy", "torch", "transformers", "safetensors"),
    "compress": ("fwsvd-deploy", "torch", "transformers", "safetensors"),
    "export": ("fwsvd-deploy", "torch", "transformers", "onnx", "optimum-onnx"),
    "optimize": ("fwsvd-deploy", "onnx", "onnxruntime", "onnxruntime-gpu", "torch"),  # torch: the HQQ quantiser
}
# Settings that decide only what is checked or how fast, never the artifact; a cached artifact is re-checked
# against them instead (see _still_valid).
_CHECK_ONLY = {
    "export": {"atol", "validate_shapes"},
    "optimize": {"atol", "int8_atol", "int8_min_sqnr_db", "int8_min_agreement", "int4_atol", "int4_min_sqnr_db",
                 "int4_min_agreement", "validate_shapes", "allow_fusion_loss"},
}
# DataConfig fields a stage's artifact does not depend on: the inference batch size; and, for compression
# (which evaluates nothing inside the pipeline), the evaluation split and its cap.
_DATA_UNUSED = {
    "finetune": {"batch_size"},
    "compress": {"batch_size", "eval_split", "max_eval_samples"},
}


def code_fingerprint(stage: str) -> str:
    """SHA-256 over the package's source files that ``stage`` runs, so a code change invalidates its cache."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for entry in STAGE_CODE[stage]:
        path = root / entry
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(root)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def stage_key(stage: str, *parts: Any) -> str:
    """The cache key of a stage: its code, the versions of the packages it uses, its inputs' keys and settings."""
    versions = package_versions()
    payload = [stage, code_fingerprint(stage), {p: versions.get(p) for p in STAGE_PACKAGES[stage]}, *parts]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _without(settings: Mapping[str, Any], unused: set[str]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in unused}


def _calibration_settings(cfg: CalibrationConfig) -> dict[str, Any]:
    """Calibration settings that change the statistics: the batch size only for ``batch_mean`` Fisher."""
    unused = {"cache_dir", "offload_dir"} | ({"batch_size"} if cfg.estimator == "per_example" else set())
    return _without(cfg.to_dict(), unused)


def _parity_holds(manifest: Mapping[str, Any], atol: float, shapes: tuple[tuple[int, int], ...],
                  floors: tuple[float, float] | None = None) -> str | None:
    parity = manifest.get("parity")
    if parity is None:  # a CUDA graph, not run where it was built
        return None
    rows = parity.get("shapes", [])
    checked = {(r["batch"], r["sequence"]) for r in rows}
    if not set(shapes) <= checked:
        return f"parity was checked on {sorted(checked)}, not on every shape of {list(shapes)}"
    if floors is not None and rows and "sqnr_db" in rows[0]:  # a quantised decoder: held to its floors
        sqnr, agreement = min(r["sqnr_db"] for r in rows), min(r["agreement"] for r in rows)
        if sqnr < floors[0] or agreement < floors[1]:
            return (f"its logits' signal-to-noise {sqnr:.1f} dB / top-1 agreement {agreement:.3f} fall below the "
                    f"floors {floors[0]} dB / {floors[1]}")
        return None
    if not parity.get("max_abs_diff", float("inf")) <= atol:
        return f"its parity difference {parity.get('max_abs_diff')} exceeds atol {atol}"
    return None


def _still_valid(stage: str, cfg: PipelineConfig, folder: Path) -> str | None:
    """Why a cached export or optimisation does not pass today's checks, or ``None`` when it does."""
    manifest = read_manifest(folder) or {}
    if stage == "export":
        return _parity_holds(manifest, cfg.export.atol, cfg.export.validate_shapes)
    if stage == "optimize":
        problem = _parity_holds(manifest, cfg.optimize.lossy_atol, cfg.optimize.validate_shapes,
                                cfg.optimize.floors)
        if problem is None and manifest.get("fusions_complete") is False and not cfg.optimize.allow_fusion_loss:
            problem = "it lost fused operators, and allow_fusion_loss is off"
        return problem
    return None


def default_jobs() -> int:
    """Processes for the export/optimise branches: 2 where this process may use two or more cores, else 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return 2 if cores >= 2 else 1


def check_jobs(jobs: int | None) -> int:
    """``jobs`` checked (1 or 2; ``None``: :func:`default_jobs`)."""
    if jobs is None:
        return default_jobs()
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs not in (1, 2):
        raise ConfigError(f"jobs={jobs!r} must be 1 (one stage at a time) or 2 (the baseline's export and "
                          "optimisation beside the candidate's)")
    return jobs


@dataclass(frozen=True)
class StageRecord:
    name: str
    folder: Path
    cached: bool
    seconds: float


@dataclass(frozen=True)
class _Branch:
    """One model's export and optimisation, and which of the two must be built (the others are cached)."""

    role: str
    model_dir: Path
    exported: Path
    optimized: Path
    build_export: bool
    build_optimize: bool


def _build_branch(branch: _Branch, export_cfg: ExportConfig, optimize_cfg: OptimizeConfig,
                  log: Log | None = None) -> list[StageRecord]:
    """Export and/or optimise one model as ``branch`` says; its stage records. Runs in either process."""
    from .exporters import export_onnx, optimize_onnx

    records = []
    for name, wanted, folder, build in (
            (f"export-{branch.role}", branch.build_export, branch.exported,
             lambda o: export_onnx(branch.model_dir, export_cfg, branch.exported, overwrite=o)),
            (f"optimize-{branch.role}", branch.build_optimize, branch.optimized,
             lambda o: optimize_onnx(branch.exported, optimize_cfg, branch.optimized, overwrite=o))):
        if not wanted:
            continue
        if log is not None:
            log(f"[{name}] running")
        began = time.perf_counter()
        build(folder.exists())
        records.append(StageRecord(name, folder, False, time.perf_counter() - began))
        if log is not None:
            log(f"[{name}] done in {records[-1].seconds:.1f} s: {folder}")
    return records


@dataclass(frozen=True)
class PipelineResult:
    out_dir: Path
    stages: list[StageRecord]
    validation: ValidationResult
    seconds: float
    candidate_dir: Path

    @property
    def passed(self) -> bool:
        return bool(self.validation.passed)


def is_run_folder(folder: str | Path) -> bool:
    """Whether ``folder`` was written by ``run`` or ``search`` (its stages are then a cache to reuse)."""
    return (read_manifest(Path(folder)) or {}).get("kind") in RUN_KINDS


def check_pipeline(cfg: PipelineConfig, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Everything about a pipeline that can be checked before its first stage, in seconds.

    The output folder (a folder an earlier ``run`` or ``search`` wrote is reused: its stages are the cache), the
    model's config, weights format and tokenizer, sequence lengths against its positions, the Fisher cache path,
    the execution providers, and the data: the training split and the split validation reads.

    Raises:
        FwsvdError: the first problem found, with what to change.
    """
    from .exporters.runtime import require_provider

    for device in {cfg.validate.device, cfg.optimize.device} - {"cpu"}:
        require_provider(device)  # first: resolving a GGUF model converts it (a minute)
    source = resolve_model(cfg.model)
    out = check_output_dir(out_dir, overwrite, inputs=[source, *_data_inputs(cfg.data)],
                           reuse=is_run_folder(out_dir))
    config = load_config(cfg.model)
    causal = cfg.task == "causal-lm"
    if is_causal_lm(config) != causal:
        kind, task = (("a causal language model", "causal-lm") if is_causal_lm(config)
                      else ("not a causal language model", "text-classification"))
        raise ConfigError(f"{cfg.model} is {kind}; set task: {task} in the pipeline config (it picks the data, "
                          "export task and gate that fit)")
    lengths: dict[str, Any] = {"data.max_length": cfg.data.max_length}
    if causal:
        lengths["validate.prompt_len + validate.new_tokens"] = cfg.validate.prompt_len + cfg.validate.new_tokens
    else:
        lengths |= {"validate.seq_lens": cfg.validate.seq_lens, "validate.memory_seq": cfg.validate.memory_seq}
    check_sequence_lengths(config, cfg.model, lengths)
    check_model_input(cfg.model, cfg.data, allow_compressed=False)
    if cfg.compression.statistics:
        check_cache_dir(cfg.calibration.cache_dir)
    if cfg.calibration.sequential:
        check_walkable(config)
        check_offload_dir(cfg.calibration.offload_dir)
    if causal:
        load_text(cfg.data, cfg.data.train_split)
        load_text(_validation_data(cfg), _validation_data(cfg).eval_split)
    else:
        load_splits(cfg.data)
        load_eval_split(_validation_data(cfg))
    return out


def _validation_data(cfg: PipelineConfig) -> DataConfig:
    return replace(cfg.data, eval_split=cfg.validate.split or cfg.data.eval_split)


@contextlib.contextmanager
def run_folder(out_dir: str | Path, kind: str, *, overwrite: bool = False) -> Iterator[Path]:
    """The folder a ``run`` or ``search`` works in, its stages kept between runs as their cache.

    A missing or empty folder, or one an earlier run or search wrote, is used in place. Any other (non-empty)
    folder needs ``overwrite``: it is moved aside, put back if the block fails, and removed when it completes.
    """
    import uuid

    out = Path(out_dir)
    aside = None
    if out.is_dir() and any(out.iterdir()) and not is_run_folder(out):
        if not overwrite:
            check_output_dir(out, overwrite)  # raises the usual line
        aside = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(aside)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not is_run_folder(out):
            write_manifest(out, {"kind": kind})
        yield out
    except BaseException:
        if aside is not None:
            shutil.rmtree(out, ignore_errors=True)
            aside.rename(out)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def run_pipeline(cfg: PipelineConfig, out_dir: str | Path, *, force: bool = False, overwrite: bool = False,
                 progress: bool | None = None, log: Log = print, jobs: int | None = None) -> PipelineResult:
    """finetune? -> compress -> recovery? -> export (both) -> optimise (both) -> validate -> gate.

    Checks everything it can first (:func:`check_pipeline`), then runs :func:`run_stages` in ``out_dir``. Each stage
    writes ``out_dir/stages/<stage>-<key>`` (see :func:`stage_key`); an existing stage folder is reused when it
    matches its manifest's content hash, unless ``force``. The report goes to ``out_dir/report`` and the resolved
    configuration to ``out_dir/pipeline.yaml``. ``jobs``: processes for the two export/optimise branches (default
    :func:`default_jobs`).
    """
    jobs = check_jobs(jobs)
    check_pipeline(cfg, out_dir, overwrite=overwrite)
    with run_folder(out_dir, "pipeline-run", overwrite=overwrite) as out:
        result = run_stages(cfg, out, force=force, progress=progress, log=log, jobs=jobs)
        (out / "pipeline.yaml").write_text(cfg.to_yaml())
        write_manifest(out, {"kind": "pipeline-run", "passed": result.passed,
                             "stages": [{"name": s.name, "folder": s.folder.name, "cached": s.cached}
                                        for s in result.stages]})
    return result


def run_stages(cfg: PipelineConfig, out: Path, *, force: bool = False, progress: bool | None = None,
               log: Log = print, report_dir: Path | None = None, jobs: int = 1) -> PipelineResult:
    """The stages of :func:`run_pipeline` in a folder already checked and prepared (:func:`run_folder`).

    Stage folders are written atomically, so an interrupted run leaves earlier stages valid and no half-written
    folder. The report goes to ``report_dir`` (default ``out/report``). With ``jobs`` > 1 and both models to
    export, the baseline is exported and optimised in a second process while the candidate is.
    """
    from .validators.validate import validate

    stages_dir = out / "stages"
    stages_dir.mkdir(parents=True, exist_ok=True)
    records: list[StageRecord] = []
    start = time.perf_counter()

    def reuse(name: str, kind: str, folder: Path) -> bool:
        """Whether ``folder`` holds a valid earlier result of this stage (recorded and logged as cached)."""
        if folder.is_dir() and not force:
            problem = verify_manifest(folder) or _still_valid(kind, cfg, folder)
            if problem is None:
                records.append(StageRecord(name, folder, True, 0.0))
                log(f"[{name}] cached: {folder}")
                return True
            log(f"[{name}] not reusing {folder}: {problem}")
        return False

    def stage(name: str, kind: str, key: str, build: Callable[[Path, bool], Any]) -> Path:
        folder = stages_dir / f"{name}-{key}"
        if reuse(name, kind, folder):
            return folder
        began = time.perf_counter()
        log(f"[{name}] running")
        build(folder, folder.exists())
        records.append(StageRecord(name, folder, False, time.perf_counter() - began))
        log(f"[{name}] done in {records[-1].seconds:.1f} s: {folder}")
        return folder

    data = cfg.data
    source_key = source_identity(cfg.model)
    baseline_key: str
    if cfg.finetune.enabled:
        baseline_key = stage_key("finetune", source_key, _without(data.to_dict(), _DATA_UNUSED["finetune"]),
                                 cfg.finetune.to_dict())
        baseline_model = stage("finetune", "finetune", baseline_key, lambda f, o: run_finetune(
            cfg.model, data, cfg.finetune.settings, f, overwrite=o, progress=progress))
    else:
        baseline_model, baseline_key = Path(resolve_model(cfg.model)), source_key
    if cfg.calibration.cache_dir is not None:
        calibration = cfg.calibration
    else:  # the pipeline's own statistics cache, shared by every ratio; --force empties it
        if force:
            shutil.rmtree(stages_dir / "calibration", ignore_errors=True)
        calibration = replace(cfg.calibration, cache_dir=str(stages_dir / "calibration"))
    candidate_key = stage_key("compress", baseline_key, _without(data.to_dict(), _DATA_UNUSED["compress"]),
                              _calibration_settings(cfg.calibration) if cfg.compression.statistics else None,
                              cfg.compression.to_dict())
    candidate_model = stage("compress", "compress", candidate_key, lambda f, o: run_compress(
        str(baseline_model), data, calibration, cfg.compression, f, evaluate_model=False, overwrite=o,
        progress=progress))
    if cfg.recovery.enabled:
        candidate_key = stage_key("finetune", candidate_key, _without(data.to_dict(), _DATA_UNUSED["finetune"]),
                                  cfg.recovery.to_dict())
        compressed_model = candidate_model
        candidate_model = stage("recovery", "finetune", candidate_key, lambda f, o: run_finetune(
            str(compressed_model), data, cfg.recovery.settings, f, overwrite=o, progress=progress))
    branches = []
    for role, model_dir, key in (("baseline", baseline_model, baseline_key),
                                 ("candidate", candidate_model, candidate_key)):
        ex_key = stage_key("export", key, _without(cfg.export.to_dict(), _CHECK_ONLY["export"]))
        # the compute precision used, not the setting (its default follows the scheme and the device)
        op_settings = {**_without(cfg.optimize.to_dict(), _CHECK_ONLY["optimize"]),
                       "accuracy_level": cfg.optimize.matmul_accuracy_level if cfg.optimize.quantize else None}
        op_key = stage_key("optimize", ex_key, op_settings)
        exported, optimized = stages_dir / f"export-{role}-{ex_key}", stages_dir / f"optimize-{role}-{op_key}"
        branches.append(_Branch(role, Path(model_dir), exported, optimized,
                                not reuse(f"export-{role}", "export", exported),
                                not reuse(f"optimize-{role}", "optimize", optimized)))
    busy = [b for b in branches if b.build_export or b.build_optimize]
    if jobs > 1 and len(busy) == 2:
        # Both branches are mostly single-threaded: the baseline's runs in a second process beside the candidate's.
        baseline, candidate = busy
        log(f"[{baseline.role}] export and optimisation running in a second process")
        with Background(_build_branch, baseline, cfg.export, cfg.optimize, name=f"{baseline.role} branch") as child:
            records.extend(_build_branch(candidate, cfg.export, cfg.optimize, log))
            done = child.result()
        records.extend(done)
        for record in done:
            log(f"[{record.name}] done in {record.seconds:.1f} s (second process): {record.folder}")
    else:
        for branch in busy:
            records.extend(_build_branch(branch, cfg.export, cfg.optimize, log))
    folders = {b.role: b.optimized for b in branches}
    log("[validate] running")
    began = time.perf_counter()
    report = report_dir if report_dir is not None else out / "report"
    # causal LMs: the PyTorch folders too, so the gate checks ONNX Runtime's perplexity against PyTorch's
    pytorch = {"baseline": baseline_model, "candidate": candidate_model} if cfg.task == "causal-lm" else None
    result = validate(folders["baseline"], folders["candidate"], _validation_data(cfg), cfg.validate, cfg.gate,
                      report, overwrite=True, progress=progress, raise_on_failure=False, pytorch_models=pytorch)
    records.append(StageRecord("validate", report, False, time.perf_counter() - began))
    return PipelineResult(out, records, result, time.perf_counter() - start, folders["candidate"])


@dataclass(frozen=True)
class SearchTrial:
    """One kept fraction tried by :func:`search_ratio`."""

    ratio: float
    passed: bool
    accuracy_passed: bool
    metric: str
    metric_baseline: float
    metric_candidate: float
    worst_latency_ratio: float | None
    failed_checks: tuple[str, ...]
    report: str

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return dict(asdict(self), failed_checks=list(self.failed_checks))


@dataclass(frozen=True)
class SearchResult:
    out_dir: Path
    trials: list[SearchTrial]
    best_ratio: float | None
    best_dir: Path | None
    seconds: float


ACCURACY_CHECKS = frozenset({"accuracy_drop", "agreement", "max_logit_diff", "perplexity_ratio"})


def search_ratio(cfg: PipelineConfig, out_dir: str | Path, search: SearchConfig | None = None, *,
                 force: bool = False, overwrite: bool = False, progress: bool | None = None,
                 log: Log = print, jobs: int | None = None) -> SearchResult:
    """The smallest kept fraction in ``[search.low, search.high]`` whose candidate passes the gate, by bisection.

    The bisection follows the accuracy-side checks (accuracy drop, agreement, logit difference), which fail as
    compression grows; size and latency checks only get easier with compression, so they are checked on the
    result rather than steering the search (a large kept fraction may fail them while smaller ones pass).

    Every trial is a full pipeline run sharing the fine-tuned baseline, its exports and one Fisher pass (all
    cached stages); recovery fine-tuning runs per trial when the config enables it. The best candidate's
    optimised ONNX folder is copied to ``out_dir/best``; ``search.json`` and ``search.md`` list every trial.
    """
    search = search or SearchConfig()
    low, high, steps = search.low, search.high, search.steps
    jobs = check_jobs(jobs)
    check_pipeline(cfg, out_dir, overwrite=overwrite)
    start = time.perf_counter()
    trials: dict[float, SearchTrial] = {}
    results: dict[float, PipelineResult] = {}
    with run_folder(out_dir, "search", overwrite=overwrite) as out:

        def trial(ratio: float) -> bool:
            """Run one kept fraction; True when its accuracy-side checks pass."""
            ratio = round(ratio, 4)
            if ratio not in trials:
                log(f"[search] ratio {ratio}")
                trial_cfg = replace(cfg, compression=replace(cfg.compression, ratio=ratio, rank=None))
                # --force recomputes the shared stages once, in the first trial; later trials reuse them
                result = run_stages(trial_cfg, out, force=force and not results, progress=progress, log=log,
                                    report_dir=out / "search" / f"ratio-{ratio:.4f}", jobs=jobs)
                results[ratio] = result
                trials[ratio] = _trial_record(ratio, result)
                (result.validation.out_dir / "pipeline.yaml").write_text(trial_cfg.to_yaml())
                failed = trials[ratio].failed_checks
                log(f"[search] ratio {ratio}: {'pass' if result.passed else 'fail: ' + ', '.join(failed)}")
            return trials[ratio].accuracy_passed

        if trial(high) and not trial(low):
            lo, hi = low, high
            for _ in range(steps):
                mid = round((lo + hi) / 2, 4)
                if trial(mid):
                    hi = mid
                else:
                    lo = mid
        ordered = sorted(trials.values(), key=lambda t: t.ratio)
        passing = [t.ratio for t in ordered if t.passed]
        best: float | None = min(passing) if passing else None
        _write_search_summary(out / "search-summary", cfg, low, high, steps, best, ordered)
        best_dir = None
        if best is not None:
            best_dir = out / "best"
            with atomic_output_dir(best_dir, overwrite=True) as tmp:
                shutil.copytree(results[best].candidate_dir, tmp, dirs_exist_ok=True)
        write_manifest(out, {"kind": "search", "best_ratio": best, "trials": [t.to_dict() for t in ordered]})
    return SearchResult(out, ordered, best, best_dir, time.perf_counter() - start)


def _trial_record(ratio: float, result: PipelineResult) -> SearchTrial:
    report = result.validation.report
    latency = report.get("latency") or {}
    worst = max((c["ratios"]["candidate"]["p50"] for c in latency.get("cells", [])), default=None)
    failed = tuple(c.name for c in result.validation.checks if not c.passed)
    metric = report["accuracy"].get("primary_metric", "accuracy")  # pearson for regression, f1 for QA
    return SearchTrial(ratio=ratio, passed=result.passed, accuracy_passed=not (set(failed) & ACCURACY_CHECKS),
                       metric=metric, metric_baseline=report["accuracy"]["baseline"][metric],
                       metric_candidate=report["accuracy"]["candidate"][metric], worst_latency_ratio=worst,
                       failed_checks=failed, report=str(result.validation.out_dir))


def _write_search_summary(folder: Path, cfg: PipelineConfig, low: float, high: float, steps: int,
                          best: float | None, trials: list[SearchTrial]) -> None:
    with atomic_output_dir(folder, overwrite=True) as tmp:
        summary = {"low": low, "high": high, "steps": steps, "best_ratio": best, "gate": cfg.gate.to_dict(),
                   "trials": [t.to_dict() for t in trials]}
        (tmp / "search.json").write_text(json.dumps(summary, indent=2))
        metric = trials[0].metric
        lines = [f"# Compression search: best kept fraction {best if best is not None else 'none'}", "",
                 f"| kept fraction | {metric} (baseline) | {metric} (candidate) | worst latency ratio | gate |",
                 "|---:|---:|---:|---:|---|"]
        for t in trials:
            gate = "pass" if t.passed else "fail: " + ", ".join(t.failed_checks)
            lat = "n/a" if t.worst_latency_ratio is None else f"{t.worst_latency_ratio:.3f}"
            lines.append(f"| {t.ratio} | {t.metric_baseline:.4f} | {t.metric_candidate:.4f} | {lat} | {gate} |")
        lines += ["", "![accuracy and latency against the kept fraction](search.png)"]
        (tmp / "search.md").write_text("\n".join(lines) + "\n")
        from .validators.plots import search_plot

        search_plot([t.to_dict() for t in trials], cfg.gate.max_accuracy_drop, tmp / "search.png")

