"""The ONNX interface of a decoder language model with a KV cache, and the input checks made before measuring it.

Graphs exported for optimum's ``text-generation-with-past`` take ``input_ids``, ``attention_mask`` (over the past
and the new tokens), ``position_ids`` (most families) and ``past_key_values.N.key/value`` of shape
``(batch, kv_heads, past_length, head_dim)``; they return ``logits`` and ``present.N.key/value``, the past grown by
the new tokens. ONNX Runtime's optimised graphs keep that interface. A prefill is a call with an empty past
(``past_length`` 0); a decode step feeds one token per row and the previous call's presents as the past.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..families import family_of
from ..modeling import CAUSAL_LM_SUFFIXES

CAUSAL_LM_TASK = "text-generation-with-past"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
# config.json keys that bound the positions a model can attend over, by family (Llama/Mistral/Qwen2/OPT, GPT-2)
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def folder_config(folder: Path) -> dict[str, Any] | None:
    """``config.json`` of a model folder, or ``None`` when it has none or it is not a JSON object."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def architectures(config: dict[str, Any] | None) -> str:
    config = config or {}
    return ", ".join(config.get("architectures") or []) or f"a {config.get('model_type', 'model of unknown')} model"


def is_causal_lm_config(config: dict[str, Any] | None) -> bool:
    """Whether a config names a decoder language model (``*ForCausalLM``, GPT-2's ``*LMHeadModel``); a config that
    names no architecture (a model exported straight from its class) is judged by its family's role."""
    config = config or {}
    archs = config.get("architectures") or []
    if archs:
        return any(str(a).endswith(CAUSAL_LM_SUFFIXES) for a in archs)
    family = family_of(str(config.get("model_type")))
    return family is not None and family.role == "decoder"


def is_causal_lm_folder(folder: str | Path) -> bool:
    return is_causal_lm_config(folder_config(Path(folder)))


def max_positions(config: dict[str, Any]) -> int | None:
    """The most positions the model attends over, from its config; ``None`` when the config states no bound."""
    for key in POSITION_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_lengths(folder: Path, *, window: int | None = None, prompt_len: int | None = None,
                  new_tokens: int | None = None) -> int | None:
    """Refuse an evaluation window or a prompt plus its new tokens longer than the model's positions.

    Returns:
        The model's maximum positions, ``None`` when its config states none.

    Raises:
        ConfigError: naming the flag, the length and the limit.
    """
    limit = max_positions(folder_config(folder) or {})
    if limit is None:
        return None
    if window is not None and window > limit:
        raise ConfigError(f"--max-length {window} (the perplexity window) is longer than the {limit} positions of "
                          f"{folder} (config.json); use --max-length {limit} or less")
    if prompt_len is not None and new_tokens is not None and prompt_len + new_tokens > limit:
        raise ConfigError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} = {prompt_len + new_tokens} "
                          f"positions, more than the {limit} of {folder} (config.json); shorten the prompt or "
                          "generate fewer tokens")
    return limit


def check_pair_roles(baseline: Path, candidate: Path) -> bool:
    """Whether both folders hold causal language models; refuses a causal LM paired with another kind of model.

    Raises:
        ConfigError: one folder is a causal LM and the other is not.
    """
    configs = {role: folder_config(folder) for role, folder in (("baseline", baseline), ("candidate", candidate))}
    causal = {role: is_causal_lm_config(c) for role, c in configs.items()}
    if causal["baseline"] != causal["candidate"]:
        lm, other = ("baseline", "candidate") if causal["baseline"] else ("candidate", "baseline")
        folders = {"baseline": baseline, "candidate": candidate}
        raise ConfigError(f"{lm} {folders[lm]} is a causal language model ({architectures(configs[lm])}) but "
                          f"{other} {folders[other]} is {architectures(configs[other])}; validate compares two "
                          "models of one task")
    return causal["baseline"]


@dataclass(frozen=True)
class DecoderGraph:
    """What feeding a decoder's ONNX graph takes: its past inputs, their layout and which outputs refill them.

    Attributes:
        inputs: every input name of the graph.
        past: ``past_key_values.*`` input names, in graph order.
        presents: the ``present.*`` output name that feeds each past input on the next step.
        kv_heads / head_dim: the past's second and fourth dimensions, per past input.
        dtype: the past's element type (float32; float16 for fp16 graphs).
        vocab: the logits' last dimension.
    """

    inputs: tuple[str, ...]
    past: tuple[str, ...]
    presents: tuple[str, ...]
    kv_heads: tuple[int, ...]
    head_dim: tuple[int, ...]
    dtype: Any
    vocab: int

    @classmethod
    def from_session(cls, session: Any, folder: Path) -> DecoderGraph:
        """Read the interface from a session; symbolic head counts or sizes are taken from ``config.json``.

        Raises:
            ConfigError: a graph without a KV cache, without ``logits``, or with a past it does not return.
        """
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        past = tuple(n for n in inputs if n.startswith(PAST_PREFIX))
        if not past or "input_ids" not in inputs or "logits" not in outputs:
            raise ConfigError(f"{folder} is a causal language model exported without its KV cache (inputs "
                              f"{', '.join(list(inputs)[:4])}); export it with --task text-generation-with-past")
        presents = tuple(PRESENT_PREFIX + n[len(PAST_PREFIX):] for n in past)
        missing = [p for p in presents if p not in outputs]
        if missing:
            raise ConfigError(f"{folder} takes {past[0]} but returns no {missing[0]}; export it with "
                              "--task text-generation-with-past")
        config = folder_config(folder) or {}
        heads, dims = [], []
        for name in past:
            shape = inputs[name].shape
            if len(shape) != 4:
                raise ConfigError(f"{folder}: {name} has shape {shape}; expected (batch, heads, past, head_dim)")
            heads.append(shape[1] if isinstance(shape[1], int) else _config_kv_heads(config, folder))
            dims.append(shape[3] if isinstance(shape[3], int) else _config_head_dim(config, folder))
        kinds = sorted({inputs[name].type for name in past})
        dtype = _DTYPES.get(kinds[0]) if len(kinds) == 1 else None
        if dtype is None:
            raise ConfigError(f"{folder}: past inputs of type {', '.join(kinds)} are not supported; "
                              "float32 or float16 are")
        vocab = outputs["logits"].shape[-1]
        if not isinstance(vocab, int):
            vocab = int(config.get("vocab_size") or 0)
        if vocab <= 0:
            raise ConfigError(f"{folder}: the logits' vocabulary size is neither in the graph nor in config.json")
        return cls(tuple(inputs), past, presents, tuple(heads), tuple(dims), dtype, vocab)

    @property
    def layers(self) -> int:
        return len(self.past) // 2

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token of one sequence adds: every layer's key and value, all heads."""
        itemsize = np.dtype(self.dtype).itemsize
        return sum(h * d * itemsize for h, d in zip(self.kv_heads, self.head_dim, strict=True))

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {name: np.zeros((batch, h, 0, d), dtype=self.dtype)
                for name, h, d in zip(self.past, self.kv_heads, self.head_dim, strict=True)}

    def step_inputs(self, ids: np.ndarray, past_length: int) -> dict[str, np.ndarray]:
        """``input_ids``, ``attention_mask`` over past and new tokens, ``position_ids`` where the graph takes them.

        Every row is unpadded: positions run on from ``past_length``.
        """
        batch, length = ids.shape
        feed = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64),
                "attention_mask": np.ones((batch, past_length + length), dtype=np.int64)}
        if "position_ids" in self.inputs:
            positions = np.arange(past_length, past_length + length, dtype=np.int64)
            feed["position_ids"] = np.ascontiguousarray(np.broadcast_to(positions, (batch, length)))
        return feed

    def prefill_feed(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """A forward over whole sequences ``ids`` (batch, length) with an empty past."""
        return {**self.step_inputs(ids, 0), **self.empty_past(ids.shape[0])}

    def signature(self) -> tuple[Any, ...]:
        """What two graphs must share to be compared: layers, KV layout and vocabulary."""
        return self.past, self.kv_heads, self.head_dim, self.vocab


def check_same_interface(graphs: dict[str, DecoderGraph], folders: dict[str, Path]) -> None:
    """Refuse a baseline and candidate that differ in layers, KV-cache layout or vocabulary."""
    (a, ga), (b, gb) = graphs.items()
    if ga.vocab != gb.vocab:
        raise ConfigError(f"{a} {folders[a]} has a vocabulary of {ga.vocab} and {b} {folders[b]} of {gb.vocab}; "
                          "compare models of one family and tokenizer")
    if ga.signature() != gb.signature():
        raise ConfigError(f"{a} {folders[a]} has {ga.layers} layers with key/value heads {sorted(set(ga.kv_heads))} "
                          f"x {sorted(set(ga.head_dim))} and {b} {folders[b]} {gb.layers} with "
                          f"{sorted(set(gb.kv_heads))} x {sorted(set(gb.head_dim))}; compare models of one family")


def _config_kv_heads(config: dict[str, Any], folder: Path) -> int:
    for key in ("num_key_value_heads", "num_attention_heads", "n_head"):
        if isinstance(config.get(key), int):
            return int(config[key])
    raise ConfigError(f"{folder}: the past's head count is symbolic and config.json does not state it")


def _config_head_dim(config: dict[str, Any], folder: Path) -> int:
    if isinstance(config.get("head_dim"), int):
        return int(config["head_dim"])
    hidden = config.get("hidden_size") or config.get("n_embd")
    heads = config.get("num_attention_heads") or config.get("n_head")
    if isinstance(hidden, int) and isinstance(heads, int) and heads:
        return hidden // heads
    raise ConfigError(f"{folder}: the past's head size is symbolic and config.json does not state it")
