"""Frozen, validated configuration for each stage.

Every dataclass checks its values in ``__post_init__`` and raises :class:`ConfigError` naming the
field, the value and what is allowed. ``from_dict`` rejects unknown keys instead of dropping them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError, first_line

T = TypeVar("T", bound="_Config")

METHODS = ("fwsvd", "svd", "asvd", "svd-llm", "fisher-whitened")
DEFAULT_RATIO = 0.5
# Measured best without fine-tuning, with loss allocation, on the real MiniLM (Rotten Tomatoes, keep 0.5 and 0.3) and
# SmolLM2-135M (the convention speeches, keep 0.8 and 0.6): README, benchmarks/accuracy.py and benchmarks/lm.py.
DEFAULT_METHOD = "fisher-whitened"
FISHER_AXES = ("both", "output", "input")
FISHER_ESTIMATORS = ("per_example", "batch_mean")
REFITS = ("none", "up", "alternate")
QKV_MODES = ("separate", "joint")
ALLOCATIONS = ("uniform", "fisher", "loss")
GREEDY_ALLOCATIONS = ("fisher", "loss")  # one global greedy over all layers' directions
TRAINABLE = ("all", "factors")
# what each method reads from the calibration pass
METHOD_STATISTICS = {"svd": (), "fwsvd": ("fisher",), "asvd": ("inputs",), "svd-llm": ("inputs",),
                     "fisher-whitened": ("fisher", "inputs")}


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def _check_int(name: str, value: Any, minimum: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}={value!r} must be an integer")
    if value < minimum:
        raise ConfigError(f"{name}={value!r} must be >= {minimum}")


def _check_float(name: str, value: Any, low: float, high: float, *, low_open: bool, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be a finite number")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{name}={value!r} must be in {bracket}{low}, {high}]")


class _Config:
    """Shared loading and dumping for the stage configs."""

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any] | None) -> T:
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join(unknown)} for {cls.__name__}; allowed: {', '.join(sorted(names))}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class DataConfig(_Config):
    """Where task data comes from and how it is tokenised.

    Attributes:
        dataset: ``rotten_tomatoes`` (built in, offline), a local CSV/TSV/JSON/JSONL/Parquet file, or a
            hub dataset ``NAME[:CONFIG]``.
        train_split / eval_split: split names. Local files have one split, ``train``; an evaluation split
            is carved out of it with ``eval_fraction`` unless ``eval_dataset`` names another file.
        eval_dataset: optional second file or hub dataset used for evaluation.
        text_column / text_pair_column / label_column: column names.
        max_length: tokenizer truncation length.
        batch_size: examples per batch for inference passes.
        max_train_samples / max_eval_samples: caps (a seeded random subset); ``None`` keeps all.
        eval_fraction: share held out for evaluation from a single-split dataset.
        seed: seed for subsets and splits.
    """

    dataset: str = "rotten_tomatoes"
    train_split: str = "train"
    eval_split: str = "validation"
    eval_dataset: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    max_length: int = 128
    batch_size: int = 32
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    eval_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise ConfigError(f"dataset={self.dataset!r} must be a non-empty string")
        for name in ("text_column", "label_column", "train_split", "eval_split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{name}={value!r} must be a non-empty string")
        _check_int("max_length", self.max_length, 2)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("max_train_samples", self.max_train_samples, 1, optional=True)
        _check_int("max_eval_samples", self.max_eval_samples, 1, optional=True)
        _check_float("eval_fraction", self.eval_fraction, 0.0, 0.9, low_open=True)
        _check_int("seed", self.seed, 0)


@dataclass(frozen=True)
class CalibrationConfig(_Config):
    """The calibration pass that collects what the compression method needs (Fisher, input statistics).

    Attributes:
        num_samples: calibration examples: labelled examples for a classifier, token windows of ``max_length``
            for a causal LM; ``None`` takes 512 examples or 64 windows.
        estimator: ``per_example`` sums the squared gradient of each example (the empirical Fisher);
            ``batch_mean`` sums squared batch-mean gradients, a cheaper and different estimator.
        batch_size: examples (or windows) per forward/backward pass.
        cache_dir: folder for cached statistics (safetensors), keyed by model, data and settings.
        sequential: compress the transformer blocks in order, each block's input statistics collected on what the
            blocks already compressed give it (:mod:`fwsvd_deploy.compression.sequential`); the ranks and the
            Fisher row weights still come from one pass over the dense model.
        offload_dir: folder for the one block's calibration activations that sequential calibration holds at a
            time (a temporary subfolder, removed at the end); ``None`` keeps them in memory.
    """

    num_samples: int | None = None
    estimator: str = "per_example"
    batch_size: int = 16
    cache_dir: str | None = None
    sequential: bool = False
    offload_dir: str | None = None

    def __post_init__(self) -> None:
        _check_int("num_samples", self.num_samples, 1, optional=True)
        _check_choice("estimator", self.estimator, FISHER_ESTIMATORS)
        _check_int("batch_size", self.batch_size, 1)
        if not isinstance(self.sequential, bool):
            raise ConfigError(f"sequential={self.sequential!r} must be true or false")
        if self.offload_dir is not None and not self.sequential:
            raise ConfigError(f"offload_dir={self.offload_dir!r} holds sequential calibration's activations; "
                              "set sequential: true, or drop offload_dir")


FisherConfig = CalibrationConfig  # the section's earlier name


@dataclass(frozen=True)
class CompressionConfig(_Config):
    """What to factorise and how far.

    Attributes:
        method: how each weight ``W`` is factorised (every method gives ``W ~= up @ down``):
            ``svd`` plain truncated SVD; ``fwsvd`` Fisher-weighted SVD (Hsu et al.) on ``fisher_axis``;
            ``asvd`` activation-aware SVD, the input columns scaled by ``mean|x|^asvd_alpha``; ``svd-llm``
            truncation-aware whitening: the SVD of ``W L`` with ``L L^T`` the (damped) second moment of the layer's
            inputs, so each discarded singular value squared is exactly the output error it adds;
            ``fisher-whitened`` the SVD of ``diag(r) W L``, the whitened weight with its output rows weighted by
            the Fisher row importance ``a`` tempered to ``r = (a / mean(a)) ** fisher_power``.
        fisher_axis: how Fisher importance is shared in ``fwsvd``: ``both`` (separable row x column
            weight), ``output`` (per output row) or ``input`` (per input column, the paper's literal axis).
        ratio: fraction of the targeted weight parameters kept, one global budget; ``0.5`` halves them.
        rank: a fixed rank for every targeted layer instead of ``ratio``.
        allocation: ``None`` (the default) takes the allocation measured best for the method: ``loss`` for
            ``fisher-whitened`` with a ``ratio``, ``uniform`` otherwise.
            ``uniform`` (the same kept fraction per layer), ``fisher`` (``fwsvd`` only: greedy over the
            Fisher-weighted singular values of all layers, most error removed per parameter first, from rank 1)
            or ``loss`` (every method: one greedy over all layers' singular directions by the loss each removes
            per parameter in the method's own metric, no layer below ``min_rank_fraction`` of its uniform rank).
        target_modules: ``"all-linear"`` (every Linear/Conv1D inside the repeated transformer blocks),
            a list of name suffixes, or a regular expression matched against the full module name.
        exclude_modules: names (suffix list) or a regex removed from the targets.
        rank_overrides: module-name suffix -> rank, applied after allocation (taken as given).
        rank_multiple: make every allocated rank a multiple of this (1: no rounding), within the same budget
            (see :func:`~fwsvd_deploy.compression.ranks.uniform_ranks`). GEMM kernels tile by the SIMD width
            (16 floats with AVX-512) or the tensor-core tile (8 or 16), so a rank off those sizes wastes a
            partial tile.
        eps: importance floor, relative to the largest row/column importance of a layer.
        qkv: ``separate`` factorises an attention block's query, key and value projections one by one (the
            paper); ``joint`` factorises the three stacked (``[Wq; Wk; Wv] ~= [Uq; Uk; Uv] D``), sharing one
            down-projection, at the same parameter budget. ONNX Runtime then runs an encoder block as its fused
            ``Attention`` operator on the reduced input, which is faster on CPU than the ``MultiHeadAttention``
            that separate factors need.
        asvd_alpha: the exponent of ``asvd``'s activation scaling, in ``(0, 1]``.
        whitening_damp: damping of the whitened methods, added to the input second moment's diagonal as a
            fraction of its mean diagonal (so a rank-deficient second moment still factorises).
        fisher_power: ``fisher-whitened``'s tempering of the Fisher row weights (1: ``a`` itself; 0: plain
            whitening).
        min_rank_fraction: ``loss`` allocation's floor, as a fraction of each layer's uniform rank.
        refit: after ``down`` is chosen, ``up`` solved in closed form by least squares against the dense layer's
            output on the calibration inputs (``up``), then ``down`` given ``up`` and ``up`` again
            (``alternate``); ``none`` keeps the method's factors. Needs input statistics (collected for any
            method when set). For the whitened methods without sequential calibration the method's ``up`` is
            already that least-squares solution, so the refit changes them only under ``sequential``.
    """

    method: str = DEFAULT_METHOD
    fisher_axis: str = "both"
    ratio: float | None = None
    rank: int | None = None
    allocation: str | None = None
    target_modules: str | tuple[str, ...] = "all-linear"
    exclude_modules: str | tuple[str, ...] | None = None
    rank_overrides: Mapping[str, int] = field(default_factory=dict)
    eps: float = 1e-6
    qkv: str = "separate"
    rank_multiple: int = 1
    asvd_alpha: float = 0.5
    whitening_damp: float = 1e-4
    fisher_power: float = 0.5
    min_rank_fraction: float = 0.25
    refit: str = "none"

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("refit", self.refit, REFITS)
        _check_choice("qkv", self.qkv, QKV_MODES)
        if self.allocation is None:
            best = "loss" if self.method == "fisher-whitened" and self.rank is None else "uniform"
            object.__setattr__(self, "allocation", best)
        _check_choice("fisher_axis", self.fisher_axis, FISHER_AXES)
        _check_choice("allocation", self.allocation, ALLOCATIONS)
        if self.rank is not None and self.ratio is not None:
            raise ConfigError(f"give either rank={self.rank!r} or ratio={self.ratio!r}, not both")
        if self.rank is None and self.ratio is None:
            object.__setattr__(self, "ratio", DEFAULT_RATIO)
        _check_int("rank", self.rank, 1, optional=True)
        _check_int("rank_multiple", self.rank_multiple, 1)
        if self.rank is not None and self.rank % self.rank_multiple:
            raise ConfigError(f"rank={self.rank} is not a multiple of rank_multiple={self.rank_multiple}; "
                              f"give a rank that is, or leave rank_multiple at 1")
        _check_float("ratio", self.ratio, 0.0, 1.0, low_open=True, optional=True)
        if self.allocation == "fisher" and self.method != "fwsvd":
            raise ConfigError("allocation='fisher' ranks layers by Fisher-weighted error; it needs method='fwsvd' "
                              "(allocation='loss' works with every method)")
        if self.allocation != "uniform" and self.rank is not None:
            raise ConfigError(f"allocation={self.allocation!r} spends a global budget; give ratio, not rank")
        object.__setattr__(self, "target_modules", _patterns("target_modules", self.target_modules))
        if self.exclude_modules is not None:
            object.__setattr__(self, "exclude_modules", _patterns("exclude_modules", self.exclude_modules))
        if not isinstance(self.rank_overrides, Mapping):
            raise ConfigError(f"rank_overrides={self.rank_overrides!r} must be a mapping of module name to rank")
        for name, rank in self.rank_overrides.items():
            _check_int(f"rank_overrides[{name!r}]", rank, 1)
        object.__setattr__(self, "rank_overrides", dict(self.rank_overrides))
        if self.allocation in GREEDY_ALLOCATIONS and self.ratio == 1.0 and not self.rank_overrides:
            raise ConfigError(f"ratio=1.0 with allocation {self.allocation!r} buys every layer's exact weight, so "
                              "nothing would be compressed; choose a ratio below 1")
        _check_float("eps", self.eps, 0.0, 1.0, low_open=True)
        _check_float("asvd_alpha", self.asvd_alpha, 0.0, 1.0, low_open=True)
        _check_float("whitening_damp", self.whitening_damp, 0.0, 1.0, low_open=True)
        _check_float("fisher_power", self.fisher_power, 0.0, 1.0, low_open=False)
        _check_float("min_rank_fraction", self.min_rank_fraction, 0.0, 1.0, low_open=False)

    @property
    def statistics(self) -> tuple[str, ...]:
        """What the calibration pass must collect for this method (``fisher``, ``inputs``); a refit needs inputs."""
        kinds = METHOD_STATISTICS[self.method]
        if self.refit != "none" and "inputs" not in kinds:
            kinds = (*kinds, "inputs")
        return kinds

    @property
    def needs_fisher(self) -> bool:
        return "fisher" in self.statistics

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("target_modules", "exclude_modules"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        return out


def _patterns(name: str, value: Any) -> str | tuple[str, ...]:
    if isinstance(value, str):
        if not value:
            raise ConfigError(f"{name} must not be empty")
        if value != "all-linear":
            try:
                re.compile(value)
            except re.error as exc:
                raise ConfigError(f"{name}={value!r} is not a valid regular expression ({exc}); give a regex, "
                                  "a list of module names, or 'all-linear'") from None
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise ConfigError(f"{name}={value!r} must be a regex string or a non-empty list of module names")


@dataclass(frozen=True)
class FinetuneConfig(_Config):
    """Fine-tuning: a classifier on its labels, or a causal LM on token windows with the next-token loss; also the
    recovery training of a compressed model.

    Attributes:
        epochs: passes over the training split (ignored when ``max_steps`` is set).
        max_steps: optimiser steps in total, overriding ``epochs``.
        learning_rate / weight_decay / warmup_ratio / max_grad_norm: AdamW with linear warm-up and decay.
        batch_size: training batch size (examples, or windows for a causal LM).
        eval_every_epoch: evaluate while training and keep the best checkpoint.
        eval_steps: causal LMs: evaluate every this many steps and at the end (``None``: after each epoch).
        trainable: ``all`` parameters, or ``factors``: only the factorised layers of a compressed model (their
            down- and up-projections), everything else frozen.
        seed: seed for shuffling, dropout and a fresh head's initialisation.
    """

    epochs: int = 3
    max_steps: int | None = None
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    batch_size: int = 32
    eval_every_epoch: bool = True
    eval_steps: int | None = None
    trainable: str = "all"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("epochs", self.epochs, 1)
        _check_int("eval_steps", self.eval_steps, 1, optional=True)
        _check_choice("trainable", self.trainable, TRAINABLE)
        _check_int("max_steps", self.max_steps, 1, optional=True)
        _check_float("learning_rate", self.learning_rate, 0.0, 1.0, low_open=True)
        _check_float("weight_decay", self.weight_decay, 0.0, 1.0, low_open=False)
        _check_float("warmup_ratio", self.warmup_ratio, 0.0, 1.0, low_open=False)
        _check_float("max_grad_norm", self.max_grad_norm, 0.0, 1e6, low_open=True)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("seed", self.seed, 0)
        if not isinstance(self.eval_every_epoch, bool):
            raise ConfigError(f"eval_every_epoch={self.eval_every_epoch!r} must be true or false")


EXPORT_TASKS = ("text-classification", "token-classification", "question-answering", "feature-extraction",
                "text-generation", "text-generation-with-past")
MIN_OPSET = 14  # scaled-dot-product attention and the exporters' BERT configs need 14
DEVICES = ("cpu", "cuda")
QUANTIZATIONS = ("int8", "int8-weight", "int4")
NBITS_QUANTIZATIONS = ("int8-weight", "int4")  # ONNX Runtime's weight-only, block-wise MatMulNBits
FACTOR_SPLITS = ("balanced", "svd", "exported")
NBITS_QUANTIZERS = ("rtn", "hqq")  # ONNX Runtime's MatMulNBits quantisers that need no calibration data
PACKINGS = ("none", "factors", "all")  # OptimizeConfig.pack_matmuls
RUN_DEVICES = ("cpu", "cuda", "tensorrt")  # where graphs run; graphs are built for cpu or cuda
LEVELS = ("O1", "O2", "O3")


def _check_shapes(name: str, shapes: Any) -> tuple[tuple[int, int], ...]:
    try:
        out = tuple((int(b), int(s)) for b, s in shapes)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}={shapes!r} must be a list of [batch, sequence] pairs") from exc
    if not out or any(b < 1 or s < 2 for b, s in out):
        raise ConfigError(f"{name}={shapes!r} needs batch >= 1 and sequence >= 2 in every pair")
    return out


@dataclass(frozen=True)
class ExportConfig(_Config):
    """PyTorch -> ONNX.

    Attributes:
        task: text-classification, token-classification, question-answering or feature-extraction (encoders);
            text-generation-with-past (with the KV cache) or text-generation (causal language models).
        opset: ONNX opset; ``None`` takes the exporter's default for the architecture (at least 14).
        external_data: store weights beside ``model.onnx`` (automatic above the 2 GB protobuf limit).
        atol: largest absolute difference allowed between ONNX and PyTorch outputs.
        validate_shapes: (batch, sequence) pairs for the parity check, other than the export's (2, 16).
    """

    task: str = "text-classification"
    opset: int | None = None
    external_data: bool = False
    atol: float = 1e-4
    validate_shapes: tuple[tuple[int, int], ...] = ((3, 23), (1, 41))

    def __post_init__(self) -> None:
        _check_choice("task", self.task, EXPORT_TASKS)
        if self.opset is not None:
            _check_int("opset", self.opset, 1)
            if self.opset < MIN_OPSET:
                raise ConfigError(f"opset={self.opset} is too old for these operators; use {MIN_OPSET} or newer")
        if not isinstance(self.external_data, bool):
            raise ConfigError(f"external_data={self.external_data!r} must be true or false")
        _check_float("atol", self.atol, 0.0, 1e3, low_open=True)
        object.__setattr__(self, "validate_shapes", _check_shapes("validate_shapes", self.validate_shapes))


@dataclass(frozen=True)
class OptimizeConfig(_Config):
    """ONNX Runtime transformer optimisation with low-rank-aware fusion.

    Attributes:
        device: execution provider the graph is built for: ``cpu`` or ``cuda``.
        level: ``O1`` (ONNX Runtime's basic graph rewrites), ``O2`` (+ transformer fusions: attention,
            embedding and skip layer norms, bias + GELU), ``O3`` (+ GELU approximation, FastGelu).
        fp16: float16 weights with float32 inputs/outputs (CUDA only).
        quantize: weight quantisation after the fusions: ``int8`` (ONNX Runtime's dynamic int8, MatMulInteger:
            int8 weights and activations; CPU only), ``int8-weight`` (8-bit weight-only ``MatMulNBits``, block-wise,
            float activations; CPU and CUDA: what decoders, whose activations have outliers that per-tensor int8
            loses, quantise to 8 bits with) or ``int4`` (4-bit weight-only ``MatMulNBits``, block-wise; CPU and
            CUDA); ``None`` keeps float weights. Every MatMul by a constant weight is quantised, low-rank factors
            included; the LM head only with ``quantize_lm_head``. ``int8: true`` in a YAML file is the same as
            ``quantize: int8``.
        block_size: ``int4`` and ``int8-weight``: weights per scale along the input dimension, a power of two in
            [16, 256].
        symmetric: ``int4`` and ``int8-weight``: scales only (no zero points).
        quantizer: ``int4`` and ``int8-weight``: which of ONNX Runtime's quantisers picks each block's scale and
            zero point: ``rtn`` (round to nearest over the block's range) or ``hqq`` (``int4`` only: half-quadratic
            quantisation, the scale and a float zero point fitted to minimise the block's reconstruction error; no
            calibration data; always with zero points, so not ``symmetric``; ONNX Runtime's 8-bit kernel takes no
            float zero points).
        accuracy_level: ``int4`` and ``int8-weight``: ONNX Runtime's ``MatMulNBits`` compute precision, 0 (the
            provider's default) to 4 (int8 activations quantised block by block on the CPU, the fastest there).
            ``None`` (the default): 4 for ``int8-weight`` on the CPU (at 0 ONNX Runtime 1.32's CPU kernel for 8-bit
            weights decoded SmolLM2 4.2 times slower than float32; at 4, 0.56-0.57 times, above the int8 floors),
            0 otherwise (:attr:`matmul_accuracy_level`).
        quantize_lm_head: quantise the head too (the projection onto the graph's output logits; kept float
            otherwise: a causal LM's is its largest single weight, and its errors reach every logit).
        per_channel: ``int8``: one scale per output column of each weight instead of one per tensor.
        factor_split: with ``quantize``, how each low-rank layer's scale is split between its two factors first:
            ``balanced`` rescales every rank direction by a power of two so both factors span the same range
            (the product is unchanged, bit for bit); ``svd`` rebuilds both from the product's own singular value
            decomposition, ``P sqrt(S)`` and ``sqrt(S) Q^T`` (the same product to float rounding); ``exported``
            keeps the factors as the compression wrote them (see ``exporters.lowrank.resplit_factors``).
        atol: largest absolute difference allowed between the optimised and the unoptimised graph (fp32).
        int8_atol: for int8 encoders (dynamic and weight-only alike), the largest absolute output difference
            allowed (lossy weights).
        int8_min_sqnr_db: for int8 decoders (dynamic and weight-only alike), the floor on the logits'
            signal-to-noise ratio ``10 log10(sum ref^2 / sum (quantised - ref)^2)`` over prefills and decode steps
            (an absolute logit tolerance does not carry across vocabularies and logit scales; the ratio does).
        int8_min_agreement: for int8 decoders (dynamic and weight-only alike), the floor on the share of those
            positions whose top-1 next token agrees with the float graph's.
        int4_atol: for int4 encoders, as ``int8_atol``.
        int4_min_sqnr_db: for int4 decoders, as ``int8_min_sqnr_db``. The int4 floors catch a broken graph, not a
            lossy one: ONNX Runtime's round-to-nearest int4 (block 32) of the dense SmolLM2-135M itself measures
            3.7 dB and 0.52 agreement at its worst parity shape (perplexity 25.9 -> 30.7 on held-out speeches), and
            svd-llm's keep 0.8 candidate 0.23 agreement; a broken graph agrees on almost no token of 49,152. The
            quality of a quantised model is the gate's to judge (``max_perplexity_ratio``).
        int4_min_agreement: for int4 decoders, as ``int8_min_agreement``.
        validate_shapes: (batch, sequence) pairs for the parity check.
        allow_fusion_loss: accept a graph with fewer fused operators than its dense-structured reference (an
            error otherwise); the manifest and the validation report say so.
        fuse_attention: for decoders of the rotary families (Llama, Mistral, Qwen2) on the CPU and on CUDA
            in float16, fuse each exported attention block into one ``GroupQueryAttention`` (baseline and
            candidate alike; on CUDA with each row's length instead of a padding bias: no left-padded rows).
            ``False`` keeps the exported attention, which also takes several new tokens on top of a cache at any
            batch size (ONNX Runtime's operator takes them only at batch 1; generation feeds one token per step).
        pack_matmuls: join the MatMuls by constant weights that read one tensor into one MatMul over the
            concatenated weights and a ``Split`` (:mod:`fwsvd_deploy.exporters.packing`; the same values from fewer,
            wider operators, as onnxruntime-genai's builder writes q/k/v): ``none`` (the default), ``factors`` (the
            low-rank down-projections of q/k/v and of gate/up only; a dense graph is left as it is) or ``all`` (dense
            projections too). Measured on the CPU in ``benchmarks/results/decode_packing.md``; not on CUDA. Not at
            level ``O1`` (no rewrites) and not with ``quantize: int8`` (one scale per weight tensor).
        genai: write ``genai_config.json`` beside a decoder's graph, so that onnxruntime-genai serves the folder
            (``onnxruntime_genai.Model(folder)``): ``None`` (the default) writes it for every decoder exported with
            its KV cache, ``True`` requires it (an encoder, or a decoder without its cache, is refused before any
            work), ``False`` never writes it.
    """

    device: str = "cpu"
    level: str = "O2"
    fp16: bool = False
    quantize: str | None = None
    block_size: int = 32
    symmetric: bool = False
    quantizer: str = "rtn"
    accuracy_level: int | None = None
    quantize_lm_head: bool = False
    per_channel: bool = False
    factor_split: str = "svd"
    atol: float = 1e-3
    int8_atol: float = 0.1
    int8_min_sqnr_db: float = 20.0
    int8_min_agreement: float = 0.9
    int4_atol: float = 0.5
    int4_min_sqnr_db: float = 2.0
    int4_min_agreement: float = 0.1
    validate_shapes: tuple[tuple[int, int], ...] = ((3, 23), (1, 41))
    allow_fusion_loss: bool = False
    fuse_attention: bool = True
    pack_matmuls: str = "none"
    genai: bool | None = None

    def __post_init__(self) -> None:
        _check_choice("device", self.device, DEVICES)
        _check_choice("level", self.level, LEVELS)
        if self.genai is not None and not isinstance(self.genai, bool):
            raise ConfigError(f"genai={self.genai!r} must be true, false or null (for every decoder with a cache)")
        for name in ("fp16", "symmetric", "quantize_lm_head", "per_channel", "allow_fusion_loss", "fuse_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.quantize is not None:
            _check_choice("quantize", self.quantize, QUANTIZATIONS)
        _check_choice("factor_split", self.factor_split, FACTOR_SPLITS)
        _check_choice("quantizer", self.quantizer, NBITS_QUANTIZERS)
        _check_choice("pack_matmuls", self.pack_matmuls, PACKINGS)
        if self.pack_matmuls != "none" and (self.level == "O1" or self.quantize == "int8"):
            why = "level='O1' makes no graph rewrites" if self.level == "O1" else (
                "quantize='int8' takes one scale per weight tensor, which a joined weight would share")
            raise ConfigError(f"pack_matmuls={self.pack_matmuls!r} does not apply: {why}; use pack_matmuls='none'")
        if self.quantizer == "hqq" and self.quantize == "int8-weight":
            raise ConfigError("quantizer='hqq' writes float zero points, which ONNX Runtime's MatMulNBits takes for "
                              "4 bits only; use it with quantize='int4', or quantizer='rtn' for int8-weight")
        if self.quantizer == "hqq" and self.symmetric:
            raise ConfigError("quantizer='hqq' fits a zero point to every block; drop symmetric, or use "
                              "quantizer='rtn'")
        _check_int("block_size", self.block_size, 16)
        if self.block_size > 256 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size={self.block_size} must be a power of two in [16, 256] (MatMulNBits "
                              "takes 16, 32, 64, 128 or 256)")
        if self.accuracy_level is not None:
            _check_int("accuracy_level", self.accuracy_level, 0)
            if self.accuracy_level > 4:
                raise ConfigError(f"accuracy_level={self.accuracy_level} must be 0 (the provider's default) to 4")
        defaults = OptimizeConfig.__dataclass_fields__
        # accuracy_level 0 (the provider's default) is what every other scheme runs at: as good as unset
        int4_only = [n for n, unset in (("symmetric", (False,)), ("accuracy_level", (None, 0)), ("quantizer", ("rtn",)))
                     if getattr(self, n) not in unset]
        block_set = self.block_size != defaults["block_size"].default
        if self.quantize not in NBITS_QUANTIZATIONS and (int4_only or block_set):
            names = int4_only + (["block_size"] if block_set else [])
            which = "--quantize int4" if names == ["quantizer"] else "--quantize int4 or int8-weight"
            raise ConfigError(f"{', '.join(names)} set for quantize={self.quantize!r}: they apply to MatMulNBits "
                              f"only ({which})")
        if self.quantize_lm_head and self.quantize is None:
            raise ConfigError("quantize_lm_head set without quantize; give --quantize int8, int8-weight or int4")
        if self.per_channel and self.quantize != "int8":
            raise ConfigError(f"per_channel set for quantize={self.quantize!r}: it applies to int8 only "
                              "(--quantize int8)")
        if self.fp16 and self.device != "cuda":
            raise ConfigError(
                "fp16 needs device='cuda': ONNX Runtime's CPU provider has no float16 kernels for the fused "
                "transformer operators, so a float16 CPU graph runs slower than float32"
            )
        if self.quantize == "int8" and self.device != "cpu":
            raise ConfigError("int8 dynamic quantisation targets the CPU provider (the CUDA provider has no "
                              "DynamicQuantizeMatMul); use device='cpu', or quantize='int8-weight' or 'int4' for "
                              "CUDA")
        if self.fp16 and self.quantize is not None:
            raise ConfigError(f"choose fp16 or quantize={self.quantize!r}, not both (quantised graphs keep float32 "
                              "activations)")
        _check_float("atol", self.atol, 0.0, 1e3, low_open=True)
        for bits in ("int8", "int4"):
            _check_float(f"{bits}_atol", getattr(self, f"{bits}_atol"), 0.0, 1e3, low_open=True)
            _check_float(f"{bits}_min_sqnr_db", getattr(self, f"{bits}_min_sqnr_db"), 0.0, 300.0, low_open=False)
            _check_float(f"{bits}_min_agreement", getattr(self, f"{bits}_min_agreement"), 0.0, 1.0, low_open=False)
        object.__setattr__(self, "validate_shapes", _check_shapes("validate_shapes", self.validate_shapes))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> OptimizeConfig:
        """As :meth:`_Config.from_dict`; ``int8: true`` (the older spelling) is ``quantize: int8``."""
        data = dict(data or {})
        if "int8" in data:
            int8 = data.pop("int8")
            if not isinstance(int8, bool):
                raise ConfigError(f"int8={int8!r} must be true or false")
            if int8 and data.get("quantize") not in (None, "int8"):
                raise ConfigError(f"int8: true contradicts quantize: {data['quantize']}; give quantize only")
            if int8:
                data["quantize"] = "int8"
        return super().from_dict(data)

    @property
    def int8(self) -> bool:
        return self.quantize == "int8"

    @property
    def lossy_atol(self) -> float:
        """The encoders' output tolerance for this graph: ``atol`` for float weights, else the quantised one."""
        return getattr(self, f"{self.bits_prefix}_atol") if self.quantize else self.atol

    @property
    def matmul_accuracy_level(self) -> int:
        """The ``MatMulNBits`` compute precision used: ``accuracy_level``, or when unset 4 for ``int8-weight`` on
        the CPU (its fast kernel) and 0 (the provider's default) otherwise."""
        if self.accuracy_level is not None:
            return self.accuracy_level
        return 4 if self.quantize == "int8-weight" and self.device == "cpu" else 0

    @property
    def bits_prefix(self) -> str | None:
        """``int8`` or ``int4``: the floors' prefix for this quantisation (both int8 schemes share theirs)."""
        return None if self.quantize is None else self.quantize.removesuffix("-weight")

    @property
    def floors(self) -> tuple[float, float] | None:
        """``(min_sqnr_db, min_agreement)`` a quantised decoder is held to; ``None`` for float weights."""
        if self.quantize is None:
            return None
        return getattr(self, f"{self.bits_prefix}_min_sqnr_db"), getattr(self, f"{self.bits_prefix}_min_agreement")


@dataclass(frozen=True)
class GateConfig(_Config):
    """Release thresholds; ``None`` leaves a check out. Every check is evaluated and every failure reported.

    A threshold that no candidate could fail (or pass) is refused: leave the check out instead.

    Attributes:
        max_accuracy_drop: baseline minus candidate primary metric, in percentage points, ``[0, 100]``.
        min_agreement: fraction of examples on which both models predict the same class (causal LMs: positions
            with the same greedy next token), ``(0, 1]``.
        max_latency_ratio: candidate/baseline median latency, in every cell of the latency grid, ``> 0``.
        max_memory_ratio: candidate/baseline model size on disk, ``> 0``.
        max_logit_diff: largest absolute logit difference between the two models, ``>= 0``.
        max_perplexity_ratio: candidate/baseline perplexity (causal language models), ``> 0``.
        max_decode_latency_ratio: candidate/baseline per-token decode time with the KV cache, at every generation
            batch size (causal language models), ``> 0``.
        max_prefill_latency_ratio: candidate/baseline prefill time of the prompt, at every generation batch size
            (causal language models), ``> 0``.

    ``max_accuracy_drop``, ``max_latency_ratio`` and ``max_logit_diff`` apply to encoder tasks, the three above to
    causal language models; ``min_agreement`` and ``max_memory_ratio`` to both.
    """

    max_accuracy_drop: float | None = 1.0
    min_agreement: float | None = None
    max_latency_ratio: float | None = None
    max_memory_ratio: float | None = None
    max_logit_diff: float | None = None
    max_perplexity_ratio: float | None = None
    max_decode_latency_ratio: float | None = None
    max_prefill_latency_ratio: float | None = None

    def __post_init__(self) -> None:
        _check_float("max_accuracy_drop", self.max_accuracy_drop, 0.0, 100.0, low_open=False, optional=True)
        _check_float("min_agreement", self.min_agreement, 0.0, 1.0, low_open=True, optional=True)
        _check_float("max_latency_ratio", self.max_latency_ratio, 0.0, 1e6, low_open=True, optional=True)
        _check_float("max_memory_ratio", self.max_memory_ratio, 0.0, 1e6, low_open=True, optional=True)
        _check_float("max_logit_diff", self.max_logit_diff, 0.0, 1e9, low_open=False, optional=True)
        for name in ("max_perplexity_ratio", "max_decode_latency_ratio", "max_prefill_latency_ratio"):
            _check_float(name, getattr(self, name), 0.0, 1e6, low_open=True, optional=True)


def _check_int_list(name: str, values: Any) -> tuple[int, ...]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"{name}={values!r} must be a non-empty list of positive integers")
    for v in values:
        _check_int(name, v, 1)
    return tuple(values)


@dataclass(frozen=True)
class ValidateConfig(_Config):
    """How baseline and candidate are measured.

    Attributes:
        device: ``cpu``, ``cuda`` or ``tensorrt`` (both models run on the same provider).
        threads: intra-op threads for every session (fixed, so runs compare).
        batch_sizes / seq_lens: the latency grid.
        warmup / rounds: per grid cell; rounds run the models interleaved.
        eval_batch_size: batch size of the accuracy pass.
        memory_batch / memory_seq: the batch whose peak memory is measured.
        latency: measure latency (skip for accuracy-only gates).
        memory: measure memory.
        split: the split the accuracy is measured on; ``None`` uses the data's ``eval_split``.
        prompt_len / new_tokens: a causal language model's timed generation: a prefill of ``prompt_len`` tokens, then
            ``new_tokens`` decode steps with the KV cache (also the memory probe's, at ``memory_batch``).
        gen_batch_sizes: the batch sizes the generation is timed at.
        parity_windows: a causal language model's ONNX-vs-PyTorch perplexity check (when PyTorch folders are
            given) runs on this many of the evaluation windows, the first ones; ``None``: on all of them.
        cuda_graph: a causal language model's timed decode steps are captured in a CUDA graph and replayed, on one
            shared max-length KV cache (``device: cuda``, graphs optimised for CUDA in float16); ``None``: on CUDA
            whenever both graphs allow it, off elsewhere; ``true`` on another device is refused.
    """

    device: str = "cpu"
    threads: int = 2
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    seq_lens: tuple[int, ...] = (32, 128)
    warmup: int = 2
    rounds: int = 10
    eval_batch_size: int = 64
    memory_batch: int = 8
    memory_seq: int = 128
    latency: bool = True
    memory: bool = True
    split: str | None = None
    prompt_len: int = 128
    new_tokens: int = 32
    gen_batch_sizes: tuple[int, ...] = (1, 8)
    parity_windows: int | None = None
    cuda_graph: bool | None = None

    def __post_init__(self) -> None:
        _check_int("parity_windows", self.parity_windows, 1, optional=True)
        _check_choice("device", self.device, RUN_DEVICES)
        if self.cuda_graph not in (None, True, False):
            raise ConfigError(f"cuda_graph={self.cuda_graph!r} must be true, false or null (on for CUDA where the "
                              "graphs allow it)")
        if self.cuda_graph and self.device != "cuda":
            raise ConfigError(f"cuda_graph needs device cuda, not {self.device}: CUDA graphs are captured by the "
                              "CUDA provider; drop --cuda-graph (or cuda_graph: true)")
        _check_int("prompt_len", self.prompt_len, 1)
        _check_int("new_tokens", self.new_tokens, 1)
        object.__setattr__(self, "gen_batch_sizes", _check_int_list("gen_batch_sizes", self.gen_batch_sizes))
        if self.split is not None and (not isinstance(self.split, str) or not self.split):
            raise ConfigError(f"split={self.split!r} must be a split name or null (the data's eval_split)")
        _check_int("threads", self.threads, 1)
        object.__setattr__(self, "batch_sizes", _check_int_list("batch_sizes", self.batch_sizes))
        object.__setattr__(self, "seq_lens", _check_int_list("seq_lens", self.seq_lens))
        _check_int("warmup", self.warmup, 0)
        _check_int("rounds", self.rounds, 1)
        _check_int("eval_batch_size", self.eval_batch_size, 1)
        _check_int("memory_batch", self.memory_batch, 1)
        _check_int("memory_seq", self.memory_seq, 2)
        for name in ("latency", "memory"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["batch_sizes"], out["seq_lens"] = list(self.batch_sizes), list(self.seq_lens)
        out["gen_batch_sizes"] = list(self.gen_batch_sizes)
        return out


@dataclass(frozen=True)
class StageSwitch(_Config):
    """Whether an optional fine-tuning stage runs, and its settings."""

    enabled: bool = True
    settings: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"enabled={self.enabled!r} must be true or false")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> StageSwitch:
        data = dict(data or {})
        enabled = data.pop("enabled", True)
        return cls(enabled=enabled, settings=FinetuneConfig.from_dict(data))

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, **self.settings.to_dict()}


@dataclass(frozen=True)
class SearchConfig(_Config):
    """The bisection of ``fwsvd-deploy search`` over the kept fraction.

    Attributes:
        low / high: the range of kept fractions tried, ``0 < low < high <= 1``; both ends are tried first.
        steps: bisection steps after the two ends.
    """

    low: float = 0.1
    high: float = 0.9
    steps: int = 4

    def __post_init__(self) -> None:
        _check_float("low", self.low, 0.0, 1.0, low_open=True)
        _check_float("high", self.high, 0.0, 1.0, low_open=True)
        if not self.low < self.high:
            raise ConfigError(f"search range [{self.low}, {self.high}] must satisfy low < high")
        _check_int("steps", self.steps, 1)


# Keys of which a section takes one: giving one in YAML drops the default of the others.
_EXCLUSIVE: dict[str, tuple[tuple[str, ...], ...]] = {"compression": (("rank", "ratio"),)}
# a key given re-derives these defaults of its section unless they are given too
_DERIVED: dict[str, dict[str, tuple[str, ...]]] = {"compression": {"allocation": ("method", "rank")}}

_SECTIONS = {
    "data": DataConfig, "finetune": StageSwitch, "calibration": CalibrationConfig, "compression": CompressionConfig,
    "recovery": StageSwitch, "export": ExportConfig, "optimize": OptimizeConfig, "validate": ValidateConfig,
    "gate": GateConfig,
}
_SECTION_ALIASES = {"fisher": "calibration"}  # earlier names, still read
PIPELINE_TASKS = ("text-classification", "causal-lm")
# ONNX Runtime vs PyTorch logits of a real decoder: float32 differences grow with depth and with the logits' scale
# (the dense SmolLM2-135M, 30 layers: 6e-5; compressed with svd-llm at keep 0.8: 1.4e-4), so the decoder pipeline
# allows 1e-3; greedy generation must still be token-identical and perplexity agree to 0.1%.
DECODER_EXPORT_ATOL = 1e-3
EMBEDDED_ENCODER_NAME = "all-MiniLM-L6-v2"
EMBEDDED_DECODER_NAME = "smollm2-135m"


def pipeline_defaults(task: str) -> dict[str, Any]:
    """The sections a pipeline of ``task`` starts from; a YAML file overrides them key by key.

    Both compress with the default method, ``fisher-whitened`` with ``loss`` allocation (:data:`DEFAULT_METHOD`).
    ``text-classification``: the embedded MiniLM fine-tuned on Rotten Tomatoes, half the block weights kept,
    recovery fine-tuning, gated on accuracy, latency and size. ``causal-lm``: the embedded SmolLM2-135M on the
    built-in convention speeches in windows of 256 tokens, 80% of the block weights kept, exported with the KV cache,
    gated on perplexity, per-token decode time and size; recovery is off by default (enable it with
    ``recovery: {enabled: true}``).
    """
    _check_choice("task", task, PIPELINE_TASKS)
    if task == "causal-lm":
        return {
            "model": EMBEDDED_DECODER_NAME,
            "data": DataConfig(dataset="speeches", max_length=256, max_eval_samples=40),
            "finetune": StageSwitch(False, FinetuneConfig(epochs=1)),
            "calibration": CalibrationConfig(),
            "compression": CompressionConfig(ratio=0.8),
            "recovery": StageSwitch(False, FinetuneConfig(max_steps=200, eval_steps=50, batch_size=8,
                                                          learning_rate=1e-4, trainable="factors")),
            "export": ExportConfig(task="text-generation-with-past", atol=DECODER_EXPORT_ATOL),
            "optimize": OptimizeConfig(),
            # one warm-up generation runs every shape the timed rounds run (the past grows by one token a step)
            "validate": ValidateConfig(split="test", eval_batch_size=8, parity_windows=8, warmup=1),
            "gate": GateConfig(max_accuracy_drop=None, max_perplexity_ratio=1.25, max_decode_latency_ratio=1.0,
                               max_memory_ratio=0.9),
        }
    return {
        "model": EMBEDDED_ENCODER_NAME,
        "data": DataConfig(max_length=64, max_train_samples=3000),
        "finetune": StageSwitch(True, FinetuneConfig(epochs=1)),
        "calibration": CalibrationConfig(),
        "compression": CompressionConfig(ratio=0.5),
        "recovery": StageSwitch(True, FinetuneConfig(epochs=1)),
        "export": ExportConfig(),
        "optimize": OptimizeConfig(),
        "validate": ValidateConfig(split="test"),
        "gate": GateConfig(max_accuracy_drop=1.0, max_latency_ratio=1.0, max_memory_ratio=0.9),
    }


def check_gate_measured(validate: ValidateConfig, gate: GateConfig) -> None:
    """Refuse a gate threshold whose measurement the validation turns off (before any work, not after it).

    Raises:
        ConfigError: a latency threshold with ``latency: false``, or ``max_memory_ratio`` with ``memory: false``.
    """
    for name in ("max_latency_ratio", "max_decode_latency_ratio", "max_prefill_latency_ratio"):
        if getattr(gate, name) is not None and not validate.latency:
            raise ConfigError(f"gate {name} needs latency measurement; enable it or drop the threshold")
    if gate.max_memory_ratio is not None and not validate.memory:
        raise ConfigError("gate max_memory_ratio needs memory measurement; enable it or drop the threshold")


@dataclass(frozen=True)
class PipelineConfig:
    """Everything ``fwsvd-deploy run`` does, one section per stage; unknown keys are rejected at every level.

    ``task`` picks the defaults (:func:`pipeline_defaults`): ``text-classification`` for encoders, ``causal-lm`` for
    decoder language models. ``model`` is the starting model (folder, hub id, GGUF file, or the embedded
    ``all-MiniLM-L6-v2`` / ``smollm2-135m``). With ``finetune.enabled`` it is fine-tuned first;
    ``recovery.enabled`` fine-tunes the compressed model. The section ``calibration`` was called ``fisher``
    before; both names are read.
    """

    task: str = "text-classification"
    model: str = EMBEDDED_ENCODER_NAME
    data: DataConfig = field(default_factory=lambda: pipeline_defaults("text-classification")["data"])
    finetune: StageSwitch = field(default_factory=lambda: pipeline_defaults("text-classification")["finetune"])
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    compression: CompressionConfig = field(
        default_factory=lambda: pipeline_defaults("text-classification")["compression"])
    recovery: StageSwitch = field(default_factory=lambda: pipeline_defaults("text-classification")["recovery"])
    export: ExportConfig = field(default_factory=ExportConfig)
    optimize: OptimizeConfig = field(default_factory=OptimizeConfig)
    validate: ValidateConfig = field(default_factory=lambda: ValidateConfig(split="test"))
    gate: GateConfig = field(default_factory=lambda: pipeline_defaults("text-classification")["gate"])

    def __post_init__(self) -> None:
        _check_choice("task", self.task, PIPELINE_TASKS)
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"model={self.model!r} must be a model folder, hub id, GGUF file, "
                              f"{EMBEDDED_ENCODER_NAME} or {EMBEDDED_DECODER_NAME}")
        decoder_export = self.export.task.startswith("text-generation")
        if (self.task == "causal-lm") != decoder_export:
            want = "text-generation-with-past" if self.task == "causal-lm" else "an encoder task"
            raise ConfigError(f"export.task={self.export.task!r} does not fit task={self.task!r}; use {want}")
        check_gate_measured(self.validate, self.gate)

    @property
    def fisher(self) -> CalibrationConfig:
        """The calibration section under its earlier name."""
        return self.calibration

    @classmethod
    def for_task(cls, task: str) -> PipelineConfig:
        """The defaults of ``task`` (see :func:`pipeline_defaults`)."""
        return cls(task=task, **pipeline_defaults(task))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> PipelineConfig:
        data = dict(data or {})
        for old, new in _SECTION_ALIASES.items():
            if old in data:
                if new in data:
                    raise ConfigError(f"give the section {new!r} or its earlier name {old!r}, not both")
                data[new] = data.pop(old)
        allowed = {"task", "model", *_SECTIONS}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(unknown)} in the pipeline config; allowed: "
                              f"{', '.join(sorted(allowed))}")
        task = data.get("task", "text-classification")
        _check_choice("task", task, PIPELINE_TASKS)
        defaults = pipeline_defaults(task)
        kwargs: dict[str, Any] = {"task": task, **defaults}
        if "model" in data:
            kwargs["model"] = data["model"]
        for name, section in _SECTIONS.items():
            if name not in data:
                continue
            value = data[name]
            if value is not None and not isinstance(value, Mapping):
                raise ConfigError(f"section {name!r} must be a mapping, got {type(value).__name__}")
            given = dict(value or {})
            merged = {**defaults[name].to_dict(), **given}
            for group in _EXCLUSIVE.get(name, ()):  # a key given replaces the default of the others in its group
                if any(merged.get(k) is not None for k in group if k in given):
                    merged.update({k: None for k in group if k not in given})
            for key, sources in _DERIVED.get(name, {}).items():
                if key not in given and any(k in given for k in sources):
                    merged[key] = None
            try:
                kwargs[name] = section.from_dict(merged)
            except ConfigError as exc:
                raise ConfigError(f"{name}: {exc}") from None
            except TypeError as exc:
                raise ConfigError(f"{name}: {exc}") from None
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"pipeline config {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p} is not valid YAML: {first_line(exc)}") from exc
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError(f"{p} must hold a mapping of sections")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "model": self.model}
        for name in _SECTIONS:
            section = getattr(self, name).to_dict()
            out[name] = {k: (list(map(list, v)) if k == "validate_shapes" else v) for k, v in section.items()}
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def apply_overrides(settings: Mapping[str, Any], assignments: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of pipeline ``settings`` with dotted ``KEY=VALUE`` assignments applied (values read as YAML).

    ``["compression.ratio=0.6", "gate.max_latency_ratio=null"]`` sets those two keys; the result still goes through
    :meth:`PipelineConfig.from_dict`, which refuses unknown keys.

    Raises:
        ConfigError: an assignment without ``=``, with an empty key, or under a key that is not a section.
    """
    import copy

    import yaml

    out: dict[str, Any] = copy.deepcopy(dict(settings))
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"{assignment!r} is not an assignment; write SECTION.KEY=VALUE, "
                              "e.g. compression.ratio=0.6")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{assignment!r}: the value is not valid YAML ({first_line(exc)})") from None
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{assignment!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out
