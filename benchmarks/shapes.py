"""Decoders of published architectures with random weights, for speed at the sizes users compress.

Speed does not depend on the values of the weights, only on the shapes of the graph, so a decoder is built from
the numbers of its public ``config.json`` (written out below) with seeded random weights, factorised with random
factors of the ranks a kept fraction gives, exported with its KV cache and optimised as ``fwsvd-deploy run`` does.

The ranks are uniform: every targeted layer keeps the same fraction of its parameters, ``rank = keep * m n / (m + n)``
(rounded down to a multiple of 8). The default ``loss`` allocation moves rank between layers, which changes which
MatMuls are thin but not the weight bytes a decode step reads, the figure a memory-bound step follows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# name -> (transformers config class, its fields from the model's published config.json). The 7 B shapes' vocabularies
# (32,000 and 32,768) are smaller than the SmolLM2 tokenizer's that the export parity checks use, so decode.py
# refuses them until a tokenizer of their own vocabulary is at hand.
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "smollm2-135m": ("LlamaConfig", {  # HuggingFaceTB/SmolLM2-135M-Instruct
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192, "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": True}),
    "qwen2.5-0.5b": ("Qwen2Config", {  # Qwen/Qwen2.5-0.5B-Instruct
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "sliding_window": None,
        "use_sliding_window": False}),
    "llama-3.2-1b": ("LlamaConfig", {  # meta-llama/Llama-3.2-1B-Instruct
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}}),
    "llama-2-7b": ("LlamaConfig", {  # meta-llama/Llama-2-7b-hf
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}),
    "mistral-7b": ("MistralConfig", {  # mistralai/Mistral-7B-Instruct-v0.3
        "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "sliding_window": None}),
}
ARCHITECTURES = {"LlamaConfig": "LlamaForCausalLM", "Qwen2Config": "Qwen2ForCausalLM",
                 "MistralConfig": "MistralForCausalLM"}


def shape_config(name: str) -> Any:
    import transformers

    cls, fields = SHAPES[name]
    config = getattr(transformers, cls)(**fields)
    config.architectures = [ARCHITECTURES[cls]]
    return config


def _block_dims(config: Any) -> tuple[int, int, int, int]:
    """Hidden size, MLP size, layers and the key/value width of a decoder's config."""
    h = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    return h, config.intermediate_size, config.num_hidden_layers, config.num_key_value_heads * head_dim


def _block_linears(config: Any) -> int:
    """Weights of one block's linear layers: q and o (h x h), k and v (h x kv), gate, up and down (h x i)."""
    h, i, _, kv = _block_dims(config)
    return 2 * h * h + 2 * h * kv + 3 * h * i


def parameters(config: Any) -> int:
    """Parameters of the decoder (tied embeddings counted once), from its config alone."""
    h, _, layers, _ = _block_dims(config)
    v = config.vocab_size
    return layers * (_block_linears(config) + 2 * h) + v * h * (1 if config.tie_word_embeddings else 2) + h


def calibration_bytes(config: Any) -> dict[str, int]:
    """What the one-pass calibration and compression hold, from the config alone (bytes): the float32 model, the
    Fisher of every block linear (float32, shaped like its weight: the Fisher pass), and one float64 input second
    moment per distinct input of a block (q, k and v share one, gate and up another: the input pass)."""
    h, i, layers, _ = _block_dims(config)
    block_moments = 8 * (3 * h * h + i * i)
    return {"model": 4 * parameters(config), "fisher": 4 * layers * _block_linears(config),
            "moments": layers * block_moments, "moments_one_block": block_moments}


def uniform_ranks(model: torch.nn.Module, keep: float, multiple: int = 8) -> dict[str, dict[str, Any]]:
    """A plan (:func:`fwsvd_deploy.compression.apply.apply_plan`) keeping ``keep`` of every targeted layer."""
    from fwsvd_deploy.compression.targets import resolve_targets

    plan = {}
    for t in resolve_targets(model):
        out_features, in_features = t.shape
        rank = max(multiple, int(keep * out_features * in_features / (out_features + in_features)) // multiple
                   * multiple)
        plan[t.name] = {"kind": t.kind, "rank": rank, "in_features": in_features, "out_features": out_features,
                        "bias": getattr(t.module, "bias", None) is not None}
    return plan


def build(name: str, keep: float | None, out: Path, tokenizer: Any, seed: int = 0) -> Path:
    """A saved random-weight decoder of shape ``name`` (factorised at ``keep``, dense for ``None``) in ``out``."""
    from transformers import AutoModelForCausalLM

    from fwsvd_deploy import save_compressed, save_model
    from fwsvd_deploy.compression.apply import apply_plan

    config = shape_config(name)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    if keep is None:
        save_model(model, out, tokenizer)
    else:
        apply_plan(model, uniform_ranks(model, keep))  # new factors, drawn as nn.Linear draws its weights
        save_compressed(model, out, tokenizer)
    return out
