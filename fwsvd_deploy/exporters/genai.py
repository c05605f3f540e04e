"""What onnxruntime-genai needs to serve an optimised decoder: ``genai_config.json`` beside ``model.onnx``.

onnxruntime-genai (``onnxruntime_genai.Model(folder)``) reads one JSON file that names the graph, its inputs
and outputs (``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.%d.key`` / ``.value``,
``logits``, ``present.%d.key`` / ``.value``: the names optimum-onnx writes, which are also genai's own), the
cache's shape (layers, key/value heads, head size), the special tokens and the search defaults. The tokenizer
files already sit in the folder. The graph itself is left as it is: genai feeds it a cache that grows by one
position per step (``past_present_share_buffer: false``), which is what our graphs take on every provider. CPU
graphs mask padding with a bias that genai's shared max-length buffer would not fill in; the CUDA float16 graphs
(attention fused with lengths) could share one, but genai on CUDA has not been run against them, so none is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..modeling import is_causal_lm
from .decoder import CacheLayout

GENAI_FILE = "genai_config.json"
# genai's decoder model types for our families; any other decoder is served as its generic "decoder".
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
_PROVIDERS = {"cpu": [], "cuda": [{"cuda": {}}], "tensorrt": [{"NvTensorRtRtx": {}}]}
_SEARCH_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}


def _token_id(value: Any) -> Any:
    """A token id as genai reads it: an int, a list of ints (several EOS tokens), or ``-1`` when unset."""
    if value is None:
        return -1
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value] if len(value) != 1 else int(value[0])
    return int(value)


def _generation_defaults(folder: Path) -> dict[str, Any]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_servable(config: Any, layout: CacheLayout | None, name: str) -> None:
    """Refuse a genai config for what genai cannot serve: an encoder, or a decoder exported without its cache.

    Raises:
        ConfigError: naming the folder and what to export instead.
    """
    if not is_causal_lm(config):
        architectures = getattr(config, "architectures", None) or []
        raise ConfigError(f"{name} is not a decoder ({', '.join(architectures) or config.model_type}); "
                          "onnxruntime-genai serves causal LMs only: drop genai for an encoder")
    if layout is None:
        raise ConfigError(f"{name} was exported without its KV cache; onnxruntime-genai needs it: export with "
                          "--task text-generation-with-past")


def genai_config(config: Any, layout: CacheLayout, graph_inputs: list[str], *, device: str = "cpu",
                 filename: str = "model.onnx", generation: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``genai_config.json`` object for a decoder graph.

    Args:
        config: the model's transformers config (``config.json``).
        layout: the graph's cache, read from its inputs (:func:`.decoder.cache_layout`).
        graph_inputs: the graph's input names (``position_ids`` is declared only when the graph takes it).
        device: the provider the graph was optimised for; genai opens the session on it.
        filename: the graph's file in the folder.
        generation: ``generation_config.json``'s values (special tokens, search defaults), when there is one.
    """
    generation = generation or {}
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in graph_inputs:
        inputs["position_ids"] = "position_ids"
    inputs |= {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    outputs = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}

    def special(key: str) -> Any:
        return _token_id(generation.get(key, getattr(config, key, None)))

    search = {key: default if generation.get(key) is None else generation[key]
              for key, default in _SEARCH_DEFAULTS.items()}
    return {
        "model": {
            "bos_token_id": special("bos_token_id"),
            "eos_token_id": special("eos_token_id"),
            "pad_token_id": _pad_id(generation, config),
            "context_length": int(context),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": _PROVIDERS[device]},
                "filename": filename,
                "head_size": layout.head_dim,
                "hidden_size": int(hidden),
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": int(heads),
                "num_hidden_layers": layout.num_layers,
                "num_key_value_heads": layout.num_kv_heads,
            },
            "type": GENAI_TYPES.get(config.model_type, "decoder"),
            "vocab_size": int(config.vocab_size),
        },
        "search": {
            **search,
            "diversity_penalty": 0.0,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": int(context),
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
        },
    }


def _pad_id(generation: dict[str, Any], config: Any) -> Any:
    """The padding id; a model without one pads with its (first) EOS token, as transformers' generate does."""
    pad = generation.get("pad_token_id", getattr(config, "pad_token_id", None))
    if pad is None:
        pad = generation.get("eos_token_id", getattr(config, "eos_token_id", None))
    value = _token_id(pad)
    return value[0] if isinstance(value, list) else value


def write_genai_config(folder: Path, config: Any, layout: CacheLayout, graph_inputs: list[str], *,
                       device: str = "cpu") -> Path:
    """Write ``genai_config.json`` into ``folder`` (an output folder being built) and return its path."""
    data = genai_config(config, layout, graph_inputs, device=device, generation=_generation_defaults(folder))
    path = Path(folder) / GENAI_FILE
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def genai_greedy(folder: Path, prompt: list[int], new_tokens: int) -> tuple[list[int], np.ndarray]:
    """Greedy generation by onnxruntime-genai from a served folder, one prompt: the new tokens, and the logits
    ``(new_tokens, vocab)`` each was chosen from.

    Raises:
        ConfigError: onnxruntime-genai is not installed (the ``genai`` extra).
    """
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise ConfigError("onnxruntime-genai is not installed; pip install 'fwsvd-deploy[genai]' (or "
                          "onnxruntime-genai-cuda on a CUDA machine)") from exc
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    tokens, logits = [], []
    while not generator.is_done():
        generator.generate_next_token()  # the logits it chose from stay readable until the next step
        tokens.append(int(generator.get_next_tokens()[0]))
        step = generator.get_output("logits")
        logits.append(step.reshape(-1, step.shape[-1])[-1].astype(np.float32))
    return tokens, np.stack(logits)
