"""The ``fwsvd-deploy`` command line: builds configs from flags and calls the pipeline.

Exit codes (``errors.EXIT_*``): 0 success, 1 a gate failed, 2 bad usage or input, 3 an unexpected internal error
(one line, and the full traceback written to a log file; ``--debug`` prints it), 130 interrupted. Defaults and
choices come from the config dataclasses and their constants. This module imports nothing heavy: torch and
transformers load inside :func:`main`, where an interrupt still exits 130 with one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import (
    ALLOCATIONS,
    DEFAULT_RATIO,
    DEVICES,
    EXPORT_TASKS,
    FACTOR_SPLITS,
    FISHER_AXES,
    FISHER_ESTIMATORS,
    LEVELS,
    METHODS,
    NBITS_QUANTIZERS,
    PACKINGS,
    PIPELINE_TASKS,
    QKV_MODES,
    QUANTIZATIONS,
    REFITS,
    RUN_DEVICES,
    TRAINABLE,
    CalibrationConfig,
    CompressionConfig,
    DataConfig,
    ExportConfig,
    FinetuneConfig,
    GateConfig,
    OptimizeConfig,
    PipelineConfig,
    SearchConfig,
    ValidateConfig,
)
from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, ConfigError, FwsvdError, first_line

PROG = "fwsvd-deploy"


def default(cls: type, name: str) -> Any:
    """The default of a config dataclass field."""
    spec = {f.name: f for f in dataclasses.fields(cls)}[name]
    if spec.default is not dataclasses.MISSING:
        return spec.default
    return spec.default_factory()  # type: ignore[misc]


def _csv(values: Sequence[int]) -> str:
    return ",".join(str(v) for v in values)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_data_args(p: argparse.ArgumentParser, eval_batch_size: int) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=default(DataConfig, "dataset"),
                   help="built-in 'rotten_tomatoes' (labelled), 'speeches' or 'headlines' (text, causal LMs), a "
                        "CSV/TSV/JSON/JSONL/Parquet (or, for text, .txt) file, or hub NAME[:CONFIG] "
                        "(default: %(default)s)")
    g.add_argument("--eval-dataset", default=None, help="separate file or hub dataset for evaluation")
    g.add_argument("--train-split", default=default(DataConfig, "train_split"))
    g.add_argument("--eval-split", default=default(DataConfig, "eval_split"))
    g.add_argument("--text-column", default=default(DataConfig, "text_column"))
    g.add_argument("--text-pair-column", default=None)
    g.add_argument("--label-column", default=default(DataConfig, "label_column"))
    g.add_argument("--max-length", type=int, default=default(DataConfig, "max_length"),
                   help="tokenizer truncation, at most the model's positions (default: %(default)s)")
    g.add_argument("--eval-batch-size", type=int, default=eval_batch_size, help="(default: %(default)s)")
    g.add_argument("--train-samples", type=int, default=None, help="cap on training examples (seeded subset)")
    g.add_argument("--eval-samples", type=int, default=None, help="cap on evaluation examples (seeded subset)")
    g.add_argument("--eval-fraction", type=float, default=default(DataConfig, "eval_fraction"),
                   help="held-out share of a single-file dataset (default: %(default)s)")
    g.add_argument("--seed", type=int, default=default(DataConfig, "seed"))


def _data_config(a: argparse.Namespace, *, batch_size: int | None = None) -> DataConfig:
    return DataConfig(
        dataset=a.dataset, eval_dataset=a.eval_dataset, train_split=a.train_split, eval_split=a.eval_split,
        text_column=a.text_column, text_pair_column=a.text_pair_column, label_column=a.label_column,
        max_length=a.max_length, batch_size=a.eval_batch_size if batch_size is None else batch_size,
        max_train_samples=a.train_samples, max_eval_samples=a.eval_samples, eval_fraction=a.eval_fraction,
        seed=a.seed,
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
    parser.add_argument("--debug", action="store_true", help="print the full traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ft = sub.add_parser("finetune", help="fine-tune a classifier or a causal LM (dense, or compressed for recovery)",
                        description="Fine-tune a sequence classifier on labelled data, or a causal LM on token "
                                    "windows of --max-length with the next-token loss (the best held-out perplexity "
                                    "is kept). A model without a classification head gets a fresh one sized from the "
                                    "data; a compressed folder keeps its low-rank layers.")
    ft.add_argument("--model", default=default(PipelineConfig, "model"),
                    help="model folder, hub id, or a folder written by 'compress' (default: %(default)s, embedded)")
    _add_output_args(ft)
    _add_pickle_arg(ft)
    _add_data_args(ft, default(DataConfig, "batch_size"))
    g = ft.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=default(FinetuneConfig, "epochs"))
    g.add_argument("--max-steps", type=int, default=None, help="total optimiser steps (overrides --epochs)")
    g.add_argument("--learning-rate", type=float, default=default(FinetuneConfig, "learning_rate"))
    g.add_argument("--weight-decay", type=float, default=default(FinetuneConfig, "weight_decay"))
    g.add_argument("--warmup-ratio", type=float, default=default(FinetuneConfig, "warmup_ratio"))
    g.add_argument("--batch-size", type=int, default=default(FinetuneConfig, "batch_size"))
    g.add_argument("--eval-steps", type=int, default=default(FinetuneConfig, "eval_steps"),
                   help="causal LMs: evaluate every N steps and at the end, keeping the best (default: each epoch)")
    g.add_argument("--trainable", default=default(FinetuneConfig, "trainable"), choices=TRAINABLE,
                   help="train all parameters, or only the factorised layers of a compressed model "
                        "(default: %(default)s)")
    g.add_argument("--no-eval", action="store_true", help="skip per-epoch evaluation (keep the last weights)")

    cp = sub.add_parser("compress", help="factorise a fine-tuned classifier or a causal LM",
                        description="Collect the calibration statistics the method needs (Fisher, input second "
                                    "moments), factorise the targeted layers, evaluate before and after (accuracy, "
                                    "or perplexity for a causal LM), and write a compressed model folder.")
    cp.add_argument("--model", required=True,
                    help="fine-tuned classifier or causal LM: folder, hub id, GGUF file, or the embedded "
                         "'smollm2-135m' (not a compressed folder)")
    _add_output_args(cp)
    _add_pickle_arg(cp)
    g = cp.add_argument_group("compression")
    g.add_argument("--method", default=default(CompressionConfig, "method"), choices=METHODS,
                   help="fwsvd: Fisher-weighted SVD; svd: plain; asvd: activation-scaled; svd-llm: truncation-aware "
                        "whitening; fisher-whitened: whitening with Fisher output-row weights (default: %(default)s)")
    g.add_argument("--fisher-axis", default=default(CompressionConfig, "fisher_axis"), choices=FISHER_AXES,
                   help="how Fisher importance is shared by fwsvd (default: %(default)s)")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--ratio", type=float, default=None,
                      help=f"fraction of targeted weight parameters kept, global budget (default {DEFAULT_RATIO})")
    size.add_argument("--rank", type=int, default=None, help="fixed rank for every targeted layer")
    g.add_argument("--allocation", default=default(CompressionConfig, "allocation"), choices=ALLOCATIONS,
                   help="uniform kept fraction per layer; fisher: greedy on Fisher-weighted error (fwsvd); loss: "
                        "greedy on the loss each singular direction removes, any method (default: loss for "
                        "fisher-whitened with a --ratio, else uniform)")
    g.add_argument("--min-rank-fraction", type=float, default=default(CompressionConfig, "min_rank_fraction"),
                   help="loss allocation's floor, a fraction of each layer's uniform rank (default: %(default)s)")
    g.add_argument("--asvd-alpha", type=float, default=default(CompressionConfig, "asvd_alpha"),
                   help="asvd's activation exponent, in (0, 1] (default: %(default)s)")
    g.add_argument("--whitening-damp", type=float, default=default(CompressionConfig, "whitening_damp"),
                   help="damping of the whitened methods, a fraction of the mean input second moment "
                        "(default: %(default)s)")
    g.add_argument("--fisher-power", type=float, default=default(CompressionConfig, "fisher_power"),
                   help="fisher-whitened's tempering of the Fisher row weights: rows (a/mean a)**power "
                        "(default: %(default)s)")
    g.add_argument("--targets", default=default(CompressionConfig, "target_modules"),
                   help="'all-linear', comma-separated name suffixes, or re:REGEX (default: %(default)s)")
    g.add_argument("--exclude", default=None, help="comma-separated name suffixes or re:REGEX to leave dense")
    g.add_argument("--rank-override", action="append", metavar="NAME=RANK", help="per-layer rank (repeatable)")
    g.add_argument("--rank-multiple", type=int, default=default(CompressionConfig, "rank_multiple"), metavar="N",
                   help="round allocated ranks to multiples of N within the same budget, to match SIMD widths "
                        "(16 floats with AVX-512) or tensor-core tiles (8/16) (default: %(default)s, no rounding)")
    g.add_argument("--qkv", default=default(CompressionConfig, "qkv"), choices=QKV_MODES,
                   help="factorise q/k/v one by one, or stacked with one shared down-projection, which ONNX "
                        "Runtime runs as its fused Attention operator (default: %(default)s)")
    g.add_argument("--refit", default=default(CompressionConfig, "refit"), choices=REFITS,
                   help="after down is chosen, solve up by least squares against the dense layer's output (up), "
                        "then down and up again (alternate) (default: %(default)s)")
    g = cp.add_argument_group("calibration")
    g.add_argument("--calibration-samples", "--fisher-samples", dest="calibration_samples", type=int,
                   default=default(CalibrationConfig, "num_samples"),
                   help="calibration examples: labelled examples for a classifier (default 512), windows of "
                        "--max-length tokens for a causal LM (default 64)")
    g.add_argument("--fisher-estimator", default=default(CalibrationConfig, "estimator"), choices=FISHER_ESTIMATORS)
    g.add_argument("--calibration-batch-size", "--fisher-batch-size", dest="calibration_batch_size", type=int,
                   default=default(CalibrationConfig, "batch_size"))
    g.add_argument("--calibration-cache", "--fisher-cache", dest="calibration_cache", default=None,
                   help="cache folder for calibration statistics, or 'none' (default: calibration/ under "
                        "$FWSVD_DEPLOY_CACHE or ~/.cache/fwsvd-deploy)")
    g.add_argument("--sequential", action="store_true",
                   help="compress the transformer blocks in order, each on the inputs the compressed blocks before "
                        "it give (one block's activations held at a time)")
    g.add_argument("--offload-dir", default=None,
                   help="with --sequential: keep the block activations in a temporary folder here, not in memory")
    g.add_argument("--no-eval", action="store_true", help="skip evaluation before and after")
    _add_data_args(cp, default(DataConfig, "batch_size"))

    ex = sub.add_parser("export", help="export a model folder (dense or compressed) to ONNX",
                        description="Export through optimum-onnx's exporter, then check ONNX Runtime against PyTorch "
                                    "on shapes other than the export's; a mismatch is an error.")
    ex.add_argument("--model", required=True, help="model folder (dense, or written by 'compress'/'finetune')")
    ex.add_argument("--task", default=default(ExportConfig, "task"), choices=EXPORT_TASKS,
                    help="encoders: a task head; causal language models: text-generation-with-past (with the KV "
                         "cache) or text-generation (default: %(default)s)")
    _add_output_args(ex)
    _add_pickle_arg(ex)
    ex.add_argument("--opset", type=int, default=default(ExportConfig, "opset"),
                    help="ONNX opset (default: the exporter's, at least 14)")
    ex.add_argument("--external-data", action="store_true", help="store weights in model.onnx_data")
    ex.add_argument("--atol", type=float, default=default(ExportConfig, "atol"),
                    help="parity tolerance (default: %(default)s)")

    op = sub.add_parser("optimize", help="optimise an exported ONNX folder with ONNX Runtime (low-rank aware)",
                        description="ONNX Runtime's transformer fusions, kept for factorised layers; writes the fused "
                                    "operator counts and a parity check against the unoptimised graph. A graph with "
                                    "fewer fused operators than its dense-structured reference is an error.")
    op.add_argument("--onnx", required=True, help="folder written by 'fwsvd-deploy export'")
    _add_output_args(op)
    op.add_argument("--device", default=default(OptimizeConfig, "device"), choices=DEVICES)
    op.add_argument("--level", default=default(OptimizeConfig, "level"), choices=LEVELS,
                    help="O1 basic rewrites; O2 + transformer fusions; O3 + GELU approximation (default: %(default)s)")
    op.add_argument("--fp16", action="store_true",
                    help="float16 weights, float32 inputs/outputs but a decoder's KV cache float16 (CUDA only)")
    op.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                    help="quantise every MatMul weight, low-rank factors included: int8 dynamic (weights and "
                         "activations; CPU only), or weight-only MatMulNBits with 8 (int8-weight: decoders' 8 bits) or "
                         "4 bits (int4) (CPU and CUDA); the head stays float unless --quantize-lm-head")
    op.add_argument("--int8", dest="quantize", action="store_const", const="int8", help="the same as --quantize int8")
    op.add_argument("--block-size", type=int, default=default(OptimizeConfig, "block_size"),
                    help="int4, int8-weight: weights per scale along the input dimension, a power of two in [16, 256] "
                         "(default: %(default)s)")
    op.add_argument("--symmetric", action="store_true", help="int4, int8-weight: scales only, no zero points")
    op.add_argument("--accuracy-level", type=int, default=default(OptimizeConfig, "accuracy_level"),
                    help="int4, int8-weight: MatMulNBits compute precision, 0 (the provider's default) to 4 (int8 "
                         "activations block by block, the CPU's fastest) (default: 4 for int8-weight on the CPU, "
                         "else 0)")
    op.add_argument("--per-channel", action="store_true", help="int8: a scale per output column, not per tensor")
    op.add_argument("--quantize-lm-head", action="store_true",
                    help="quantise the head that writes the logits too (kept float otherwise)")
    op.add_argument("--quantizer", choices=NBITS_QUANTIZERS, default=default(OptimizeConfig, "quantizer"),
                    help="MatMulNBits: rtn (round to nearest) or, for int4, hqq (half-quadratic: each block's scale "
                         "and zero point fitted to its weights, no data) (default: %(default)s)")
    op.add_argument("--factor-split", choices=FACTOR_SPLITS, default=default(OptimizeConfig, "factor_split"),
                    help="with --quantize: how each low-rank layer's scale is split between its factors "
                         "(default: %(default)s)")
    op.add_argument("--atol", type=float, default=default(OptimizeConfig, "atol"),
                    help="fp32 parity tolerance (default: %(default)s)")
    op.add_argument("--allow-fusion-loss", action="store_true",
                    help="keep a graph that lost fused operators (recorded in its manifest and the validation report)")
    op.add_argument("--no-fuse-attention", dest="fuse_attention", action="store_false",
                    help="keep a Llama/Mistral/Qwen2 decoder's exported attention instead of fusing it into "
                         "GroupQueryAttention (which takes several new tokens on top of a cache only at batch 1)")
    op.add_argument("--pack-matmuls", choices=PACKINGS, default=default(OptimizeConfig, "pack_matmuls"),
                    help="join the MatMuls that read one tensor into one and a Split (the same values): factors (the "
                         "low-rank down-projections of q/k/v and gate/up), all (dense projections too) or none "
                         "(default: %(default)s)")
    genai = op.add_mutually_exclusive_group()
    genai.add_argument("--genai", dest="genai", action="store_const", const=True, default=None,
                       help="require genai_config.json (onnxruntime-genai serving) beside the graph; written by "
                            "default for every decoder exported with its KV cache")
    genai.add_argument("--no-genai", dest="genai", action="store_const", const=False,
                       help="write no genai_config.json")

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
    va.add_argument("--parity-windows", type=int, default=None,
                    help="causal LMs: run the ONNX-vs-PyTorch perplexity check on the first N evaluation windows "
                         "(default: all of them)")
    _add_output_args(va)
    _add_measure_args(va)
    g = va.add_argument_group("gate (a threshold left out is not checked)")
    g.add_argument("--max-accuracy-drop", type=float, default=None,
                   help=f"points, 0 to 100 (default: {default(GateConfig, 'max_accuracy_drop')} for encoder tasks; "
                        "causal LMs have no accuracy)")
    g.add_argument("--min-agreement", type=float, default=default(GateConfig, "min_agreement"),
                   help="(0, 1]: share of examples with the same class (causal LMs: the same greedy next token)")
    g.add_argument("--max-latency-ratio", type=float, default=default(GateConfig, "max_latency_ratio"))
    g.add_argument("--max-memory-ratio", type=float, default=default(GateConfig, "max_memory_ratio"))
    g.add_argument("--max-logit-diff", type=float, default=default(GateConfig, "max_logit_diff"))
    g.add_argument("--max-perplexity-ratio", type=float, default=default(GateConfig, "max_perplexity_ratio"),
                   help="causal LMs: candidate/baseline perplexity")
    g.add_argument("--max-decode-latency-ratio", type=float, default=default(GateConfig, "max_decode_latency_ratio"),
                   help="causal LMs: per-token decode time with the KV cache, candidate/baseline")
    g.add_argument("--max-prefill-latency-ratio", type=float,
                   default=default(GateConfig, "max_prefill_latency_ratio"),
                   help="causal LMs: prefill time of the prompt, candidate/baseline")
    g.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    g.add_argument("--no-memory", action="store_true", help="skip memory measurement")
    _add_data_args(va, default(ValidateConfig, "eval_batch_size"))

    be = sub.add_parser("bench", help="latency of ONNX models, interleaved in one process",
                        description="Latency grid of one or more ONNX folders (causal LMs: prefill and per-token "
                                    "decode time with the KV cache); ratios are against the first.")
    be.add_argument("--model", action="append", required=True, help="ONNX folder (repeat; the first is the reference)")
    be.add_argument("--out", default=None, help="write bench.json and bench.md into this folder")
    be.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    _add_measure_args(be)

    rn = sub.add_parser("run", help="the whole pipeline: finetune? -> compress -> export -> optimise -> validate",
                        description="Run every stage of a pipeline config (default: the embedded MiniLM on Rotten "
                                    "Tomatoes), reuse cached stages, write the report, exit 1 if the gate fails. "
                                    "A folder an earlier run or search wrote is reused (its stages are the cache); "
                                    "any other non-empty folder needs --overwrite.")
    _add_pipeline_args(rn, "runs/pipeline")
    rn.add_argument("--dry-run", action="store_true", help="print the resolved configuration and stop")
    rn.add_argument("--force", action="store_true", help="recompute every stage")

    se = sub.add_parser("search", help="the most compression that still passes the gate (bisection on the ratio)",
                        description="Bisect the kept fraction between --low and --high; every trial is a pipeline run "
                                    "sharing the cached baseline and one Fisher pass. The best candidate is copied to "
                                    "OUT/best; exit 1 when no ratio passes.")
    _add_pipeline_args(se, "runs/search")
    se.add_argument("--max-accuracy-drop", type=float, default=None, help="override the gate's threshold (points)")
    se.add_argument("--max-perplexity-ratio", type=float, default=None,
                    help="causal LMs: override the gate's perplexity threshold (candidate/baseline)")
    se.add_argument("--low", type=float, default=default(SearchConfig, "low"),
                    help="smallest kept fraction tried (default: %(default)s)")
    se.add_argument("--high", type=float, default=default(SearchConfig, "high"),
                    help="largest kept fraction tried (default: %(default)s)")
    se.add_argument("--steps", type=int, default=default(SearchConfig, "steps"),
                    help="bisection steps after the two ends (default: %(default)s)")
    se.add_argument("--force", action="store_true", help="recompute every stage")
    return parser


def _add_pipeline_args(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--config", default=None, help="pipeline YAML (default: the embedded default of --task)")
    p.add_argument("--task", default=None, choices=PIPELINE_TASKS,
                   help="without --config: text-classification (the embedded MiniLM, the default) or causal-lm "
                        "(the embedded SmolLM2-135M on the built-in speeches); with it, must match its task")
    p.add_argument("--out", default=default_out, help="output folder (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty folder that no run wrote")
    p.add_argument("--jobs", type=int, choices=(1, 2), default=None,
                   help="2: export and optimise the baseline in a second process beside the candidate (80 s "
                        "saved for SmolLM2 on 2 cores; the memory of both at once); 1: one stage at a time "
                        "(default: 2 on a machine with two or more cores)")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def _add_pickle_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a folder whose weights are only pytorch_model.bin (torch.load, weights_only=True)")


def _add_measure_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("measurement")
    g.add_argument("--device", default=default(ValidateConfig, "device"), choices=RUN_DEVICES)
    g.add_argument("--threads", type=int, default=default(ValidateConfig, "threads"),
                   help="intra-op threads per session (default: %(default)s)")
    g.add_argument("--batch-sizes", default=_csv(default(ValidateConfig, "batch_sizes")),
                   help="latency grid (default: %(default)s)")
    g.add_argument("--seq-lens", default=_csv(default(ValidateConfig, "seq_lens")),
                   help="latency grid, at most the models' positions (default: %(default)s)")
    g.add_argument("--rounds", type=int, default=default(ValidateConfig, "rounds"),
                   help="interleaved rounds per grid cell (default: %(default)s)")
    g.add_argument("--warmup", type=int, default=default(ValidateConfig, "warmup"))
    g = p.add_argument_group("generation (causal LMs; replaces the batch x sequence grid)")
    g.add_argument("--prompt-len", type=int, default=default(ValidateConfig, "prompt_len"),
                   help="prompt tokens per row (default: %(default)s)")
    g.add_argument("--new-tokens", type=int, default=default(ValidateConfig, "new_tokens"),
                   help="decode steps timed (default: %(default)s)")
    g.add_argument("--gen-batch-sizes", default=_csv(default(ValidateConfig, "gen_batch_sizes")),
                   help="batch sizes of the timed generation (default: %(default)s)")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="capture each decode step in a CUDA graph and replay it, on one shared max-length KV cache "
                        "(--device cuda; graphs optimised with --device cuda --fp16). Default: on for CUDA where "
                        "every graph allows it")


def _int_list(flag: str, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} {value!r} must be comma-separated integers, e.g. 1,8,32") from None


def _validate_config(a: argparse.Namespace, **extra: Any) -> ValidateConfig:
    return ValidateConfig(device=a.device, threads=a.threads, batch_sizes=_int_list("--batch-sizes", a.batch_sizes),
                          seq_lens=_int_list("--seq-lens", a.seq_lens), rounds=a.rounds, warmup=a.warmup,
                          prompt_len=a.prompt_len, new_tokens=a.new_tokens,
                          gen_batch_sizes=_int_list("--gen-batch-sizes", a.gen_batch_sizes),
                          cuda_graph=a.cuda_graph, **extra)


def _progress(a: argparse.Namespace) -> bool | None:
    return False if a.quiet else None


def _pipeline_config(a: argparse.Namespace) -> PipelineConfig:
    if not a.config:
        return PipelineConfig.for_task(a.task or default(PipelineConfig, "task"))
    cfg = PipelineConfig.from_yaml(a.config)
    if a.task is not None and a.task != cfg.task:
        raise ConfigError(f"--task {a.task} differs from task: {cfg.task} in {a.config}; drop --task or edit the file")
    return cfg


def _cmd_finetune(a: argparse.Namespace) -> int:
    cfg = FinetuneConfig(epochs=a.epochs, max_steps=a.max_steps, learning_rate=a.learning_rate,
                         weight_decay=a.weight_decay, warmup_ratio=a.warmup_ratio, batch_size=a.batch_size,
                         eval_every_epoch=not a.no_eval, eval_steps=a.eval_steps, trainable=a.trainable,
                         seed=a.seed)
    data = _data_config(a)
    from .pipeline import run_finetune

    outcome = run_finetune(a.model, data, cfg, a.out, overwrite=a.overwrite, allow_pickle=a.allow_pickle,
                           progress=_progress(a))
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
    return EXIT_OK


def _calibration_cache(value: str | None) -> str | None:
    if value is None:
        from .modeling import cache_home

        return str(cache_home() / "calibration")
    return None if value.lower() == "none" else os.path.expanduser(value)


def _cmd_compress(a: argparse.Namespace) -> int:
    comp = CompressionConfig(
        method=a.method, fisher_axis=a.fisher_axis, ratio=a.ratio, rank=a.rank, allocation=a.allocation,
        target_modules=_targets(a.targets), exclude_modules=None if a.exclude is None else _targets(a.exclude),
        rank_overrides=_overrides(a.rank_override), qkv=a.qkv, rank_multiple=a.rank_multiple,
        asvd_alpha=a.asvd_alpha, whitening_damp=a.whitening_damp, fisher_power=a.fisher_power,
        min_rank_fraction=a.min_rank_fraction, refit=a.refit,
    )
    data = _data_config(a)
    calibration = CalibrationConfig(num_samples=a.calibration_samples, estimator=a.fisher_estimator,
                                    batch_size=a.calibration_batch_size,
                                    cache_dir=_calibration_cache(a.calibration_cache), sequential=a.sequential,
                                    offload_dir=None if a.offload_dir is None else os.path.expanduser(a.offload_dir))
    from .pipeline import run_compress

    outcome = run_compress(a.model, data, calibration, comp, a.out, evaluate_model=not a.no_eval,
                           overwrite=a.overwrite, allow_pickle=a.allow_pickle, progress=_progress(a))
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
    return EXIT_OK


def _cmd_export(a: argparse.Namespace) -> int:
    cfg = ExportConfig(task=a.task, opset=a.opset, external_data=a.external_data, atol=a.atol)
    from .exporters import export_onnx

    result = export_onnx(a.model, cfg, a.out, overwrite=a.overwrite, allow_pickle=a.allow_pickle)
    kind = "compressed" if result.compressed else "dense"
    print(f"exported {kind} model for {result.task} (opset {result.opset}) in {result.seconds:.1f} s; parity vs "
          f"PyTorch: max |diff| {result.parity['max_abs_diff']:.2e} <= {cfg.atol:g} on "
          + ", ".join(f"{r['batch']}x{r['sequence']}" for r in result.parity["shapes"]) + _decoder_note(result.parity))
    print(f"wrote {result.onnx_path}")
    return EXIT_OK


def _decoder_note(parity: dict[str, Any]) -> str:
    """What a decoder's parity adds: decode steps and greedy generation."""
    greedy = parity.get("greedy")
    if greedy is None:
        return ""
    same = "identical" if greedy["identical"] else "first differing at " + ", ".join(
        "-" if f is None else str(f + 1) for f in greedy["first_difference"])
    return (f" (prefill, then {parity['decode_steps']} decode steps on the returned cache); greedy "
            f"{greedy['new_tokens']} tokens {same} on {greedy['prompts']} prompts")


def _cmd_optimize(a: argparse.Namespace) -> int:
    cfg = OptimizeConfig(device=a.device, level=a.level, fp16=a.fp16, quantize=a.quantize, block_size=a.block_size,
                         symmetric=a.symmetric, accuracy_level=a.accuracy_level, per_channel=a.per_channel,
                         quantize_lm_head=a.quantize_lm_head, factor_split=a.factor_split, quantizer=a.quantizer,
                         atol=a.atol,
                         allow_fusion_loss=a.allow_fusion_loss, fuse_attention=a.fuse_attention,
                         pack_matmuls=a.pack_matmuls, genai=a.genai)
    from .exporters import optimize_onnx

    result = optimize_onnx(a.onnx, cfg, a.out, overwrite=a.overwrite)
    fused = ", ".join(f"{k} {v}" for k, v in result.fusions.items() if v)
    print(f"optimised for {cfg.device} ({cfg.level}{', fp16' if cfg.fp16 else ''}"
          f"{', ' + cfg.quantize if cfg.quantize else ''}) in {result.seconds:.1f} s; fused: {fused or 'none'}; "
          f"low-rank layers kept: {result.low_rank_layers}"
          + (f"; MatMuls joined with another reading the same tensor: {result.packed_matmuls}"
             if result.packed_matmuls else ""))
    if result.quantization is not None:
        print(_quantization_line(result.quantization))
    if result.reference_fusions is not None:
        status = "all kept" if result.fusions_complete else "FEWER than the dense reference (allowed)"
        print(f"fusions vs dense-structured reference: {status} ({result.reference_fusions})")
    if result.parity is not None:
        shapes = result.parity["shapes"]
        floors = ""
        if "sqnr_db" in shapes[0]:  # a quantised decoder: the floors it is held to
            floors = (f"; logits signal-to-noise >= {min(r['sqnr_db'] for r in shapes):.1f} dB, top-1 agreement "
                      f">= {min(r['agreement'] for r in shapes):.3f}")
        print(f"parity vs unoptimised graph: max |diff| {result.parity['max_abs_diff']:.2e}{floors}"
              + _decoder_note(result.parity))
    else:
        print("parity not run: CUDA graphs are checked on a CUDA machine")
    if result.genai_config is not None:
        print(f"onnxruntime-genai: {result.genai_config.name} written (onnxruntime_genai.Model(folder) serves it)")
    print(f"wrote {result.onnx_path}")
    return EXIT_OK


def _quantization_line(q: Any) -> str:
    scheme = q.scheme + (f", {q.quantizer}, block {q.block_size}{', symmetric' if q.symmetric else ''}, accuracy level "
                         f"{q.accuracy_level}" if q.block_size else
                         f"{', per channel' if q.per_channel else ''}")
    sizes = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in q.weight_bytes.items() if v)
    head = "" if q.head is None else f"; head {'quantised' if q.head_quantized else 'kept float'}"
    return (f"quantised ({scheme}): {q.quantized} of {q.matmuls} MatMuls, {q.factors_quantized} of {q.factors} "
            f"low-rank factors ({q.factor_split} split){head}; weights read: {sizes}")


def _cmd_validate(a: argparse.Namespace) -> int:
    cfg = _validate_config(a, latency=not a.no_latency, memory=not a.no_memory, eval_batch_size=a.eval_batch_size,
                           parity_windows=a.parity_windows)
    from .validators.decoder import is_causal_lm_folder

    drop = a.max_accuracy_drop
    if drop is None and not is_causal_lm_folder(a.baseline):
        drop = default(GateConfig, "max_accuracy_drop")
    gate = GateConfig(max_accuracy_drop=drop, min_agreement=a.min_agreement,
                      max_latency_ratio=a.max_latency_ratio, max_memory_ratio=a.max_memory_ratio,
                      max_logit_diff=a.max_logit_diff, max_perplexity_ratio=a.max_perplexity_ratio,
                      max_decode_latency_ratio=a.max_decode_latency_ratio,
                      max_prefill_latency_ratio=a.max_prefill_latency_ratio)
    data = _data_config(a, batch_size=default(DataConfig, "batch_size"))
    from .validators.validate import validate

    result = validate(a.baseline, a.candidate, data, cfg, gate, a.out, overwrite=a.overwrite,
                      progress=_progress(a), raise_on_failure=False,
                      pytorch_models={"baseline": a.baseline_model, "candidate": a.candidate_model})
    return _print_validation(result)


def _print_validation(result: Any) -> int:
    """Print the gate's checks; the exit code is 1 exactly when a check failed."""
    from .errors import EXIT_GATE_FAILED
    from .validators.decoder import CAUSAL_LM_TASK
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
    for note in result.report.get("notes") or []:
        print(f"  note: {note}")
    if result.passed:
        print(f"gate passed; report: {result.out_dir / 'report.md'}")
        return EXIT_OK
    print(f"{PROG}: {gate_failure_message(result.checks, result.out_dir)}", file=sys.stderr)
    return EXIT_GATE_FAILED


def _cmd_bench(a: argparse.Namespace) -> int:
    cfg = _validate_config(a)
    names = {}
    for path in a.model:
        name = os.path.basename(os.path.normpath(path)) or path
        while name in names:
            name += "'"
        names[name] = path
    import json

    from .exporters.runtime import ONNX_FILE, onnx_config, require_provider
    from .modeling import check_sequence_lengths
    from .outputs import atomic_output_dir, check_output_dir
    from .validators.latency import measure_latency
    from .validators.report import latency_table

    require_provider(cfg.device)
    for path in names.values():  # before minutes of measuring, not after
        if not (Path(path) / ONNX_FILE).is_file():
            raise ConfigError(f"{path} has no {ONNX_FILE}; give folders written by 'fwsvd-deploy export/optimize'")
    decoders = _bench_decoders(a.model, cfg)
    if not decoders and cfg.cuda_graph:
        raise ConfigError("--cuda-graph captures a causal language model's decode steps; the encoder grid runs "
                          "without it: drop --cuda-graph")
    if not decoders:
        for path in names.values():
            check_sequence_lengths(onnx_config(Path(path)), path, {"--seq-lens": cfg.seq_lens})
    if a.out:
        check_output_dir(a.out, a.overwrite, inputs=names.values())
    if decoders:
        from .validators.generation import generation_table, measure_generation

        result = measure_generation(names, device=cfg.device, batch_sizes=cfg.gen_batch_sizes,
                                    prompt_len=cfg.prompt_len, new_tokens=cfg.new_tokens, threads=cfg.threads,
                                    warmup=cfg.warmup, rounds=cfg.rounds, progress=_progress(a),
                                    cuda_graph=cfg.cuda_graph)
        lines = generation_table(result)
    else:
        result = measure_latency(names, device=cfg.device, batch_sizes=cfg.batch_sizes, seq_lens=cfg.seq_lens,
                                 threads=cfg.threads, warmup=cfg.warmup, rounds=cfg.rounds, progress=_progress(a))
        lines = latency_table(result)
    table = "\n".join(lines) + "\n"
    print(table, end="")
    if a.out:
        with atomic_output_dir(a.out, overwrite=a.overwrite, inputs=names.values()) as tmp:
            (tmp / "bench.json").write_text(json.dumps(result, indent=2))
            (tmp / "bench.md").write_text(table)
        print(f"wrote {a.out}")
    return EXIT_OK


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
    cfg = _pipeline_config(a)
    if a.dry_run:
        print(cfg.to_yaml(), end="")
        return EXIT_OK
    from .pipeline import run_pipeline

    result = run_pipeline(cfg, a.out, force=a.force, overwrite=a.overwrite, progress=_progress(a), jobs=a.jobs)
    cached = sum(s.cached for s in result.stages)
    print(f"pipeline finished in {result.seconds:.1f} s ({cached} of {len(result.stages)} stages from cache)")
    code = _print_validation(result.validation)
    print(f"configuration: {result.out_dir / 'pipeline.yaml'}")
    return code


def _cmd_search(a: argparse.Namespace) -> int:
    cfg = _pipeline_config(a)
    search = SearchConfig(low=a.low, high=a.high, steps=a.steps)
    if a.max_accuracy_drop is not None:
        cfg = dataclasses.replace(cfg, gate=dataclasses.replace(cfg.gate, max_accuracy_drop=a.max_accuracy_drop))
    if a.max_perplexity_ratio is not None:
        cfg = dataclasses.replace(cfg, gate=dataclasses.replace(cfg.gate, max_perplexity_ratio=a.max_perplexity_ratio))
    from .errors import EXIT_GATE_FAILED
    from .pipeline import search_ratio

    result = search_ratio(cfg, a.out, search, force=a.force, overwrite=a.overwrite, progress=_progress(a),
                          jobs=a.jobs)
    for t in result.trials:
        print(f"  ratio {t.ratio}: {t.metric} {t.metric_candidate:.4f} (baseline {t.metric_baseline:.4f}) "
              f"{'pass' if t.passed else 'fail: ' + ', '.join(t.failed_checks)}")
    print(f"search finished in {result.seconds:.1f} s; summary: {result.out_dir / 'search-summary' / 'search.md'}")
    if result.best_ratio is None:
        print(f"{PROG}: no kept fraction in [{search.low}, {search.high}] passes the gate", file=sys.stderr)
        return EXIT_GATE_FAILED
    print(f"best kept fraction {result.best_ratio}; candidate copied to {result.best_dir}")
    return EXIT_OK


_COMMANDS: dict[str, Any] = {
    "finetune": _cmd_finetune, "compress": _cmd_compress, "export": _cmd_export, "optimize": _cmd_optimize,
    "validate": _cmd_validate, "bench": _cmd_bench, "run": _cmd_run, "search": _cmd_search,
}


def error_line(message: str) -> str:
    """The one line an error prints: the program, ``error:``, and the first line of the message."""
    return f"{PROG}: error: {message}"


class _StderrLines(logging.Handler):
    """One line per record on the current ``sys.stderr``: ``fwsvd-deploy: warning: ...``."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{PROG}: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def _configure_logging() -> None:
    """Warnings of the package (rows dropped, caches recomputed, losses allowed) as one line each on stderr."""
    logger = logging.getLogger("fwsvd_deploy")
    if not any(isinstance(h, _StderrLines) for h in logger.handlers):
        logger.addHandler(_StderrLines())
    logger.setLevel(logging.WARNING)


def _log_folder() -> Path:
    try:
        from .modeling import cache_home

        return cache_home() / "logs"
    except Exception:  # the environment itself is broken (e.g. torch cannot load): the temporary folder
        import tempfile

        return Path(tempfile.gettempdir())


def _write_traceback(argv: Sequence[str]) -> Path | None:
    """Write the current exception's traceback to a log file; ``None`` when no file can be written."""
    name = f"{PROG}-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    text = f"{PROG} {' '.join(argv)}\n\n{traceback.format_exc()}"
    for folder in (_log_folder(), Path(os.path.expanduser("~"))):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(text)
            return path
        except OSError:
            continue
    return None


def _watch_interrupts() -> tuple[Callable[[], bool], Callable[[], None]]:
    """Record each Ctrl-C before raising ``KeyboardInterrupt`` as usual.

    A ``KeyboardInterrupt`` that lands in library code can be swallowed (one raised inside ``__del__`` or a callback
    is only printed) or wrapped in another exception; the record still ends the command as interrupted. Where SIGINT
    is ignored or handled by someone else, or off the main thread, nothing changes. Returns ``(seen, restore)``.
    """
    seen: list[int] = []
    try:
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return (lambda: False), (lambda: None)

        def record(signum: int, frame: Any) -> None:
            seen.append(signum)
            signal.default_int_handler(signum, frame)

        signal.signal(signal.SIGINT, record)
    except ValueError:  # not the main thread
        return (lambda: False), (lambda: None)
    return (lambda: bool(seen)), (lambda: signal.signal(signal.SIGINT, signal.default_int_handler))


def _name_the_flag(message: str, argv: Sequence[str]) -> str:
    """``rank_multiple=0 must be >= 1`` -> ``--rank-multiple 0 must be >= 1`` when that flag is on the command line.

    Configuration errors name the setting as a configuration file spells it; a value that came from a flag is
    named by the flag the user typed. A setting from a YAML file, or one whose flag has another name, is left as is.
    """
    match = re.match(r"([a-z][a-z0-9_]*)=", message)
    if match is None:
        return message
    flag = "--" + match.group(1).replace("_", "-")
    if not any(arg == flag or arg.startswith(flag + "=") for arg in argv):
        return message
    return f"{flag} {message[match.end():]}"


def _interrupted() -> int:
    print(f"{PROG}: interrupted; finished outputs are intact, unfinished ones were removed", file=sys.stderr)
    return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code (argparse exits 2 itself on bad usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    interrupted, restore = _watch_interrupts()
    try:
        args = build_parser().parse_args(argv)
        _configure_logging()
        code = int(_COMMANDS[args.command](args))
        return _interrupted() if interrupted() else code
    except FwsvdError as exc:
        if interrupted():
            return _interrupted()
        if debug:
            traceback.print_exc()
        message = first_line(exc)
        print(error_line(_name_the_flag(message, argv) if isinstance(exc, ConfigError) else message), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as exc:
        if interrupted():
            return _interrupted()
        log = _write_traceback(argv)
        where = f"full traceback in {log}" if log is not None else "no log file could be written"
        print(f"{PROG}: internal error: {type(exc).__name__}: {first_line(exc)} ({where}; rerun with --debug to "
              "print it)", file=sys.stderr)
        if debug:
            traceback.print_exc()
        return EXIT_INTERNAL
    finally:
        restore()


def entry_point() -> None:
    """The console script: :func:`main`, then exit with its code.

    After an interrupt the process leaves through ``os._exit`` once the streams are flushed: a Ctrl-C that reached a
    library's start-up code can leave the interpreter marked as killed by SIGINT, which would replace exit code 130
    with death by signal at shutdown. Every output was already finished or removed when :func:`main` returned.
    """
    code = main()
    if code == EXIT_INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
