"""ONNX Runtime transformer optimisation, low-rank aware, with fused-operator counts and parity."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx.external_data_helper import load_external_data_for_model

from ..config import OptimizeConfig
from ..errors import ConfigError, ExportError, FusionLossError, first_line
from ..families import Family, family_of, optimisable
from ..manifest import file_sha256, folder_fingerprint, read_manifest, write_manifest
from ..modeling import is_causal_lm, load_tokenizer
from ..outputs import atomic_output_dir, check_output_dir, release_memory
from .attention import (
    AttentionFusion,
    attention_blocker,
    attention_blocks,
    attention_padding,
    fuse_decoder_attention,
)
from .decoder import CacheLayout, check_positions, optimised_parity
from .genai import GENAI_FILE, check_servable, write_genai_config
from .lowrank import MS_DOMAIN, densify, find_pairs, inline_identities, resplit_factors, restore
from .packing import pack_shared_inputs
from .quantize import Quantization, check_quantizable, quantize_graph
from .runtime import ONNX_FILE, make_session, parity_report, run_session
from .weights import WeightStore

# Fused operators by kind; an attention layer may be Attention, MultiHeadAttention, GroupQueryAttention or (int8)
# QAttention, an embedding layer norm EmbedLayerNormalization or (int8) QEmbedLayerNormalization.
FUSION_GROUPS = {
    "attention": ("Attention", "MultiHeadAttention", "GroupQueryAttention", "QAttention"),
    "embed_layer_norm": ("EmbedLayerNormalization", "QEmbedLayerNormalization"),
    "skip_layer_norm": ("SkipLayerNormalization",),
    "skip_simplified_layer_norm": ("SkipSimplifiedLayerNormalization",),  # RMSNorm of a residual sum
    "gelu": ("BiasGelu", "FastGelu", "Gelu", "GemmFastGelu"),
    "layer_norm": ("LayerNormalization",),
    "simplified_layer_norm": ("SimplifiedLayerNormalization",),  # RMSNorm
    "rotary_embedding": ("RotaryEmbedding",),
}
# The ONNX Runtime FusionOptions switches whose passes build each kind (bias folding included).
FUSION_SWITCHES = {
    "attention": ("enable_attention",),
    "embed_layer_norm": ("enable_embed_layer_norm",),
    "skip_layer_norm": ("enable_skip_layer_norm", "enable_bias_skip_layer_norm"),
    "skip_simplified_layer_norm": ("enable_skip_layer_norm", "enable_bias_skip_layer_norm"),
    "gelu": ("enable_gelu", "enable_bias_gelu"),
    "layer_norm": ("enable_layer_norm",),
    "simplified_layer_norm": ("enable_layer_norm",),
    "rotary_embedding": ("enable_rotary_embeddings",),
}
_PASSES = (*dict.fromkeys(s for switches in FUSION_SWITCHES.values() for s in switches), "enable_qordered_matmul")
_COPY_SUFFIXES = (".json", ".txt", ".model", ".jinja")


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
    attention: AttentionFusion | None = None  # the decoder attention fusion, for families that have one
    quantization: Quantization | None = None  # what weight quantisation did, with cfg.quantize
    genai_config: Path | None = None  # genai_config.json, for a decoder onnxruntime-genai can serve
    packed_matmuls: int = 0  # MatMuls joined into another that reads the same tensor (OptimizeConfig.pack_matmuls)

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
    """Fused transformer operators per kind (the keys of :data:`FUSION_GROUPS`)."""
    ops = Counter(n.op_type for n in model.graph.node)
    return {group: sum(ops[o] for o in names) for group, names in FUSION_GROUPS.items()}


def fused_operator_counts(model: onnx.ModelProto) -> dict[str, int]:
    """The fused operators present, by operator type."""
    names = {o for group in FUSION_GROUPS.values() for o in group}
    return dict(sorted(Counter(n.op_type for n in model.graph.node if n.op_type in names).items()))


def _read_config(folder: Path) -> Any:
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} has no config.json; export it with 'fwsvd-deploy export'")
    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot read {folder / 'config.json'}: {first}") from exc


def _family(config: Any) -> Family:
    family = family_of(config)
    if family is None or family.ort_model_type is None:
        raise ConfigError(
            f"model type {config.model_type!r} cannot be optimised: fwsvd-deploy knows ONNX Runtime's fusions for "
            f"{', '.join(optimisable())}; compression and export work for it, and its exported graph runs in ONNX "
            "Runtime as it is"
        )
    return family


def _heads_and_hidden(config: Any) -> tuple[int, int]:
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not heads or not hidden:
        raise ConfigError("config.json gives no head count / hidden size; cannot optimise")
    return int(heads), int(hidden)


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which every ``Constant`` node holding a tensor is an initializer instead.

    ONNX Runtime's fusion passes rescan the node list at almost every step; an exported decoder is about one third
    ``Constant`` nodes, so this cuts its optimisation time by about as much and changes no fusion (the passes read
    constants from either place).
    """
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    graph = copied.graph
    outputs = {o.name for o in graph.output}
    kept = []
    for node in graph.node:
        if (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1
                and node.attribute[0].name == "value" and node.output[0] not in outputs):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return copied


def load_onnx(folder: Path) -> onnx.ModelProto:
    """``folder``'s checked graph; the weights of a model saved with external data stay in their file."""
    path = folder / ONNX_FILE
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder; give the folder written by 'fwsvd-deploy export'")
    if not path.is_file():
        raise ConfigError(f"{folder} has no {ONNX_FILE}; give the folder written by 'fwsvd-deploy export'")
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ConfigError(f"{path} is not a valid ONNX model (truncated or another format?): {first_line(exc)}") \
            from exc
    return model


def _fusion_options(cfg: OptimizeConfig, family: Family) -> Any:
    """ONNX Runtime's options for the family's model type; with only the passes its ``fusions`` need, if listed."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(family.ort_model_type)
    if family.fusions is not None:
        wanted = {switch for kind in family.fusions for switch in FUSION_SWITCHES[kind]}
        for switch in _PASSES:
            setattr(options, switch, switch in wanted)
    options.enable_gelu_approximation = cfg.level == "O3"
    return options


def _ort_optimize(model: onnx.ModelProto, cfg: OptimizeConfig, family: Family, heads: int,
                  hidden: int) -> onnx.ModelProto:
    from onnxruntime.transformers.optimizer import optimize_model

    logger = logging.getLogger("onnxruntime.transformers")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        # opt_level 0: ONNX Runtime's own constant folding first would fold the rotary sin/cos subgraph
        # RotaryEmbedding is matched from
        optimized = optimize_model(model, model_type=family.ort_model_type, num_heads=heads, hidden_size=hidden,
                                   optimization_options=_fusion_options(cfg, family), opt_level=0,
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

    A causal LM (``*ForCausalLM`` in ``config.json``) is checked as a decoder: prefills, decode steps on the
    returned cache and greedy generation (:mod:`.decoder`).

    Raises:
        ConfigError: not an ONNX folder, a truncated file, an unreadable config, a model type without known
            fusions.
        ModelLoadError: no tokenizer files beside a graph for the CPU (its parity check needs them).
        ExportError: the optimised graph lost its factorisation.
        FusionLossError: it has fewer fused operators than its dense-structured reference, unless
            ``cfg.allow_fusion_loss``.
        ParityError: the optimised graph disagrees with the unoptimised one (CPU; CUDA graphs are not run here).
    """
    src = Path(onnx_dir)
    scheme = ((read_manifest(src) or {}).get("quantization") or {}).get("scheme")
    if scheme is not None:  # before the checker, which knows none of the contrib operators it wrote
        raise ConfigError(f"{src} is quantised already ({scheme}); give the float folder written by "
                          "'fwsvd-deploy export'")
    model = load_onnx(src)
    check_output_dir(out_dir, overwrite, inputs=[src])
    config = _read_config(src)
    family = _family(config)
    heads, hidden = _heads_and_hidden(config)
    check_quantizable(model, cfg, hidden)
    decoder = is_causal_lm(config)
    upstream = read_manifest(src) or {}
    layout = CacheLayout.from_dict(upstream["kv_cache"]) if upstream.get("kv_cache") else None
    serve = cfg.genai is True or (cfg.genai is None and decoder and layout is not None)
    if cfg.genai is True:
        check_servable(config, layout, str(src))
    tokenizer = load_tokenizer(str(src)) if cfg.device == "cpu" else None
    if decoder and tokenizer is not None:
        check_positions(config, cfg.validate_shapes, tokenizer, str(src))
    start = time.perf_counter()
    pairs = len(find_pairs(inline_identities(model)))
    # a decoder's weights wait in a file while the passes rewrite its graph (only its small tensors stay in
    # memory); the quantiser reads every weight, and encoders' attention fusion concatenates q/k/v weights
    offload = decoder and cfg.level != "O1" and cfg.quantize is None
    if not offload:
        load_external_data_for_model(model, str(src))
    resplit = 0
    if cfg.quantize is not None:
        model, resplit = resplit_factors(model, cfg.factor_split)
    with atomic_output_dir(out_dir, overwrite, inputs=[src]) as tmp:
        store = WeightStore(tmp / ".weights") if offload else None
        if store is not None:
            store.offload(model, src)
        reference_fusions = None
        attention = None
        if cfg.level == "O1":
            optimized = model  # basic rewrites happen when the session loads the graph (see below)
        else:  # each stage's input is let go as soon as the next exists: one or two copies of the graph at a time
            dense, index = densify(model, store)
            del model
            release_memory()
            if decoder:
                dense = constants_to_initializers(dense)
            fused = _ort_optimize(dense, cfg, family, heads, hidden)
            del dense
            release_memory()
            if decoder and family.fuse_attention:
                fused, attention = _fuse_attention(fused, cfg, config, heads)
            if len(index):
                reference_fusions = fusion_counts(fused)
                optimized = restore(fused, index, store)
            else:
                optimized = fused
            del fused, index
            release_memory()
        if store is not None and (cfg.pack_matmuls != "none" or cfg.fp16):
            store.load_all(optimized)  # both read and rewrite weights
        packed = 0
        if cfg.pack_matmuls != "none":  # the config refuses it at O1 and with dynamic int8
            optimized, packed = pack_shared_inputs(optimized, cfg.pack_matmuls)
        if cfg.fp16:
            from onnxruntime.transformers.onnx_model import OnnxModel

            wrapper = OnnxModel(optimized)
            # a decoder's KV cache stays float16 in and out (no Cast on past or present, half the cache's memory);
            # float inputs and outputs otherwise stay float32, with their Casts at the graph's edge
            cached = any(i.name.startswith("past_key_values.") for i in optimized.graph.input)
            keep = [o.name for o in optimized.graph.output if not o.name.startswith("present.")] if cached else True
            wrapper.convert_float_to_float16(keep_io_types=keep)
            optimized = wrapper.model
        path = tmp / ONNX_FILE
        if store is not None and cfg.pack_matmuls == "none" and not cfg.fp16:
            large = store.save(optimized, path, f"{ONNX_FILE}_data")  # one tensor in memory at a time
        else:
            large = optimized.ByteSize() > 2**31 - 1000
            if cfg.level == "O1":
                source = src / ONNX_FILE
                if resplit:  # the rewrites start from the re-split factors
                    source = tmp / "resplit.onnx"
                    onnx.save_model(optimized, str(source), save_as_external_data=large,
                                    location="resplit.onnx_data")
                _basic_rewrites(source, path)
                for item in tmp.glob("resplit.onnx*"):
                    item.unlink()
                optimized = onnx.load(str(path))
            else:
                onnx.save_model(optimized, str(path), save_as_external_data=large, location=f"{ONNX_FILE}_data")
        if store is not None:
            shutil.rmtree(store.directory)
        quantization = None
        if cfg.quantize is not None:
            optimized, quantization = quantize_graph(optimized, cfg, tmp)
            path.unlink()
            for data in tmp.glob(f"{ONNX_FILE}_data"):
                data.unlink()
            onnx.save_model(optimized, str(path), save_as_external_data=large, location=f"{ONNX_FILE}_data")
        for item in src.iterdir():
            if item.is_file() and item.suffix in _COPY_SUFFIXES and item.name not in ("manifest.json", GENAI_FILE):
                shutil.copy(item, tmp / item.name)
        genai = None
        if serve:
            genai = write_genai_config(tmp, config, layout, [i.name for i in optimized.graph.input],
                                       device=cfg.device)
        fusions = fusion_counts(optimized)
        operators, fused_operators = operator_counts(optimized), fused_operator_counts(optimized)
        del optimized  # written; the parity check's sessions read the file
        release_memory()
        if not fusions_complete(fusions, reference_fusions) and not cfg.allow_fusion_loss:
            raise FusionLossError(
                f"the optimised graph lost fused operators: {_fusion_gap(fusions, reference_fusions)} fewer than "
                "its dense-structured reference; report it, or pass --allow-fusion-loss to keep the graph anyway"
            )
        parity = None
        parity_note = None
        if tokenizer is not None and decoder:
            parity = optimised_parity(src / ONNX_FILE, path, tokenizer, cfg)
        elif tokenizer is not None:
            reference = make_session(src / ONNX_FILE, "cpu")
            candidate = make_session(path, "cpu")
            parity = parity_report(
                candidate, tokenizer, lambda inputs, names: run_session(reference, inputs), cfg.validate_shapes,
                cfg.lossy_atol,
                what=f"{cfg.quantize} vs float32 ONNX" if cfg.quantize else "optimised vs unoptimised ONNX",
            )
        else:
            parity_note = "not run here: a CUDA graph is checked on a CUDA machine (fwsvd-deploy validate)"
        seconds = time.perf_counter() - start
        result = OptimizeResult(Path(out_dir), Path(out_dir) / ONNX_FILE, fusions, reference_fusions,
                                operators, pairs, parity, seconds, attention, quantization,
                                None if genai is None else Path(out_dir) / genai.name, packed)
        write_manifest(tmp, {
            "kind": "onnx-optimized",
            "input": {"path": str(src), "fingerprint": folder_fingerprint(src),
                      "export": upstream.get("settings"), "compressed": upstream.get("input", {}).get("compressed")},
            "settings": cfg.to_dict() | {"model_type": config.model_type, "ort_model_type": family.ort_model_type,
                                         "num_heads": heads, "hidden_size": hidden},
            "low_rank_layers": pairs,
            "fusions": fusions,
            "fused_operators": fused_operators,
            "reference_fusions": reference_fusions,
            "fusions_complete": result.fusions_complete,
            "allow_fusion_loss": cfg.allow_fusion_loss,
            "operators": result.operators,
            "packed_matmuls": packed,
            "attention_fusion": attention.to_dict() if attention is not None else None,
            "quantization": quantization.to_dict() if quantization is not None else None,
            "kv_cache": (dataclasses.replace(layout, dtype_bytes=2).to_dict() if cfg.fp16 and layout is not None
                         else upstream.get("kv_cache")),
            "genai_config": None if genai is None else genai.name,
            "artifacts": {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.suffix in (".onnx", ".onnx_data")},
            "parity": parity,
            "parity_note": parity_note,
            "seconds": seconds,
        })
    if not result.fusions_complete:
        logging.getLogger("fwsvd_deploy").warning("the optimised graph lost fused operators (%s), allowed by "
                                                  "allow_fusion_loss", _fusion_gap(fusions, reference_fusions))
    return result


def _fuse_attention(model: onnx.ModelProto, cfg: OptimizeConfig, config: Any,
                    heads: int) -> tuple[onnx.ModelProto, AttentionFusion]:
    blocker = attention_blocker(config, cfg.device, cfg.fuse_attention, cfg.fp16)
    if blocker is not None:
        return model, AttentionFusion(0, attention_blocks(model), blocker)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    fused, attention = fuse_decoder_attention(model, num_heads=heads, num_kv_heads=int(kv_heads),
                                              padding=attention_padding(cfg.device))
    if attention.note is not None:
        logging.getLogger("fwsvd_deploy").warning("attention not fused: %s", attention.note)
    elif attention.fused < attention.blocks:
        logging.getLogger("fwsvd_deploy").warning("%d of %d attention blocks fused; the others did not match the "
                                                  "exported rotary form", attention.fused, attention.blocks)
    return fused, attention


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
