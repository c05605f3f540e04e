"""Decoder language models in ONNX: what their graphs look like, and the parity checks that gate them.

A causal LM exports through optimum-onnx as one graph, ``model.onnx``. It takes ``input_ids``,
``attention_mask`` (over the cache and the new tokens), ``position_ids`` (every supported family but OPT, which
derives positions from the mask) and, for ``text-generation-with-past``, the cache of the previous steps,
``past_key_values.N.key`` / ``.value`` of shape ``[batch, kv_heads, past, head_dim]``; it returns ``logits`` and
the updated cache, ``present.N.key`` / ``.value``. ``ORTModelForCausalLM`` loads the folder as written.

Parity (:func:`decoder_parity`) compares two decoders (ONNX Runtime against PyTorch after export; the optimised
graph against the unoptimised one) on what generation does with them:

1. a prefill of each validation shape (batch x sequence; the export itself traced batch 2 x 16), rows
   left-padded to different lengths: logits, and the returned cache, on real tokens;
2. :data:`DECODE_STEPS` decode steps of one token each, every model fed with the cache it returned itself;
3. greedy generation of :data:`GREEDY_TOKENS` new tokens from :data:`PARITY_PROMPTS` (one left-padded batch),
   every model choosing its own next token.

A float32 graph must agree to ``atol`` everywhere and generate the very same tokens. A lossy graph (int8
weights) is held to a floor on the logits' signal-to-noise ratio and on top-1 agreement over every compared
position; its greedy tokens are reported but not gated, since one different token sends free-running generation
down another path.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..config import ExportConfig, OptimizeConfig
from ..errors import ConfigError, ExportError, ParityError
from ..modeling import is_causal_lm, is_compressed, load_causal_lm, load_config
from .runtime import make_session, run_session, session_input_names, session_output_names

DECODER_TASKS = ("text-generation", "text-generation-with-past")
DECODE_STEPS = 3
GREEDY_TOKENS = 32
PARITY_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "To make a good cup of tea, you first",
)
# Prose for the prefill rows, which are cut from it at different offsets and lengths.
_PROSE = (
    "The river rises in the hills to the north and runs for two hundred miles before it reaches the sea. "
    "For most of its length it is slow and wide, and the towns along its banks grew up around the bridges, "
    "the mills and the markets that the water made possible. In the spring, when the snow melts, it can rise "
    "by several feet in a single night, and the old stone walls along the quays still carry the marks of the "
    "great floods. Fishermen, ferrymen and merchants once made their living from it; today most of the boats "
    "carry visitors, and the warehouses have become shops, studios and flats."
)
_SQNR_CAP_DB = 300.0  # identical logits have an infinite ratio; reports carry this instead


@dataclass(frozen=True)
class CacheLayout:
    """The key/value cache of an exported decoder, read from its graph's inputs.

    Attributes:
        past_inputs: the cache inputs, ``past_key_values.N.key`` / ``.value`` in layer order.
        present_outputs: the matching outputs, ``present.N.key`` / ``.value``.
        num_kv_heads: key/value heads (fewer than the query heads under grouped-query attention).
        head_dim: size of one head.
        dtype_bytes: bytes per cached number (4: float32; 2 in the manifest of a float16 graph, whose cache is
            float16 in and out).
    """

    past_inputs: tuple[str, ...]
    present_outputs: tuple[str, ...]
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 4

    @property
    def num_layers(self) -> int:
        return len(self.past_inputs) // 2

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token adds: keys and values of every layer."""
        return len(self.past_inputs) * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the derived ``num_layers`` and ``bytes_per_token`` (what ``manifest.json`` carries)."""
        data = asdict(self) | {"num_layers": self.num_layers, "bytes_per_token": self.bytes_per_token}
        return data | {k: list(data[k]) for k in ("past_inputs", "present_outputs")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheLayout:
        """The layout recorded by :meth:`to_dict` (derived keys are recomputed, not read)."""
        return cls(tuple(data["past_inputs"]), tuple(data["present_outputs"]), int(data["num_kv_heads"]),
                   int(data["head_dim"]), int(data["dtype_bytes"]))


def _cache_key(name: str) -> tuple[int, int]:
    parts = name.split(".")
    return int(parts[-2]), 0 if parts[-1] == "key" else 1


def cache_layout(session: Any) -> CacheLayout | None:
    """The cache of an ONNX Runtime session's graph, ``None`` when it takes none (``text-generation``).

    Raises:
        ExportError: cache inputs without matching outputs, or without static head dimensions.
    """
    inputs = {i.name: i for i in session.get_inputs()}
    past = sorted((n for n in inputs if n.startswith("past_key_values.")), key=_cache_key)
    if not past:
        return None
    outputs = set(session_output_names(session))
    present = [n.replace("past_key_values.", "present.", 1) for n in past]
    missing = [n for n in present if n not in outputs]
    if missing:
        raise ExportError(f"the graph takes {past[0]} but returns no {missing[0]}; it is not a KV-cache decoder")
    shape = inputs[past[0]].shape
    if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise ExportError(f"{past[0]} has shape {shape}; expected [batch, kv_heads, past, head_dim]")
    dtype_bytes = 2 if "float16" in inputs[past[0]].type else 4
    return CacheLayout(tuple(past), tuple(present), int(shape[1]), int(shape[3]), dtype_bytes)


class Decoder(Protocol):
    """One side of a comparison: runs a prefill, then one step at a time on the state it returned."""

    def start(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, Any]:
        """Logits ``(batch, sequence, vocab)`` of a prefill, and the state to continue from."""
        ...

    def advance(self, state: Any, ids: np.ndarray, mask: np.ndarray,
                positions: np.ndarray) -> tuple[np.ndarray, Any]:
        """Logits of the new tokens ``ids`` given the full ``mask`` (past and new), and the new state."""
        ...

    def cache(self, state: Any) -> list[np.ndarray] | None:
        """The cache held in ``state`` (keys and values of every layer, in order), when there is one."""
        ...


class OnnxDecoder:
    """An ONNX Runtime session of an exported decoder, with or without a KV cache."""

    def __init__(self, session: Any) -> None:
        names = session_input_names(session)
        if "input_ids" not in names or "logits" not in session_output_names(session):
            raise ExportError(f"the graph has inputs {names} and outputs {session_output_names(session)}; a "
                              "decoder graph takes input_ids and returns logits")
        self.session = session
        self.inputs = set(names)
        self.layout = cache_layout(session)
        self.takes_positions = "position_ids" in self.inputs

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
             past: list[np.ndarray] | None) -> dict[str, np.ndarray]:
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        feed = {k: v.astype(np.int64) for k, v in feed.items() if k in self.inputs}
        if self.layout is not None:
            assert past is not None
            feed.update(zip(self.layout.past_inputs, past, strict=True))
        return run_session(self.session, feed)

    def start(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, Any]:
        if self.layout is None:
            out = self._run(ids, mask, positions, None)
            return out["logits"], (ids, positions)
        empty = np.zeros((ids.shape[0], self.layout.num_kv_heads, 0, self.layout.head_dim), np.float32)
        out = self._run(ids, mask, positions, [empty] * len(self.layout.past_inputs))
        return out["logits"], [out[n] for n in self.layout.present_outputs]

    def advance(self, state: Any, ids: np.ndarray, mask: np.ndarray,
                positions: np.ndarray) -> tuple[np.ndarray, Any]:
        if self.layout is None:  # no cache: run the whole sequence again and keep the new tokens' logits
            all_ids, all_positions = np.concatenate([state[0], ids], 1), np.concatenate([state[1], positions], 1)
            out = self._run(all_ids, mask, all_positions, None)
            return out["logits"][:, -ids.shape[1]:], (all_ids, all_positions)
        out = self._run(ids, mask, positions, state)
        return out["logits"], [out[n] for n in self.layout.present_outputs]

    def cache(self, state: Any) -> list[np.ndarray] | None:
        return state if self.layout is not None else None


class TorchDecoder:
    """A PyTorch causal LM with its own KV cache (transformers' ``DynamicCache``).

    ``positions`` says whether to pass ``position_ids``: only when the graph it is compared with takes them
    (OPT's graph does not; the model then derives them from the mask, as its graph does).
    """

    def __init__(self, model: torch.nn.Module, positions: bool) -> None:
        self.model = model
        self.positions = positions

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: Any) -> tuple[np.ndarray, Any]:
        kwargs: dict[str, Any] = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                                  "past_key_values": past, "use_cache": True}
        if self.positions:
            kwargs["position_ids"] = torch.from_numpy(positions)
        with torch.no_grad():
            out = self.model(**kwargs)
        return out.logits.float().numpy(), out.past_key_values

    def start(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, Any]:
        return self._run(ids, mask, positions, None)

    def advance(self, state: Any, ids: np.ndarray, mask: np.ndarray,
                positions: np.ndarray) -> tuple[np.ndarray, Any]:
        return self._run(ids, mask, positions, state)

    def cache(self, state: Any) -> list[np.ndarray] | None:
        return [t.float().numpy() for layer in state.to_legacy_cache() for t in layer]


@dataclass(frozen=True)
class Tolerance:
    """What two decoders must satisfy: ``atol`` (float32), or the two floors of a lossy graph.

    Attributes:
        atol: largest absolute logit (and cache) difference; greedy generation must also be token-identical.
        min_sqnr_db: lossy graphs: floor on ``10 log10(sum ref^2 / sum (got - ref)^2)`` over the compared logits.
        min_agreement: lossy graphs: floor on the share of compared positions whose top-1 token agrees.
    """

    atol: float | None = None
    min_sqnr_db: float | None = None
    min_agreement: float | None = None

    def __post_init__(self) -> None:
        lossy = self.min_sqnr_db is not None and self.min_agreement is not None
        if (self.atol is None) == (not lossy):
            raise ConfigError("a decoder tolerance is either atol, or min_sqnr_db with min_agreement")

    @property
    def lossy(self) -> bool:
        return self.atol is None


def _prose_tokens(tokenizer: Any) -> list[int]:
    return list(tokenizer(_PROSE, add_special_tokens=False)["input_ids"])


def pad_id(tokenizer: Any) -> int:
    """Padding id for left-padded batches (the value is masked out; the end-of-sequence id when there is none)."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if value is not None:
            return int(value)
    return 0


def left_pad(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` and ``attention_mask`` of token rows padded on the left to the longest."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask


def positions_of(mask: np.ndarray) -> np.ndarray:
    """Position ids of a left-padded batch, as transformers' generation makes them (padding at 1)."""
    return np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1).astype(np.int64)


def _next_positions(mask: np.ndarray, new: int) -> np.ndarray:
    return (mask.sum(axis=1, keepdims=True) - new + np.arange(new)[None, :]).astype(np.int64)


def prefill_rows(tokenizer: Any, batch: int, sequence: int) -> tuple[np.ndarray, np.ndarray]:
    """Real-text rows for a prefill of ``batch x sequence``: row ``i`` has ``sequence - 3i`` tokens (at least 2)."""
    stream = _prose_tokens(tokenizer)
    rows = []
    for i in range(batch):
        length, start = max(2, sequence - 3 * i), 7 * i
        rows.append([stream[(start + j) % len(stream)] for j in range(length)])
    return left_pad(rows, pad_id(tokenizer))


def prompt_rows(tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """:data:`PARITY_PROMPTS`, tokenised as ``generate`` would see them, left-padded into one batch."""
    return left_pad([list(tokenizer(p)["input_ids"]) for p in PARITY_PROMPTS], pad_id(tokenizer))


def positions_needed(shapes: tuple[tuple[int, int], ...], tokenizer: Any) -> int:
    """The longest sequence the parity checks run: a prefill plus its decode steps, or a prompt plus its tokens."""
    prompt = prompt_rows(tokenizer)[0].shape[1]
    return max(max(s for _, s in shapes) + DECODE_STEPS, prompt + GREEDY_TOKENS)


def max_positions(config: Any) -> int | None:
    """The longest sequence a transformers config allows (``max_position_embeddings``, GPT-2's ``n_positions``)."""
    for key in ("max_position_embeddings", "n_positions"):
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_positions(config: Any, shapes: tuple[tuple[int, int], ...], tokenizer: Any, name: str) -> None:
    """Refuse parity shapes that run past the model's maximum positions, before any long work.

    Raises:
        ConfigError: naming what is needed, what the model allows and how to fix it.
    """
    limit = max_positions(config)
    needed = positions_needed(shapes, tokenizer)
    if limit is not None and needed > limit:
        raise ConfigError(f"{name} allows {limit} positions, but the decoder parity check runs {needed} (the longest "
                          f"validation shape plus {DECODE_STEPS} decode steps, or a prompt plus {GREEDY_TOKENS} new "
                          "tokens); give shorter validate_shapes")


def greedy(decoder: Decoder, ids: np.ndarray, mask: np.ndarray, tokens: int, *,
           keep_logits: bool = False) -> Any:
    """``tokens`` greedy new tokens ``(batch, tokens)`` from left-padded ``ids``; with ``keep_logits``, also the
    logits each was chosen from, ``(batch, tokens, vocab)``."""
    logits, state = decoder.start(ids, mask, positions_of(mask))
    chosen, seen = [], []
    for i in range(tokens):
        if keep_logits:
            seen.append(logits[:, -1])
        token = logits[:, -1].argmax(axis=-1)[:, None].astype(np.int64)
        chosen.append(token)
        if i + 1 == tokens:
            break
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        logits, state = decoder.advance(state, token, mask, _next_positions(mask, 1))
    chosen_ids = np.concatenate(chosen, axis=1)
    return (chosen_ids, np.stack(seen, axis=1)) if keep_logits else chosen_ids


def _max_abs(got: np.ndarray, want: np.ndarray, name: str) -> float:
    if got.shape != want.shape:
        raise ExportError(f"{name} has shape {got.shape}, expected {want.shape}")
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return float(diff.max()) if diff.size else 0.0


def _cache_diff(got: np.ndarray, want: np.ndarray, mask: np.ndarray, windowed: bool = False) -> float:
    """Largest difference of two ``(batch, kv_heads, sequence, head_dim)`` caches at real tokens.

    ``windowed``: the reference may keep only the last positions (PyTorch's sliding-window cache, Mistral's); the
    positions both hold are compared. Otherwise the caches must be of one length.
    """
    if got.ndim == want.ndim == 4 and windowed and want.shape[2] < got.shape[2]:
        kept = want.shape[2]
        got, mask = got[:, :, -kept:], mask[:, -kept:]
    if got.shape != want.shape:
        raise ExportError(f"present has shape {got.shape}, expected {want.shape}")
    return _max_abs(_real(got, mask), _real(want, mask), "present")


def _real(array: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Entries of ``(batch, kv_heads, sequence, head_dim)`` at real (unpadded) tokens."""
    return array.transpose(0, 2, 1, 3)[mask.astype(bool)]


class _Lossy:
    """Signal-to-noise and top-1 agreement over every compared position of one shape."""

    def __init__(self) -> None:
        self.signal = self.noise = 0.0
        self.agree = self.positions = 0

    def add(self, got: np.ndarray, want: np.ndarray) -> None:
        got, want = got.reshape(-1, got.shape[-1]).astype(np.float64), want.reshape(-1, want.shape[-1])
        self.signal += float((want.astype(np.float64) ** 2).sum())
        self.noise += float(((got - want) ** 2).sum())
        self.agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        self.positions += got.shape[0]

    def figures(self) -> dict[str, float]:
        sqnr = _SQNR_CAP_DB if self.noise == 0 else min(_SQNR_CAP_DB, 10 * math.log10(self.signal / self.noise))
        return {"sqnr_db": sqnr, "agreement": self.agree / self.positions}


def decoder_parity(candidate: Decoder, reference: Decoder, tokenizer: Any, shapes: tuple[tuple[int, int], ...],
                   tolerance: Tolerance, *, what: str, floor_advice: str = "") -> dict[str, Any]:
    """Compare two decoders on prefills, decode steps and greedy generation; raise when they disagree.
    ``floor_advice`` ends the error of a lossy graph below its floors.

    Returns:
        A report: per shape the largest logit and cache differences of the prefill and of each decode step (and
        for lossy graphs the signal-to-noise ratio and top-1 agreement), the greedy tokens, ``compared_outputs``
        (how many arrays were compared) and ``passed``.

    Raises:
        ParityError: naming the first difference beyond the tolerance (and how many more there are).
        ExportError: outputs of the wrong shape, or nothing compared at all.
    """
    failures: list[str] = []
    rows = []
    compared = 0
    worst = 0.0
    for batch, sequence in shapes:
        ids, mask = prefill_rows(tokenizer, batch, sequence)
        positions = positions_of(mask)
        got, got_state = candidate.start(ids, mask, positions)
        want, want_state = reference.start(ids, mask, positions)
        real = mask.astype(bool)
        lossy = _Lossy()
        lossy.add(got[real], want[real])
        row: dict[str, Any] = {"batch": batch, "sequence": sequence,
                               "prefill_logits": _max_abs(got[real], want[real], "logits")}
        compared += 1
        got_cache, want_cache = candidate.cache(got_state), reference.cache(want_state)
        if got_cache is not None and want_cache is not None:
            if len(got_cache) != len(want_cache):
                raise ExportError(f"the cache has {len(got_cache)} tensors, expected {len(want_cache)}")
            windowed = isinstance(reference, TorchDecoder)  # PyTorch's sliding-window cache may be shorter
            row["prefill_cache"] = max(_cache_diff(g, w, mask, windowed)
                                       for g, w in zip(got_cache, want_cache, strict=True))
            compared += len(got_cache)
        steps = []
        token = want[:, -1].argmax(axis=-1)[:, None].astype(np.int64)
        for _ in range(DECODE_STEPS):
            mask = np.concatenate([mask, np.ones_like(token)], axis=1)
            positions = _next_positions(mask, 1)
            got, got_state = candidate.advance(got_state, token, mask, positions)
            want, want_state = reference.advance(want_state, token, mask, positions)
            steps.append(_max_abs(got, want, "logits"))
            lossy.add(got, want)
            compared += 1
            token = want[:, -1].argmax(axis=-1)[:, None].astype(np.int64)
        row["decode_logits"] = steps
        place = f"batch {batch} x sequence {sequence}"
        if tolerance.lossy:
            row |= lossy.figures()
            if not row["sqnr_db"] >= tolerance.min_sqnr_db:
                failures.append(f"logits at {place}: signal-to-noise {row['sqnr_db']:.1f} dB < "
                                f"{tolerance.min_sqnr_db:g} dB")
            if not row["agreement"] >= tolerance.min_agreement:
                failures.append(f"top-1 agreement at {place}: {row['agreement']:.3f} < {tolerance.min_agreement:g}")
        else:
            checks = [("prefill logits", row["prefill_logits"]), ("prefill cache", row.get("prefill_cache", 0.0))]
            checks += [(f"decode step {i + 1} logits", d) for i, d in enumerate(steps)]
            failures += [f"{name} at {place}: max |diff| {d:.3g} > {tolerance.atol:.3g}" for name, d in checks
                         if not d <= tolerance.atol]
        worst = max(worst, row["prefill_logits"], row.get("prefill_cache", 0.0), *steps)
        rows.append(row)
    if compared == 0:
        raise ExportError(f"{what}: no outputs were compared; give at least one validation shape")
    ids, mask = prompt_rows(tokenizer)
    got_tokens = greedy(candidate, ids, mask, GREEDY_TOKENS)
    want_tokens = greedy(reference, ids, mask, GREEDY_TOKENS)
    differ = [np.flatnonzero(g != w) for g, w in zip(got_tokens, want_tokens, strict=True)]
    first = [int(d[0]) if d.size else None for d in differ]
    generated = {"prompts": len(PARITY_PROMPTS), "new_tokens": GREEDY_TOKENS,
                 "identical": all(f is None for f in first), "first_difference": first, "tokens": want_tokens.tolist(),
                 "text": [tokenizer.decode(t, skip_special_tokens=True) for t in want_tokens.tolist()]}
    if not tolerance.lossy and not generated["identical"]:
        i = next(i for i, f in enumerate(first) if f is not None)
        failures.append(f"greedy generation from prompt {i + 1} differs at new token {first[i] + 1} of "
                        f"{GREEDY_TOKENS}")
    report = {"compared": what, "tolerance": asdict(tolerance), "atol": tolerance.atol, "max_abs_diff": worst,
              "decode_steps": DECODE_STEPS, "shapes": rows, "greedy": generated, "compared_outputs": compared,
              "passed": not failures}
    if failures:
        more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
        advice = f"; {floor_advice}" if tolerance.lossy and floor_advice else ""
        raise ParityError(f"{what} parity failed: {failures[0]}{more}{advice}")
    return report


def _architectures(config: Any) -> str:
    return ", ".join(getattr(config, "architectures", None) or []) or "a model without a task head"


def check_not_causal_lm(config: Any, task: str, name: str) -> None:
    """Refuse a causal LM given an encoder task, naming the decoder tasks.

    Raises:
        ConfigError: when ``config`` describes a causal LM.
    """
    if is_causal_lm(config):
        raise ConfigError(f"{name} is a causal language model ({_architectures(config)}); export it with --task "
                          f"text-generation-with-past (or text-generation), not {task}")


def _check_exporter_supports(model_type: str, task: str) -> None:
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX export configs)
    from optimum.exporters.tasks import TasksManager

    supported = set(TasksManager.get_supported_model_type_for_task(task, exporter="onnx"))
    if model_type not in supported and model_type.replace("_", "-") not in supported:
        raise ConfigError(f"optimum-onnx cannot export model type {model_type!r} for {task}; it exports "
                          f"{', '.join(sorted(supported))}")


def load_for_export(source: str, cfg: ExportConfig, tokenizer: Any, name: str, *,
                    allow_pickle: bool = False) -> tuple[torch.nn.Module, bool]:
    """The causal LM of ``source`` (dense, or rebuilt from a compressed folder) and whether it is compressed.

    Everything that can be refused is refused here, before the export starts.

    Raises:
        ConfigError: not a causal LM, a model type the exporter does not know, or parity shapes longer than the
            model's maximum positions.
    """
    config = load_config(source)
    if not is_causal_lm(config):
        raise ConfigError(f"{name} is {_architectures(config)}, not a causal language model; task {cfg.task!r} needs "
                          "a *ForCausalLM model (encoders export with --task text-classification, "
                          "token-classification, question-answering or feature-extraction)")
    _check_exporter_supports(str(config.model_type), cfg.task)
    check_positions(config, cfg.validate_shapes, tokenizer, name)
    return load_causal_lm(source, allow_pickle=allow_pickle), is_compressed(source)


def export_parity(session: Any, model: torch.nn.Module, tokenizer: Any,
                  cfg: ExportConfig) -> tuple[dict[str, Any], CacheLayout | None]:
    """ONNX Runtime against PyTorch on prefills, decode steps and greedy generation, and the graph's cache.

    Raises:
        ExportError: a ``text-generation-with-past`` graph without a cache.
        ParityError: see :func:`decoder_parity`.
    """
    graph = OnnxDecoder(session)
    if cfg.task == "text-generation-with-past" and graph.layout is None:
        raise ExportError("the exported graph takes no past_key_values; the exporter dropped the KV cache")
    report = decoder_parity(graph, TorchDecoder(model, positions=graph.takes_positions), tokenizer,
                            cfg.validate_shapes, Tolerance(atol=cfg.atol), what="ONNX vs PyTorch")
    return report, graph.layout


def optimised_parity(reference: Path, candidate: Path, tokenizer: Any, cfg: OptimizeConfig) -> dict[str, Any]:
    """An optimised decoder graph against the graph it was optimised from (CPU).

    float32: ``cfg.atol`` and identical greedy tokens; quantised: the floors of ``cfg.floors`` (signal-to-noise
    and top-1 agreement, see :class:`Tolerance`).
    """
    advice = ""
    if cfg.floors is not None:
        sqnr, agreement = cfg.floors
        tolerance = Tolerance(min_sqnr_db=sqnr, min_agreement=agreement)
        what = f"{cfg.quantize} vs float32 ONNX"
        if cfg.quantize == "int8":
            advice = ("dynamic int8 quantises a decoder's activations with one scale per tensor, which their outliers "
                      "defeat: quantise its weights alone with --quantize int8-weight (optimize.quantize: "
                      "int8-weight)")
        elif cfg.matmul_accuracy_level == 4:
            advice = ("accuracy level 4 quantises the activations to int8 too (block by block): --accuracy-level 0 "
                      "(optimize.accuracy_level: 0) keeps them float, slower on the CPU")
    else:
        tolerance, what = Tolerance(atol=cfg.atol), "optimised vs unoptimised ONNX"
    # the two sessions take turns: idle threads must sleep, not spin on the cores the other one needs
    sessions = [OnnxDecoder(make_session(path, "cpu", spinning=False)) for path in (candidate, reference)]
    return decoder_parity(*sessions, tokenizer, cfg.validate_shapes, tolerance, what=what, floor_advice=advice)
