"""Model families in one table: how their blocks are laid out and how ONNX Runtime optimises them.

Adding a family is one row here plus a tiny-config test row. Compression reads ``qkv`` (which sibling layers are an
attention block's query, key and value) and ``fused_qkv``; the exporters read ``role``, ``ort_model_type`` (the
model type given to ONNX Runtime's transformer optimiser, ``None`` when it has no fusions for the family),
``attention`` and ``fusions``.

Decoders are optimised as ONNX Runtime optimises its own Llama exports, with model type ``gpt2``: its GPT-2 class
also turns Conv1D's ``Reshape -> Gemm -> Reshape`` back into a 3-D MatMul and Add, which the ``bert`` class leaves.
``fusions`` lists the kinds of fused operator the family's optimised graph carries (LayerNormalization comes from
the exporter itself; ONNX Runtime builds the rest), and only the passes that build them run: every other pass
walks the whole graph and finds nothing, seconds each on SmolLM2's 7,400 nodes.

ONNX Runtime fuses no attention in these graphs. The exporter writes attention as PyTorch's scaled-dot-product
attention: ``MatMul(Where(IsNaN(Softmax(Add(MatMul(Mul(q, s), Mul(kT, s)), mask))), 0, Softmax(...)), v)`` (the
scale split over q and k, fully masked rows zeroed), and ONNX Runtime's decoder attention matcher
(``FusionRotaryAttention``) wants ``Softmax <- Add <- Div <- MatMul`` right under the attention-times-value MatMul.
For the rotary families (``fuse_attention``) fwsvd-deploy fuses it itself, into ``GroupQueryAttention``, on the
CPU and on CUDA in float16 (:mod:`fwsvd_deploy.exporters.attention`). OPT normalises a ``Reshape`` of the residual
sum, so its Add and LayerNormalization stay apart: ONNX Runtime fuses nothing in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    """One architecture family.

    Attributes:
        model_type: ``config.model_type``.
        role: ``encoder`` (bidirectional, task heads) or ``decoder`` (causal language model with a KV cache).
        qkv: child names of the query, key and value projections of one attention block, or ``None`` when they are
            one fused layer (``fused_qkv``).
        fused_qkv: the child name of a fused q/k/v projection (GPT-2's ``c_attn``), else ``None``.
        attention: ``mha`` (as many key/value heads as query heads) or ``gqa`` (grouped-query attention: fewer
            key/value heads, so k and v are narrower than q).
        ort_model_type: ``onnxruntime.transformers.optimizer`` model type, ``None`` when unsupported.
        fusions: fused-operator kinds (keys of ``exporters.optimize.FUSION_GROUPS``) ONNX Runtime's optimiser builds
            in the family's graph; it then runs only the passes that build them. ``None``: every pass of the model type.
        fuse_attention: the exported rotary attention is fused into ``GroupQueryAttention`` after ONNX Runtime's
            passes (CPU graphs; :mod:`fwsvd_deploy.exporters.attention`).
        blocks: the name suffix of the ``ModuleList`` holding the transformer blocks in depth order, which
            sequential calibration walks; ``None`` where the blocks share weights (ALBERT runs one layer group at
            every depth, so no block can be fitted to its own inputs).
    """

    model_type: str
    role: str
    qkv: tuple[str, str, str] | None
    fused_qkv: str | None
    attention: str
    ort_model_type: str | None
    fusions: tuple[str, ...] | None = None
    fuse_attention: bool = False
    blocks: str | None = None


_BERT_QKV = ("query", "key", "value")
_PROJ_QKV = ("q_proj", "k_proj", "v_proj")
_RMS_ROPE = ("simplified_layer_norm", "skip_simplified_layer_norm", "rotary_embedding")

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("bert", "encoder", _BERT_QKV, None, "mha", "bert", blocks="encoder.layer"),
    Family("roberta", "encoder", _BERT_QKV, None, "mha", "bert", blocks="encoder.layer"),
    Family("electra", "encoder", _BERT_QKV, None, "mha", "bert", blocks="encoder.layer"),
    Family("albert", "encoder", _BERT_QKV, None, "mha", "bert"),
    Family("distilbert", "encoder", ("q_lin", "k_lin", "v_lin"), None, "mha", "bert", blocks="transformer.layer"),
    Family("gpt2", "decoder", None, "c_attn", "mha", "gpt2", ("layer_norm", "skip_layer_norm", "gelu"), blocks="h"),
    Family("llama", "decoder", _PROJ_QKV, None, "gqa", "gpt2", _RMS_ROPE, fuse_attention=True, blocks="layers"),
    Family("mistral", "decoder", _PROJ_QKV, None, "gqa", "gpt2", _RMS_ROPE, fuse_attention=True, blocks="layers"),
    Family("qwen2", "decoder", _PROJ_QKV, None, "gqa", "gpt2", _RMS_ROPE, fuse_attention=True, blocks="layers"),
    Family("opt", "decoder", _PROJ_QKV, None, "mha", "gpt2", ("layer_norm",), blocks="decoder.layers"),
)}

# Every query/key/value naming the table knows, for models whose family is not in it.
QKV_NAMES: tuple[tuple[str, str, str], ...] = tuple(dict.fromkeys(f.qkv for f in FAMILIES.values() if f.qkv))


def family_of(config: Any) -> Family | None:
    """The family of a transformers config (or of its ``model_type`` string), ``None`` when not in the table."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    return FAMILIES.get(str(model_type))


def supported(role: str | None = None) -> list[str]:
    """Model types of one role (of every role when ``None``), for error messages."""
    return sorted(f.model_type for f in FAMILIES.values() if role is None or f.role == role)


def optimisable() -> list[str]:
    """Model types ONNX Runtime's transformer optimiser is run for."""
    return sorted(f.model_type for f in FAMILIES.values() if f.ort_model_type is not None)
