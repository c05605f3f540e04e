"""ONNX Runtime transformer optimisation, low-rank aware, with fused-operator counts and parity."""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from ..config import OptimizeConfig
from ..errors import ConfigError, ExportError, FusionLossError, first_line
from ..manifest import file_sha256, folder_fingerprint, read_manifest, write_manifest
from ..modeling import load_tokenizer
from ..outputs import atomic_output_dir, check_output_dir
from .lowrank import MS_DOMAIN, densify, find_pairs, inline_identities, restore
from .runtime import ONNX_FILE, make_session, onnx_config, parity_report, run_session

# Fused operators by family; an attention layer may be Attention, MultiHeadAttention or (int8) QAttention.
FUSION_GROUPS = {
    "attention": ("Attention", "MultiHeadAttention", "QAttention"),
    "embed_layer_norm": ("EmbedLayerNormalization", "QEmbedLayerNormalization"),
    "skip_layer_norm": ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization"),
    "gelu": ("BiasGelu", "FastGelu", "Gelu", "GemmFastGelu"),
    "layer_norm": ("LayerNormalization",),
}
ORT_MODEL_TYPES = {"bert": "bert", "roberta": "bert", "electra": "bert", "albert": "bert", "distilbert": "bert"}
_COPY_SUFFIXES = (".json", ".txt", ".model")


@dataclass(frozen=True)
class OptimizeResult:
    out_dir: Path
    onnx_path: Path
    fusions: dict[str, int]
    reference_fusions: dict[str, int] | None
    operators: dict[str, int]
    low_rank_layers: int
    parity: dict[str, Any] | None
    seconds: float

    @property
    def fusions_complete(self) -> bool:
        """True when every fused family of the dense-structured reference is present, count for count."""
        return fusions_complete(self.fusions, self.reference_fusions)


def fusions_complete(fusions: dict[str, int], reference: dict[str, int] | None) -> bool:
    """Whether ``fusions`` has every fused family of ``reference``, count for count (``None``: nothing to match)."""
    return reference is None or all(fusions.get(k, 0) >= v for k, v in reference.items())


def _fusion_gap(fusions: dict[str, int], reference: dict[str, int] | None) -> str:
    missing = {k: v - fusions.get(k, 0) for k, v in (reference or {}).items() if fusions.get(k, 0) < v}
    return ", ".join(f"{n} {k}" for k, n in missing.items()) or "none"


def operator_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node))


def fusion_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Fused transformer operators per family (attention, embed_layer_norm, skip_layer_norm, gelu, layer_norm)."""
    ops = Counter(n.op_type for n in model.graph.node)
    return {group: sum(ops[o] for o in names) for group, names in FUSION_GROUPS.items()}


def _heads_and_hidden(config: dict[str, Any]) -> tuple[int, int]:
    heads = config.get("num_attention_heads", config.get("n_heads"))
    hidden = config.get("hidden_size", config.get("dim"))
    if not heads or not hidden:
        raise ConfigError("config.json gives no head count / hidden size; cannot optimise")
    return int(heads), int(hidden)


def load_onnx(folder: Path) -> onnx.ModelProto:
    path = folder / ONNX_FILE
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder; give the folder written by 'fwsvd-deploy export'")
    if not path.is_file():
        raise ConfigError(f"{folder} has no {ONNX_FILE}; give the folder written by 'fwsvd-deploy export'")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model if model.ByteSize() < 2**31 - 1 else str(path))
    except Exception as exc:
        raise ConfigError(f"{path} is not a valid ONNX model (truncated or another format?): {first_line(exc)}") \
            from exc
    return model


def _fusion_options(cfg: OptimizeConfig, model_type: str) -> Any:
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(ORT_MODEL_TYPES[model_type])
    options.enable_gelu_approximation = cfg.level == "O3"
    return options


def _ort_optimize(model: onnx.ModelProto, cfg: OptimizeConfig, model_type: str, heads: int,
                  hidden: int) -> onnx.ModelProto:
    from onnxruntime.transformers.optimizer import optimize_model

    logger = logging.getLogger("onnxruntime.transformers")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        optimized = optimize_model(model, model_type=ORT_MODEL_TYPES[model_type], num_heads=heads, hidden_size=hidden,
                                   optimization_options=_fusion_options(cfg, model_type), opt_level=0,
                                   use_gpu=cfg.device == "cuda")
        optimized.topological_sort()
        result = optimized.model
        if any(n.domain == MS_DOMAIN for n in result.graph.node) and not any(
                o.domain == MS_DOMAIN for o in result.opset_import):
            result.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
        return result
    finally:
        logger.setLevel(previous)


def optimize_onnx(onnx_dir: str | Path, cfg: OptimizeConfig, out_dir: str | Path, *,
                  overwrite: bool = False) -> OptimizeResult:
    """Optimise ``onnx_dir/model.onnx`` for ``cfg.device`` into ``out_dir``, keeping factorised layers factorised.

    Raises:
        ConfigError: not an ONNX folder, a truncated file, an unreadable config, an unsupported model type.
        ModelLoadError: no tokenizer files beside a graph for the CPU (its parity check needs them).
        ExportError: the optimised graph lost its factorisation.
        FusionLossError: it has fewer fused operators than its dense-structured reference, unless
            ``cfg.allow_fusion_loss``.
        ParityError: the optimised graph disagrees with the unoptimised one (CPU; CUDA graphs are not run here).
    """
    src = Path(onnx_dir)
    model = load_onnx(src)
    check_output_dir(out_dir, overwrite, inputs=[src])
    config = onnx_config(src)
    tokenizer = load_tokenizer(str(src)) if cfg.device == "cpu" else None
    model_type = config.get("model_type", "")
    if model_type not in ORT_MODEL_TYPES:
        raise ConfigError(f"model type {model_type!r} cannot be optimised; supported: {', '.join(ORT_MODEL_TYPES)}")
    heads, hidden = _heads_and_hidden(config)
    start = time.perf_counter()
    pairs = len(find_pairs(inline_identities(model)))
    reference_fusions = None
    if cfg.level == "O1":
        optimized = model  # basic rewrites happen when the session loads the graph (see below)
    else:
        dense, index = densify(model)
        fused = _ort_optimize(dense, cfg, model_type, heads, hidden)
        if len(index):
            reference_fusions = fusion_counts(fused)
            optimized = restore(fused, index)
        else:
            optimized = fused
    if cfg.fp16:
        from onnxruntime.transformers.onnx_model import OnnxModel

        wrapper = OnnxModel(optimized)
        wrapper.convert_float_to_float16(keep_io_types=True)
        optimized = wrapper.model
    with atomic_output_dir(out_dir, overwrite, inputs=[src]) as tmp:
        path = tmp / ONNX_FILE
        large = optimized.ByteSize() > 2**31 - 1000
        if cfg.level == "O1":
            _basic_rewrites(src / ONNX_FILE, path)
            optimized = onnx.load(str(path))
        else:
            onnx.save_model(optimized, str(path), save_as_external_data=large, location=f"{ONNX_FILE}_data")
        if cfg.int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized = tmp / "model.int8.onnx"
            try:
                # outputs of contrib operators have no inferred type; they are float32 here
                quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8,
                                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            except Exception as exc:
                raise ExportError(f"int8 quantisation failed: {first_line(exc)}") from exc
            quantized.replace(path)
            optimized = onnx.load(str(path))
        for item in src.iterdir():
            if item.is_file() and item.suffix in _COPY_SUFFIXES and item.name != "manifest.json":
                shutil.copy(item, tmp / item.name)
        fusions = fusion_counts(optimized)
        if not fusions_complete(fusions, reference_fusions) and not cfg.allow_fusion_loss:
            raise FusionLossError(
                f"the optimised graph lost fused operators: {_fusion_gap(fusions, reference_fusions)} fewer than "
                "its dense-structured reference; report it, or pass --allow-fusion-loss to keep the graph anyway"
            )
        parity = None
        parity_note = None
        if tokenizer is not None:
            reference = make_session(src / ONNX_FILE, "cpu")
            candidate = make_session(path, "cpu")
            parity = parity_report(
                candidate, tokenizer, lambda inputs, names: run_session(reference, inputs), cfg.validate_shapes,
                cfg.int8_atol if cfg.int8 else cfg.atol, what="optimised vs unoptimised ONNX",
            )
        else:
            parity_note = "not run here: a CUDA graph is checked on a CUDA machine (fwsvd-deploy validate)"
        seconds = time.perf_counter() - start
        result = OptimizeResult(Path(out_dir), Path(out_dir) / ONNX_FILE, fusions, reference_fusions,
                                operator_counts(optimized), pairs, parity, seconds)
        upstream = read_manifest(src) or {}
        write_manifest(tmp, {
            "kind": "onnx-optimized",
            "input": {"path": str(src), "fingerprint": folder_fingerprint(src),
                      "export": upstream.get("settings"), "compressed": upstream.get("input", {}).get("compressed")},
            "settings": cfg.to_dict() | {"model_type": model_type, "num_heads": heads, "hidden_size": hidden},
            "low_rank_layers": pairs,
            "fusions": fusions,
            "reference_fusions": reference_fusions,
            "fusions_complete": result.fusions_complete,
            "allow_fusion_loss": cfg.allow_fusion_loss,
            "operators": result.operators,
            "artifacts": {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.suffix in (".onnx", ".onnx_data")},
            "parity": parity,
            "parity_note": parity_note,
            "seconds": seconds,
        })
    if not result.fusions_complete:
        logging.getLogger("fwsvd_deploy").warning("the optimised graph lost fused operators (%s), allowed by "
                                                  "allow_fusion_loss", _fusion_gap(fusions, reference_fusions))
    return result


def _basic_rewrites(source: Path, target: Path) -> None:
    """ONNX Runtime's basic (provider-independent) graph rewrites, saved offline."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    if not target.is_file():
        raise ExportError("ONNX Runtime did not write the O1 graph")
