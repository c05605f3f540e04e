"""Model families in one table: how their blocks are laid out and how ONNX Runtime optimises them.

Adding a family is one row here plus a tiny-config test row. Compression reads ``qkv`` (which sibling layers are an
attention block's query, key and value) and ``fused_qkv``; the exporters read ``role``, ``ort_model_type`` (the
model type given to ONNX Runtime's transformer optimiser, ``None`` when it has no fusions for the family) and
``attention``.
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
    """

    model_type: str
    role: str
    qkv: tuple[str, str, str] | None
    fused_qkv: str | None
    attention: str
    ort_model_type: str | None


_BERT_QKV = ("query", "key", "value")
_PROJ_QKV = ("q_proj", "k_proj", "v_proj")

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("bert", "encoder", _BERT_QKV, None, "mha", "bert"),
    Family("roberta", "encoder", _BERT_QKV, None, "mha", "bert"),
    Family("electra", "encoder", _BERT_QKV, None, "mha", "bert"),
    Family("albert", "encoder", _BERT_QKV, None, "mha", "bert"),
    Family("distilbert", "encoder", ("q_lin", "k_lin", "v_lin"), None, "mha", "bert"),
    Family("gpt2", "decoder", None, "c_attn", "mha", "gpt2"),
    Family("llama", "decoder", _PROJ_QKV, None, "gqa", "gpt2"),
    Family("mistral", "decoder", _PROJ_QKV, None, "gqa", "gpt2"),
    Family("qwen2", "decoder", _PROJ_QKV, None, "gqa", "gpt2"),
    Family("opt", "decoder", _PROJ_QKV, None, "mha", "gpt2"),
)}

# Every query/key/value naming the table knows, for models whose family is not in it.
QKV_NAMES: tuple[tuple[str, str, str], ...] = tuple(dict.fromkeys(f.qkv for f in FAMILIES.values() if f.qkv))


def family_of(config: Any) -> Family | None:
    """The family of a transformers config (or of its ``model_type`` string), ``None`` when not in the table."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    return FAMILIES.get(str(model_type))


def supported(role: str) -> list[str]:
    """Model types of one role, for error messages."""
    return sorted(f.model_type for f in FAMILIES.values() if f.role == role)
