"""Generation speed of decoder ONNX models with the KV cache, measured together: same process, same tokens,
interleaved call by call.

One generation is a prefill of ``prompt_len`` tokens per row (empty past), then ``new_tokens`` decode steps of one
token per row, each fed the previous step's presents as its past (or, with CUDA graphs, one shared max-length
cache: :class:`Generation`). Each call is timed on its own. The tokens are
fixed in advance (seeded, within the vocabulary) rather than chosen by argmax, so both models do exactly the same
work whatever they predict. Inputs and the KV cache stay in ONNX Runtime's own tensors (I/O binding) on every
device: on CUDA every step's inputs are placed on the device before timing and the cache never leaves it; on CPU
no cache is copied into or out of NumPy between steps.

The models are interleaved call by call, not generation by generation: one round runs every model's prefill,
then decode step 1 of every model, then step 2, and so on, the order alternating round by round. Whatever slows
the machine for longer than a step (another tenant's memory traffic, a frequency change) then falls on every
model alike, and the per-round ratios stay tight: two copies of one graph, timed among other graphs on 2 cores,
gave per-round ratios of 0.97 to 1.005 (10th to 90th percentile) this way, and anywhere from 0.83 to 1.15 (ten
rounds) with whole generations interleaved.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..exporters.runtime import GPU_DEVICES, ONNX_FILE, make_session
from ..manifest import read_manifest
from ..progress import progress_bar
from .decoder import DecoderGraph
from .latency import environment, round_ratio, summarize


def generation_tokens(vocab: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Seeded token ids ``(batch, length)`` in the vocabulary's ordinary range (above the first 100 special ids)."""
    low = min(100, vocab - 1)
    return np.random.default_rng(seed).integers(low, vocab, size=(batch, length), dtype=np.int64)


def cache_sharing(folder: str | Path) -> str | None:
    """Why the optimised decoder in ``folder`` cannot run on one shared max-length cache buffer (and so under a
    captured CUDA graph); ``None`` when it can: every attention block fused into ``GroupQueryAttention`` with
    lengths for padding (:attr:`~fwsvd_deploy.exporters.attention.AttentionFusion.shares_cache`)."""
    fusion = (read_manifest(Path(folder)) or {}).get("attention_fusion")
    if not isinstance(fusion, dict):
        return ("its manifest records no attention fusion (not written by 'fwsvd-deploy optimize' at level O2 "
                "or O3, or not a Llama, Mistral or Qwen2 graph)")
    if fusion.get("shares_cache"):
        return None
    if not fusion.get("fused"):
        return f"its attention is not fused ({fusion.get('note') or 'no block matched'})"
    if fusion.get("padding") != "lengths":
        return ("its fused attention masks padding with a bias, not lengths (a CPU graph: optimise it with "
                "--device cuda --fp16)")
    return f"only {fusion.get('fused')} of its {fusion.get('blocks')} attention blocks are fused"


class Generation:
    """One generation of fixed tokens, callable repeatedly; returns ``(prefill_ms, [decode_ms, ...])``.

    By default each call's presents are the next call's past (the cache grows by a token a step, a new tensor each
    time). With ``shared_cache`` the cache is one buffer per past input, ``(batch, kv_heads, prompt + new tokens,
    head_dim)``, allocated once and bound as both past and present, as onnxruntime-genai's
    ``past_present_share_buffer`` does; decode steps then feed a mask as wide as the buffer (zeros after each row's
    tokens), so every step has the same shapes and addresses. Only graphs whose fused attention reads lengths can
    (:func:`cache_sharing`). ``cuda_graph`` (CUDA, a session made with ``cuda_graph=True``, ``shared_cache``)
    then captures the decode step as CUDA graph ``graph_id`` on its first runs and replays it after; the prefill,
    of another shape, runs outside any graph.
    """

    def __init__(self, session: Any, graph: DecoderGraph, tokens: np.ndarray, prompt_len: int, device: str, *,
                 shared_cache: bool = False, cuda_graph: bool = False, graph_id: int = 1) -> None:
        import onnxruntime as ort

        if cuda_graph and not shared_cache:
            raise ValueError("a captured CUDA graph needs the shared cache (every step of the same shapes)")
        self.session = session
        self.graph = graph
        self.device = "cuda" if device in GPU_DEVICES else "cpu"
        self.outputs = [o.name for o in session.get_outputs()]
        self.shared_cache = shared_cache

        def place(feed: dict[str, np.ndarray]) -> dict[str, Any]:
            return {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), self.device, 0)
                    for k, v in feed.items()}

        batch, total = tokens.shape
        steps = range(prompt_len, total)
        self.decode_steps = len(steps)
        self.prefill_options = self.step_options = None
        if not shared_cache:
            self.prefill = place(graph.prefill_feed(tokens[:, :prompt_len]))
            self.steps = [place(graph.step_inputs(tokens[:, t:t + 1], t)) for t in steps]
            return
        self.cache = place({name: np.zeros((batch, h, total, d), dtype=graph.dtype)
                            for name, h, d in zip(graph.past, graph.kv_heads, graph.head_dim, strict=True)})
        self.prefill = {**place(graph.step_inputs(tokens[:, :prompt_len], 0)), **self.cache}
        # one set of step inputs, refilled in place before each step, and one logits buffer: the same addresses
        # every step (what a captured graph replays)
        self.step_feeds = [self._wide_mask(graph.step_inputs(tokens[:, t:t + 1], t), total) for t in steps]
        # copies: on the CPU an OrtValue wraps the array it is made from, which the refills would overwrite
        self.step_values = place({k: v.copy() for k, v in self.step_feeds[0].items()}) if self.step_feeds else {}
        self.step_inputs = {**self.step_values, **self.cache}
        self.presents = {q: self.cache[p] for p, q in zip(graph.past, graph.presents, strict=True)}
        logits = session.get_outputs()[self.outputs.index("logits")]
        dtype = np.float16 if logits.type == "tensor(float16)" else np.float32
        self.step_outputs = {**self.presents, "logits": ort.OrtValue.ortvalue_from_shape_and_type(
            (batch, 1, graph.vocab), dtype, self.device, 0)}
        if cuda_graph:
            self.prefill_options = ort.RunOptions()
            self.prefill_options.add_run_config_entry("gpu_graph_id", "-1")  # another shape: never captured
            self.step_options = ort.RunOptions()
            self.step_options.add_run_config_entry("gpu_graph_id", str(graph_id))

    @staticmethod
    def _wide_mask(feed: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
        """A decode step's feed with its mask as wide as the shared cache: ones over the tokens so far, then
        zeros."""
        batch, seen = feed["attention_mask"].shape
        mask = np.zeros((batch, width), dtype=np.int64)
        mask[:, :seen] = 1
        return {**feed, "attention_mask": mask}

    def _run(self, feed: Mapping[str, Any], options: Any = None,
             bound: Mapping[str, Any] | None = None) -> tuple[float, list[Any]]:
        """One timed call; outputs named in ``bound`` are written into those tensors, the others allocated."""
        import time

        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_ortvalue_input(name, value)
        for name in self.outputs:
            if bound is not None and name in bound:
                binding.bind_ortvalue_output(name, bound[name])
            else:
                binding.bind_output(name, self.device)
        start = time.perf_counter()
        if options is None:
            self.session.run_with_iobinding(binding)
        else:
            self.session.run_with_iobinding(binding, options)
        if self.device != "cpu":
            binding.synchronize_outputs()
        ms = (time.perf_counter() - start) * 1000
        return ms, binding.get_outputs()

    def __call__(self) -> tuple[float, list[float]]:
        prefill_ms, decode_ms, _ = self.run()
        return prefill_ms, decode_ms

    def run(self, keep_logits: bool = False) -> tuple[float, list[float], list[np.ndarray]]:
        """Prefill and decode times; with ``keep_logits``, each decode step's logits too, copied after timing."""
        logits: list[np.ndarray] = []
        prefill_ms, *decode_ms = self.calls(logits if keep_logits else None)
        return prefill_ms, decode_ms, logits

    def calls(self, logits: list[np.ndarray] | None = None) -> Iterator[float]:
        """The prefill, then each decode step fed the previous call's presents (or, with the shared cache, the
        same buffers): yields each call's time (ms) as it returns, so that other models' calls can run in between.
        Appends each decode step's logits to ``logits``, copied after timing."""
        index = self.outputs.index("logits")
        ms, out = self._run(self.prefill, self.prefill_options, self.presents if self.shared_cache else None)
        yield ms
        for t in range(self.decode_steps):
            ms, out = self._shared_step(t) if self.shared_cache else self._grown_step(t, out)
            yield ms
            if logits is not None:
                logits.append(np.array(out[index].numpy(), copy=True))  # the shared logits buffer is reused

    def _shared_step(self, t: int) -> tuple[float, list[Any]]:
        for name, value in self.step_feeds[t].items():  # not timed: the inputs are on the device before the step
            self.step_values[name].update_inplace(value)
        return self._run(self.step_inputs, self.step_options, self.step_outputs)

    def _grown_step(self, t: int, previous: list[Any]) -> tuple[float, list[Any]]:
        values = dict(zip(self.outputs, previous, strict=True))
        past = {p: values[q] for p, q in zip(self.graph.past, self.graph.presents, strict=True)}
        return self._run({**self.steps[t], **past})


def interleaved_generations(runners: Mapping[str, Generation], warmup: int,
                            rounds: int) -> dict[str, list[tuple[float, list[float]]]]:
    """``warmup`` untimed rounds, then ``rounds`` rounds of one generation per model, interleaved call by call:
    every model's prefill, then decode step 1 of every model, then step 2, ..., the order alternating round by
    round. Returns ``(prefill_ms, [decode_ms, ...])`` by model and round.

    Every model's cache and outputs are alive at once (on CUDA, each model's device memory for its batch), where
    whole generations one after another would hold one model's at a time."""
    order = list(runners)
    results: dict[str, list[tuple[float, list[float]]]] = {name: [] for name in order}
    for i in range(warmup + rounds):
        names = order if i % 2 == 0 else order[::-1]
        by_call = list(zip(*(runners[name].calls() for name in names), strict=True))
        if i < warmup:
            continue
        for k, name in enumerate(names):
            prefill_ms, *decode_ms = (call[k] for call in by_call)
            results[name].append((prefill_ms, decode_ms))
    return results


def measure_generation(
    models: Mapping[str, str | Path],
    *,
    device: str = "cpu",
    batch_sizes: Sequence[int] = (1, 8),
    prompt_len: int = 128,
    new_tokens: int = 32,
    threads: int | None = 2,
    warmup: int = 2,
    rounds: int = 10,
    progress: bool | None = None,
    sessions: Mapping[str, tuple[Any, DecoderGraph]] | None = None,
    cuda_graph: bool | None = None,
) -> dict[str, Any]:
    """Time a generation of every model at every batch size, interleaved call by call, the order alternating
    round by round (:func:`interleaved_generations`).

    Sessions run with fixed threads that spin between the operators of a run and stop when it returns
    (``spin_after_run=False`` in :func:`~fwsvd_deploy.exporters.runtime.make_session`): a decode step is hundreds of
    short operators, and threads put to sleep between them would add a wake-up to each, which a deployed session
    does not pay and which weighs on a factorised model's twice as many MatMuls.

    Args:
        models: name -> ONNX folder; ratios are against the first.
        sessions: name -> (session, graph) already open for these folders (made here when ``None``, or when CUDA
            graphs are used: those sessions are made for them).
        cuda_graph: capture each decode step in a CUDA graph and replay it, on the shared cache
            (:class:`Generation`); ``None``: on CUDA whenever every model's graph allows it
            (:func:`use_cuda_graph`).

    Returns:
        ``{"cells": [{batch, models: {name: {prefill, decode, decode_per_round, prefill_tokens_per_s,
        decode_tokens_per_s}}, ratios: {name: {prefill, decode}}}], ...}``. ``prefill`` summarises the prefill
        call over rounds; ``decode`` every decode call of every round (its ``mean_ms`` and ``p90_ms`` are the
        per-token decode time); ``decode_per_round`` the mean decode call of each round. Ratios are of medians
        over rounds (``decode``: of ``decode_per_round``), with the 10th/90th percentiles of the per-round ratio.
    """
    captured = use_cuda_graph(models, device, cuda_graph)
    if captured:
        warmup = max(warmup, 1)  # the capture happens on the first decode steps: never in a timed round
    if sessions is None or captured:
        sessions = {}
        for name, folder in models.items():
            session = make_session(Path(folder) / ONNX_FILE, device, threads=threads, spin_after_run=False,
                                   cuda_graph=captured)
            sessions[name] = (session, DecoderGraph.from_session(session, Path(folder)))
    names = list(models)
    cells = []
    for i, batch in enumerate(progress_bar(batch_sizes, progress=progress, desc="Generation", unit="batch size")):
        runners = {}
        for name in names:
            session, graph = sessions[name]
            tokens = generation_tokens(graph.vocab, batch, prompt_len + new_tokens)
            runners[name] = Generation(session, graph, tokens, prompt_len, device, shared_cache=captured,
                                       cuda_graph=captured, graph_id=i + 1)  # one captured graph per batch size
        runs = interleaved_generations(runners, warmup, rounds)
        per_model, prefill, per_round = {}, {}, {}
        for name in names:
            prefill[name] = [p for p, _ in runs[name]]
            per_round[name] = [float(np.mean(d)) for _, d in runs[name]]
            decode = summarize([ms for _, d in runs[name] for ms in d])
            per_model[name] = {
                "prefill": summarize(prefill[name]), "decode": decode,
                "decode_per_round": summarize(per_round[name]),
                "prefill_tokens_per_s": batch * prompt_len * 1000.0 / float(np.median(prefill[name])),
                "decode_tokens_per_s": batch * 1000.0 / decode["mean_ms"],
            }
        base = names[0]
        ratios = {name: {"prefill": round_ratio(prefill[name], prefill[base]),
                         "decode": round_ratio(per_round[name], per_round[base])} for name in names[1:]}
        cells.append({"batch": batch, "models": per_model, "ratios": ratios})
    return {"device": device, "threads": threads, "warmup": warmup, "rounds": rounds, "prompt_tokens": prompt_len,
            "new_tokens": new_tokens, "cuda_graph": captured,
            "kv_cache": "one shared max-length buffer" if captured else "grown each step",
            "cells": cells, "environment": environment(device)}


def use_cuda_graph(models: Mapping[str, str | Path], device: str, asked: bool | None) -> bool:
    """Whether generation on ``device`` captures its decode steps in CUDA graphs: ``asked`` (``None``: whenever
    the device is CUDA and every model's graph can run on a shared cache, :func:`cache_sharing`).

    Raises:
        ConfigError: CUDA graphs asked for on another device, or of a graph whose cache would change shape under
            the captured graph (naming it and why).
    """
    if device != "cuda":
        if asked:
            raise ConfigError(f"--cuda-graph needs --device cuda, not {device}: CUDA graphs are captured by the "
                              "CUDA provider; drop --cuda-graph")
        return False
    if asked is False:
        return False
    reasons = {name: cache_sharing(folder) for name, folder in models.items()}
    blocked = {name: why for name, why in reasons.items() if why is not None}
    if blocked and asked:
        name, why = next(iter(blocked.items()))
        raise ConfigError(f"--cuda-graph: {name} {models[name]} cannot be captured: {why}, so its KV cache grows "
                          "a token a step and its shapes change under a captured graph; drop --cuda-graph, or "
                          "optimise a Llama, Mistral or Qwen2 graph with --device cuda --fp16 (not quantised)")
    return not blocked


def generation_table(generation: dict[str, Any]) -> list[str]:
    """Markdown rows: prefill and per-token decode time and throughput per model and batch size, and the ratios."""
    names = list(generation["cells"][0]["models"])
    first = names[0]
    lines = ["| batch | model | prefill p50 ms | prefill tok/s | decode mean ms/token | decode p90 ms/token | "
             f"decode tok/s | prefill / {first} | decode / {first} |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for cell in generation["cells"]:
        for name in names:
            m = cell["models"][name]
            r = cell["ratios"].get(name)
            ratio = ("| | " if r is None else
                     f"| {r['prefill']['p50']:.3f} ({r['prefill']['p10']:.3f}-{r['prefill']['p90']:.3f}) "
                     f"| {r['decode']['p50']:.3f} ({r['decode']['p10']:.3f}-{r['decode']['p90']:.3f}) ")
            lines.append(f"| {cell['batch']} | {name} | {m['prefill']['p50_ms']:.1f} | {m['prefill_tokens_per_s']:.0f} "
                         f"| {m['decode']['mean_ms']:.2f} | {m['decode']['p90_ms']:.2f} | "
                         f"{m['decode_tokens_per_s']:.1f} {ratio}|")
    return lines
