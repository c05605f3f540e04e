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

from ..checkpoint import atomic_output_dir, check_output_dir
from ..config import OptimizeConfig
from ..errors import ConfigError, ExportError
from ..manifest import file_sha256, folder_fingerprint, read_manifest, write_manifest
from ..modeling import load_tokenizer
from .lowrank import MS_DOMAIN, densify, find_pairs, inline_identities, restore
from .runtime import ONNX_FILE, make_session, parity_report, run_session

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
        if self.reference_fusions is None:
            return True
        return all(self.fusions.get(k, 0) >= v for k, v in self.reference_fusions.items())


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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path} is not a valid ONNX model (truncated or another format?): {first}") from exc
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
        ConfigError: not an ONNX folder, a truncated file, an unsupported model type.
        ExportError: the optimised graph lost its factorisation.
        ParityError: the optimised graph disagrees with the unoptimised one (CPU; CUDA graphs are not run here).
    """
    import json

    src = Path(onnx_dir)
    model = load_onnx(src)
    check_output_dir(out_dir, overwrite)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{src} has no config.json; export it with 'fwsvd-deploy export'")
    config = json.loads(config_path.read_text())
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
    with atomic_output_dir(out_dir, overwrite) as tmp:
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
                raise ExportError(f"int8 quantisation failed: {str(exc).strip().splitlines()[0]}") from exc
            quantized.replace(path)
            optimized = onnx.load(str(path))
        for item in src.iterdir():
            if item.is_file() and item.suffix in _COPY_SUFFIXES and item.name != "manifest.json":
                shutil.copy(item, tmp / item.name)
        fusions = fusion_counts(optimized)
        parity = None
        parity_note = None
        if cfg.device == "cpu":
            tokenizer = load_tokenizer(str(src))
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
            "operators": result.operators,
            "artifacts": {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.suffix in (".onnx", ".onnx_data")},
            "parity": parity,
            "parity_note": parity_note,
            "seconds": seconds,
        })
    if not result.fusions_complete:
        logging.getLogger(__name__).warning("optimised graph has fewer fusions than its dense reference: %s vs %s",
                                            fusions, reference_fusions)
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
