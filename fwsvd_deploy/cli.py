"""The ``fwsvd-deploy`` command line: builds configs from flags and calls the pipeline.

Exit codes: 0 success, 1 a gate failed, 2 bad usage or input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from .config import (
    ALLOCATIONS,
    FISHER_AXES,
    FISHER_ESTIMATORS,
    METHODS,
    QKV_MODES,
    TRAINABLE,
    CalibrationConfig,
    CompressionConfig,
    DataConfig,
    ExportConfig,
    FinetuneConfig,
    GateConfig,
    OptimizeConfig,
    PipelineConfig,
    ValidateConfig,
)
from .errors import ConfigError, FwsvdError
from .modeling import EMBEDDED_DECODER, EMBEDDED_MODEL
from .validators.decoder import CAUSAL_LM_TASK

PROG = "fwsvd-deploy"
DEFAULT_FISHER_CACHE = os.path.join("~", ".cache", "fwsvd-deploy", "fisher")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="rotten_tomatoes",
                   help="built-in 'rotten_tomatoes', a CSV/TSV/JSON/JSONL/Parquet file, or hub NAME[:CONFIG] "
                        "(default: %(default)s)")
    g.add_argument("--eval-dataset", default=None, help="separate file or hub dataset for evaluation")
    g.add_argument("--train-split", default="train")
    g.add_argument("--eval-split", default="validation")
    g.add_argument("--text-column", default="text")
    g.add_argument("--text-pair-column", default=None)
    g.add_argument("--label-column", default="label")
    g.add_argument("--max-length", type=int, default=128, help="tokenizer truncation (default: %(default)s)")
    g.add_argument("--eval-batch-size", type=int, default=64)
    g.add_argument("--train-samples", type=int, default=None, help="cap on training examples (seeded subset)")
    g.add_argument("--eval-samples", type=int, default=None, help="cap on evaluation examples (seeded subset)")
    g.add_argument("--eval-fraction", type=float, default=0.1,
                   help="held-out share of a single-file dataset (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0)


def _data_config(a: argparse.Namespace) -> DataConfig:
    return DataConfig(
        dataset=a.dataset, eval_dataset=a.eval_dataset, train_split=a.train_split, eval_split=a.eval_split,
        text_column=a.text_column, text_pair_column=a.text_pair_column, label_column=a.label_column,
        max_length=a.max_length, batch_size=a.eval_batch_size, max_train_samples=a.train_samples,
        max_eval_samples=a.eval_samples, eval_fraction=a.eval_fraction, seed=a.seed,
    )


def _targets(value: str) -> str | tuple[str, ...]:
    if value == "all-linear":
        return value
    if value.startswith("re:"):
        return value[3:]
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _overrides(values: list[str] | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in values or []:
        name, sep, rank = item.partition("=")
        if not sep or not name or not rank.strip().lstrip("-").isdigit():
            raise ConfigError(f"--rank-override {item!r} must look like MODULE_NAME=RANK")
        out[name.strip()] = int(rank)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Fisher-weighted SVD compression, ONNX export and validation.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ft = sub.add_parser("finetune", help="fine-tune a classifier or a causal LM (dense, or compressed for recovery)",
                        description="Fine-tune a sequence classifier on labelled data, or a causal LM on token "
                                    "windows of --max-length with the next-token loss (the best held-out perplexity "
                                    "is kept). A model without a classification head gets a fresh one sized from the "
                                    "data; a compressed folder keeps its low-rank layers.")
    ft.add_argument("--model", default=EMBEDDED_MODEL,
                    help="model folder, hub id, or a folder written by 'compress' (default: %(default)s, embedded)")
    _add_output_args(ft)
    _add_data_args(ft)
    g = ft.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--max-steps", type=int, default=None, help="total optimiser steps (overrides --epochs)")
    g.add_argument("--learning-rate", type=float, default=5e-5)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-ratio", type=float, default=0.1)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--eval-steps", type=int, default=None,
                   help="causal LMs: evaluate every N steps and at the end, keeping the best (default: each epoch)")
    g.add_argument("--trainable", default="all", choices=TRAINABLE,
                   help="train all parameters, or only the factorised layers of a compressed model "
                        "(default: %(default)s)")
    g.add_argument("--no-eval", action="store_true", help="skip per-epoch evaluation (keep the last weights)")

    cp = sub.add_parser("compress", help="factorise a fine-tuned classifier or a causal LM",
                        description="Collect the calibration statistics the method needs (Fisher, input second "
                                    "moments), factorise the targeted layers, evaluate before and after (accuracy, "
                                    "or perplexity for a causal LM), and write a compressed model folder.")
    cp.add_argument("--model", required=True,
                    help="fine-tuned classifier or causal LM: folder, hub id, GGUF file, or the embedded "
                         f"'{EMBEDDED_DECODER}' (not a compressed folder)")
    _add_output_args(cp)
    g = cp.add_argument_group("compression")
    g.add_argument("--method", default="fwsvd", choices=METHODS,
                   help="fwsvd: Fisher-weighted SVD; svd: plain; asvd: activation-scaled; svd-llm: truncation-aware "
                        "whitening; fisher-whitened: whitening with Fisher output-row weights (default: %(default)s)")
    g.add_argument("--fisher-axis", default="both", choices=FISHER_AXES,
                   help="how Fisher importance is shared by fwsvd (default: %(default)s)")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--ratio", type=float, default=None,
                      help="fraction of targeted weight parameters kept, global budget (default 0.5)")
    size.add_argument("--rank", type=int, default=None, help="fixed rank for every targeted layer")
    g.add_argument("--allocation", default="uniform", choices=ALLOCATIONS,
                   help="uniform kept fraction per layer; fisher: greedy on Fisher-weighted error (fwsvd); loss: "
                        "greedy on the loss each singular direction removes, any method (default: %(default)s)")
    g.add_argument("--min-rank-fraction", type=float, default=CompressionConfig.min_rank_fraction,
                   help="loss allocation's floor, a fraction of each layer's uniform rank (default: %(default)s)")
    g.add_argument("--asvd-alpha", type=float, default=CompressionConfig.asvd_alpha,
                   help="asvd's activation exponent, in (0, 1] (default: %(default)s)")
    g.add_argument("--whitening-damp", type=float, default=CompressionConfig.whitening_damp,
                   help="damping of the whitened methods, a fraction of the mean input second moment "
                        "(default: %(default)s)")
    g.add_argument("--fisher-power", type=float, default=CompressionConfig.fisher_power,
                   help="fisher-whitened's tempering of the Fisher row weights: rows (a/mean a)**power "
                        "(default: %(default)s)")
    g.add_argument("--targets", default="all-linear",
                   help="'all-linear', comma-separated name suffixes, or re:REGEX (default: %(default)s)")
    g.add_argument("--exclude", default=None, help="comma-separated name suffixes or re:REGEX to leave dense")
    g.add_argument("--rank-override", action="append", metavar="NAME=RANK", help="per-layer rank (repeatable)")
    g.add_argument("--rank-multiple", type=int, default=1, metavar="N",
                   help="round allocated ranks to multiples of N within the same budget, to match SIMD widths "
                        "(16 floats with AVX-512) or tensor-core tiles (8/16) (default: %(default)s, no rounding)")
    g.add_argument("--qkv", default="separate", choices=QKV_MODES,
                   help="factorise q/k/v one by one, or stacked with one shared down-projection, which ONNX "
                        "Runtime runs as its fused Attention operator (default: %(default)s)")
    g = cp.add_argument_group("calibration")
    g.add_argument("--fisher-samples", "--calibration-samples", dest="calibration_samples", type=int, default=None,
                   help="calibration examples: labelled examples for a classifier (default 512), windows of "
                        "--max-length tokens for a causal LM (default 64)")
    g.add_argument("--fisher-estimator", default="per_example", choices=FISHER_ESTIMATORS)
    g.add_argument("--fisher-batch-size", "--calibration-batch-size", dest="calibration_batch_size", type=int,
                   default=16)
    g.add_argument("--fisher-cache", "--calibration-cache", dest="calibration_cache", default=DEFAULT_FISHER_CACHE,
                   help="cache folder for calibration statistics, or 'none' (default: %(default)s)")
    g.add_argument("--no-eval", action="store_true", help="skip evaluation before and after")
    _add_data_args(cp)

    ex = sub.add_parser("export", help="export a model folder (dense or compressed) to ONNX",
                        description="Export through optimum-onnx's exporter, then check ONNX Runtime against PyTorch "
                                    "on shapes other than the export's; a mismatch is an error.")
    ex.add_argument("--model", required=True, help="model folder (dense, or written by 'compress'/'finetune')")
    ex.add_argument("--task", default="text-classification",
                    choices=["text-classification", "token-classification", "question-answering",
                             "feature-extraction"])
    _add_output_args(ex)
    ex.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's, at least 14)")
    ex.add_argument("--external-data", action="store_true", help="store weights in model.onnx_data")
    ex.add_argument("--atol", type=float, default=1e-4, help="parity tolerance (default: %(default)s)")

    op = sub.add_parser("optimize", help="optimise an exported ONNX folder with ONNX Runtime (low-rank aware)",
                        description="ONNX Runtime's transformer fusions, kept for factorised layers; writes the fused "
                                    "operator counts and a parity check against the unoptimised graph.")
    op.add_argument("--onnx", required=True, help="folder written by 'fwsvd-deploy export'")
    _add_output_args(op)
    op.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    op.add_argument("--level", default="O2", choices=["O1", "O2", "O3"],
                    help="O1 basic rewrites; O2 + transformer fusions; O3 + GELU approximation (default: %(default)s)")
    op.add_argument("--fp16", action="store_true", help="float16 weights, float32 inputs/outputs (CUDA only)")
    op.add_argument("--int8", action="store_true", help="dynamic int8 quantisation (CPU only)")
    op.add_argument("--atol", type=float, default=1e-3, help="fp32 parity tolerance (default: %(default)s)")

    va = sub.add_parser("validate", help="compare a candidate ONNX model with its baseline and apply the gate",
                        description="Accuracy (ONNX Runtime), latency and memory of both models on the same data, "
                                    "provider and machine (causal LMs: perplexity, greedy agreement and generation "
                                    "speed with the KV cache); exit 0 when every check passes, 1 when the gate fails.")
    va.add_argument("--baseline", required=True, help="optimised baseline ONNX folder")
    va.add_argument("--candidate", required=True, help="optimised candidate ONNX folder")
    va.add_argument("--baseline-model", default=None,
                    help="causal LMs: the PyTorch folder the baseline graph was exported from; its perplexity "
                         "through ONNX Runtime must agree with PyTorch's to 0.1%%")
    va.add_argument("--candidate-model", default=None,
                    help="causal LMs: the PyTorch folder (dense or written by 'compress') of the candidate graph")
    _add_output_args(va)
    _add_measure_args(va)
    g = va.add_argument_group("gate (a threshold left out is not checked)")
    g.add_argument("--max-accuracy-drop", type=float, default=None,
                   help="points (default: 1.0 for encoder tasks; causal LMs have no accuracy)")
    g.add_argument("--min-agreement", type=float, default=None,
                   help="share of examples with the same class (causal LMs: the same greedy next token)")
    g.add_argument("--max-latency-ratio", type=float, default=None)
    g.add_argument("--max-memory-ratio", type=float, default=None)
    g.add_argument("--max-logit-diff", type=float, default=None)
    g.add_argument("--max-perplexity-ratio", type=float, default=None, help="causal LMs: candidate/baseline")
    g.add_argument("--max-decode-latency-ratio", type=float, default=None,
                   help="causal LMs: per-token decode time with the KV cache, candidate/baseline")
    g.add_argument("--max-prefill-latency-ratio", type=float, default=None,
                   help="causal LMs: prefill time of the prompt, candidate/baseline")
    g.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    g.add_argument("--no-memory", action="store_true", help="skip memory measurement")
    _add_data_args(va)

    be = sub.add_parser("bench", help="latency of ONNX models, interleaved in one process",
                        description="Latency grid of one or more ONNX folders (causal LMs: prefill and per-token "
                                    "decode time with the KV cache); ratios are against the first.")
    be.add_argument("--model", action="append", required=True, help="ONNX folder (repeat; the first is the reference)")
    be.add_argument("--out", default=None, help="write bench.json and bench.md into this folder")
    be.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    _add_measure_args(be)

    rn = sub.add_parser("run", help="the whole pipeline: finetune? -> compress -> export -> optimise -> validate",
                        description="Run every stage of a pipeline config (default: the embedded MiniLM on Rotten "
                                    "Tomatoes), reuse cached stages, write the report, exit 1 if the gate fails.")
    rn.add_argument("--config", default=None, help="pipeline YAML (default: the embedded default)")
    rn.add_argument("--out", default="runs/pipeline", help="output folder (default: %(default)s)")
    rn.add_argument("--dry-run", action="store_true", help="print the resolved configuration and stop")
    rn.add_argument("--force", action="store_true", help="recompute every stage")

    se = sub.add_parser("search", help="the most compression that still passes the gate (bisection on the ratio)",
                        description="Bisect the kept fraction between --low and --high; every trial is a pipeline run "
                                    "sharing the cached baseline and one Fisher pass. The best candidate is copied to "
                                    "OUT/best; exit 1 when no ratio passes.")
    se.add_argument("--config", default=None, help="pipeline YAML (default: the embedded default)")
    se.add_argument("--out", default="runs/search", help="output folder (default: %(default)s)")
    se.add_argument("--max-accuracy-drop", type=float, default=None, help="override the gate's threshold (points)")
    se.add_argument("--low", type=float, default=0.1, help="smallest kept fraction tried (default: %(default)s)")
    se.add_argument("--high", type=float, default=0.9, help="largest kept fraction tried (default: %(default)s)")
    se.add_argument("--steps", type=int, default=4, help="bisection steps after the two ends (default: %(default)s)")
    se.add_argument("--force", action="store_true", help="recompute every stage")
    return parser


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def _add_measure_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("measurement")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda", "tensorrt"])
    g.add_argument("--threads", type=int, default=2, help="intra-op threads per session (default: %(default)s)")
    g.add_argument("--batch-sizes", default="1,8,32", help="latency grid (default: %(default)s)")
    g.add_argument("--seq-lens", default="32,128", help="latency grid (default: %(default)s)")
    g.add_argument("--rounds", type=int, default=10, help="interleaved rounds per grid cell (default: %(default)s)")
    g.add_argument("--warmup", type=int, default=2)
    g = p.add_argument_group("generation (causal LMs; replaces the batch x sequence grid)")
    g.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per row (default: %(default)s)")
    g.add_argument("--new-tokens", type=int, default=32, help="decode steps timed (default: %(default)s)")
    g.add_argument("--gen-batch-sizes", default="1,8",
                   help="batch sizes of the timed generation (default: %(default)s)")


def _int_list(flag: str, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} {value!r} must be comma-separated integers, e.g. 1,8,32") from None


def _validate_config(a: argparse.Namespace, **extra: Any) -> ValidateConfig:
    return ValidateConfig(device=a.device, threads=a.threads, batch_sizes=_int_list("--batch-sizes", a.batch_sizes),
                          seq_lens=_int_list("--seq-lens", a.seq_lens), rounds=a.rounds, warmup=a.warmup,
                          prompt_len=a.prompt_len, new_tokens=a.new_tokens,
                          gen_batch_sizes=_int_list("--gen-batch-sizes", a.gen_batch_sizes), **extra)


def _progress(a: argparse.Namespace) -> bool | None:
    return False if a.quiet else None


def _cmd_finetune(a: argparse.Namespace) -> int:
    from .pipeline import run_finetune

    cfg = FinetuneConfig(epochs=a.epochs, max_steps=a.max_steps, learning_rate=a.learning_rate,
                         weight_decay=a.weight_decay, warmup_ratio=a.warmup_ratio, batch_size=a.batch_size,
                         eval_every_epoch=not a.no_eval, eval_steps=a.eval_steps, trainable=a.trainable,
                         seed=a.seed)
    outcome = run_finetune(a.model, _data_config(a), cfg, a.out, overwrite=a.overwrite, progress=_progress(a))
    after = outcome.eval_after
    kind = "compressed model (recovery)" if outcome.compressed else "model"
    line = f"fine-tuned {kind}: {outcome.result.steps} steps in {outcome.result.seconds:.1f} s"
    if after is not None:
        line += "; eval " + ", ".join(f"{k} {v:.4f}" for k, v in after.metrics.items() if k != "tokens")
        line += f" ({after.num_examples} examples)"
    before = outcome.eval_before.metrics if outcome.eval_before is not None else {}
    for key in ("accuracy", "perplexity"):
        if key in before:
            line += f"; {key} before fine-tuning {before[key]:.4f}"
    print(line)
    print(f"wrote {outcome.out_dir}")
    return 0


def _cmd_compress(a: argparse.Namespace) -> int:
    from .pipeline import run_compress

    cache = None if a.calibration_cache.lower() == "none" else os.path.expanduser(a.calibration_cache)
    comp = CompressionConfig(
        method=a.method, fisher_axis=a.fisher_axis, ratio=a.ratio, rank=a.rank, allocation=a.allocation,
        target_modules=_targets(a.targets), exclude_modules=None if a.exclude is None else _targets(a.exclude),
        rank_overrides=_overrides(a.rank_override), qkv=a.qkv, rank_multiple=a.rank_multiple,
        asvd_alpha=a.asvd_alpha, whitening_damp=a.whitening_damp, fisher_power=a.fisher_power,
        min_rank_fraction=a.min_rank_fraction,
    )
    calibration = CalibrationConfig(num_samples=a.calibration_samples, estimator=a.fisher_estimator,
                                    batch_size=a.calibration_batch_size, cache_dir=cache)
    outcome = run_compress(a.model, _data_config(a), calibration, comp, a.out, evaluate_model=not a.no_eval,
                           overwrite=a.overwrite, progress=_progress(a))
    r = outcome.report
    print(r.to_markdown(max_rows=0).splitlines()[0])
    timing = f"compress {outcome.compress_seconds:.1f} s"
    if outcome.statistics is not None:
        st = outcome.statistics
        took = "cached" if st.from_cache else f"{st.seconds:.1f} s"
        timing = f"calibration on {st.num_examples} examples: {took}; {timing}"
    print(timing)
    if outcome.eval_before is not None and outcome.eval_after is not None:
        metrics = outcome.eval_after.metrics
        key = next(k for k in ("accuracy", "perplexity", "mse") if k in metrics)
        print(f"eval {key}: baseline {outcome.eval_before.metrics[key]:.4f} -> compressed "
              f"{metrics[key]:.4f} ({outcome.eval_after.num_examples} examples, no fine-tuning)")
    print(f"wrote {outcome.out_dir}")
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from .exporters import export_onnx

    cfg = ExportConfig(task=a.task, opset=a.opset, external_data=a.external_data, atol=a.atol)
    result = export_onnx(a.model, cfg, a.out, overwrite=a.overwrite)
    kind = "compressed" if result.compressed else "dense"
    print(f"exported {kind} model for {result.task} (opset {result.opset}) in {result.seconds:.1f} s; parity vs "
          f"PyTorch: max |diff| {result.parity['max_abs_diff']:.2e} <= {cfg.atol:g} on "
          + ", ".join(f"{r['batch']}x{r['sequence']}" for r in result.parity["shapes"]))
    print(f"wrote {result.onnx_path}")
    return 0


def _cmd_optimize(a: argparse.Namespace) -> int:
    from .exporters import optimize_onnx

    cfg = OptimizeConfig(device=a.device, level=a.level, fp16=a.fp16, int8=a.int8, atol=a.atol)
    result = optimize_onnx(a.onnx, cfg, a.out, overwrite=a.overwrite)
    fused = ", ".join(f"{k} {v}" for k, v in result.fusions.items() if v)
    print(f"optimised for {cfg.device} ({cfg.level}{', fp16' if cfg.fp16 else ''}{', int8' if cfg.int8 else ''}) "
          f"in {result.seconds:.1f} s; fused: {fused or 'none'}; low-rank layers kept: {result.low_rank_layers}")
    if result.reference_fusions is not None:
        status = "all kept" if result.fusions_complete else "FEWER than the dense reference"
        print(f"fusions vs dense-structured reference: {status} ({result.reference_fusions})")
    if result.parity is not None:
        print(f"parity vs unoptimised graph: max |diff| {result.parity['max_abs_diff']:.2e}")
    else:
        print("parity not run: CUDA graphs are checked on a CUDA machine")
    print(f"wrote {result.onnx_path}")
    return 0


def _cmd_validate(a: argparse.Namespace) -> int:
    from .validators.decoder import is_causal_lm_folder
    from .validators.validate import validate

    cfg = _validate_config(a, latency=not a.no_latency, memory=not a.no_memory)
    drop = a.max_accuracy_drop
    if drop is None and not is_causal_lm_folder(a.baseline):
        drop = GateConfig().max_accuracy_drop
    gate = GateConfig(max_accuracy_drop=drop, min_agreement=a.min_agreement,
                      max_latency_ratio=a.max_latency_ratio, max_memory_ratio=a.max_memory_ratio,
                      max_logit_diff=a.max_logit_diff, max_perplexity_ratio=a.max_perplexity_ratio,
                      max_decode_latency_ratio=a.max_decode_latency_ratio,
                      max_prefill_latency_ratio=a.max_prefill_latency_ratio)
    result = validate(a.baseline, a.candidate, _data_config(a), cfg, gate, a.out, overwrite=a.overwrite,
                      progress=_progress(a), raise_on_failure=False,
                      pytorch_models={"baseline": a.baseline_model, "candidate": a.candidate_model})
    _print_validation(result)
    return 0 if result.passed else 1


def _print_validation(result: Any) -> None:
    from .validators.report import check_value
    from .validators.validate import gate_failure_message

    acc = result.report["accuracy"]
    key = acc.get("primary_metric", "accuracy")
    line = (f"{key}: baseline {acc['baseline'][key]:.4f}, candidate {acc['candidate'][key]:.4f} on "
            f"{acc['examples']} examples")
    if "agreement" in acc["comparison"]:
        line += f"; agreement {acc['comparison']['agreement']:.4f}"
    if acc.get("task") == CAUSAL_LM_TASK:
        from .validators.causal_lm import summary_lines

        print("\n".join(summary_lines(result.report)))
    else:
        print(line)
    for c in result.checks:
        value = check_value(c.value)
        print(f"  {'PASS' if c.passed else 'FAIL'} {c.name} = {value} ({c.comparison} {c.threshold:g})")
    if result.passed:
        print(f"gate passed; report: {result.out_dir / 'report.md'}")
    else:
        print(f"fwsvd-deploy: {gate_failure_message(result.checks, result.out_dir)}", file=sys.stderr)


def _cmd_bench(a: argparse.Namespace) -> int:
    import json

    from .validators.latency import measure_latency

    cfg = _validate_config(a)
    names = {}
    for path in a.model:
        name = os.path.basename(os.path.normpath(path)) or path
        while name in names:
            name += "'"
        names[name] = path
    if a.out:
        from .checkpoint import check_output_dir

        check_output_dir(a.out, a.overwrite)  # before minutes of measuring, not after
    if _bench_decoders(a.model, cfg):
        from .validators.generation import generation_table, measure_generation

        result = measure_generation(names, device=cfg.device, batch_sizes=cfg.gen_batch_sizes,
                                    prompt_len=cfg.prompt_len, new_tokens=cfg.new_tokens, threads=cfg.threads,
                                    warmup=cfg.warmup, rounds=cfg.rounds, progress=_progress(a))
        lines = generation_table(result)
    else:
        result = measure_latency(names, device=cfg.device, batch_sizes=cfg.batch_sizes, seq_lens=cfg.seq_lens,
                                 threads=cfg.threads, warmup=cfg.warmup, rounds=cfg.rounds, progress=_progress(a))
        first = next(iter(names))
        lines = ["| batch x sequence | " + " | ".join(f"{n} p50 ms" for n in names)
                 + "".join(f" | {n} / {first}" for n in list(names)[1:]) + " |",
                 "|---|" + "---:|" * (2 * len(names) - 1)]
        for cell in result["cells"]:
            row = [f"{cell['models'][n]['p50_ms']:.1f}" for n in names]
            row += [f"{cell['ratios'][n]['p50']:.3f}" for n in list(names)[1:]]
            lines.append(f"| {cell['batch']} x {cell['sequence']} | " + " | ".join(row) + " |")
    table = "\n".join(lines) + "\n"
    print(table, end="")
    if a.out:
        from .checkpoint import atomic_output_dir

        with atomic_output_dir(a.out, overwrite=a.overwrite) as tmp:
            (tmp / "bench.json").write_text(json.dumps(result, indent=2))
            (tmp / "bench.md").write_text(table)
        print(f"wrote {a.out}")
    return 0


def _bench_decoders(folders: list[str], cfg: ValidateConfig) -> bool:
    """Whether ``bench`` times generation (causal LMs, prompt plus new tokens checked) or the encoder grid."""
    from pathlib import Path

    from .validators.decoder import check_lengths, is_causal_lm_folder

    causal = [is_causal_lm_folder(f) for f in folders]
    if any(causal) and not all(causal):
        raise ConfigError("bench times encoders on a batch x sequence grid and causal language models by generation; "
                          f"give models of one kind ({', '.join(f for f, c in zip(folders, causal, strict=True) if c)} "
                          "are causal LMs)")
    for folder in folders if all(causal) else []:
        check_lengths(Path(folder), prompt_len=cfg.prompt_len, new_tokens=cfg.new_tokens)
    return all(causal)


def _cmd_run(a: argparse.Namespace) -> int:
    from .pipeline import run_pipeline

    cfg = PipelineConfig.from_yaml(a.config) if a.config else PipelineConfig()
    if a.dry_run:
        print(cfg.to_yaml(), end="")
        return 0
    from .exporters.runtime import require_provider

    for device in {cfg.validate.device, cfg.optimize.device} - {"cpu"}:
        require_provider(device)
    result = run_pipeline(cfg, a.out, force=a.force, progress=_progress(a))
    cached = sum(s.cached for s in result.stages)
    print(f"pipeline finished in {result.seconds:.1f} s ({cached} of {len(result.stages)} stages from cache)")
    _print_validation(result.validation)
    print(f"configuration: {result.out_dir / 'pipeline.yaml'}")
    return 0 if result.passed else 1


def _cmd_search(a: argparse.Namespace) -> int:
    from dataclasses import replace

    from .pipeline import search_ratio

    cfg = PipelineConfig.from_yaml(a.config) if a.config else PipelineConfig()
    if a.max_accuracy_drop is not None:
        cfg = replace(cfg, gate=replace(cfg.gate, max_accuracy_drop=a.max_accuracy_drop))
    result = search_ratio(cfg, a.out, low=a.low, high=a.high, steps=a.steps, force=a.force, progress=_progress(a))
    for t in sorted(result.trials, key=lambda t: t["ratio"]):
        print(f"  ratio {t['ratio']}: {t['metric']} {t['metric_candidate']:.4f} (baseline {t['metric_baseline']:.4f}) "
              f"{'pass' if t['passed'] else 'fail: ' + ', '.join(t['failed_checks'])}")
    print(f"search finished in {result.seconds:.1f} s; summary: {result.out_dir / 'search-summary' / 'search.md'}")
    if result.best_ratio is None:
        print(f"{PROG}: no kept fraction in [{a.low}, {a.high}] passes the gate", file=sys.stderr)
        return 1
    print(f"best kept fraction {result.best_ratio}; candidate copied to {result.best_dir}")
    return 0


_COMMANDS: dict[str, Any] = {
    "finetune": _cmd_finetune, "compress": _cmd_compress, "export": _cmd_export, "optimize": _cmd_optimize,
    "validate": _cmd_validate, "bench": _cmd_bench, "run": _cmd_run, "search": _cmd_search,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(_COMMANDS[args.command](args))
    except FwsvdError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished outputs are intact, unfinished ones were removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
