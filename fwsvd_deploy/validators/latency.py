"""Latency of several ONNX models measured together: same process, same inputs, interleaved rounds."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..errors import ConfigError, first_line
from ..exporters.runtime import GPU_DEVICES, ONNX_FILE, make_session, onnx_config
from ..manifest import package_versions
from ..progress import progress_bar

T = TypeVar("T")


def vocab_size(folder: str | Path) -> int:
    """The vocabulary size in the ``config.json`` beside a graph.

    Raises:
        ConfigError: when the config gives none.
    """
    size = onnx_config(Path(folder)).get("vocab_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 2:
        raise ConfigError(f"{folder}/config.json gives no vocab_size; synthetic inputs need it")
    return size


def token_range(vocab: int) -> tuple[int, int]:
    """Ids drawn for synthetic inputs: above the special and rare tokens at the start of a vocabulary."""
    return min(1000, vocab // 4), vocab


def synthetic_token(folder: str | Path) -> int:
    """One ordinary token id of the folder's vocabulary."""
    low, high = token_range(vocab_size(folder))
    return (low + high) // 2


def synthetic_inputs(session: Any, batch: int, seq: int, *, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Full-length token ids in the vocabulary's ordinary range (:func:`token_range`); no padding."""
    rng = np.random.default_rng(seed)
    low, high = token_range(vocab)
    feed = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feed[inp.name] = rng.integers(low, high, size=(batch, seq), dtype=np.int64)
        elif inp.name == "attention_mask":
            feed[inp.name] = np.ones((batch, seq), dtype=np.int64)
        else:
            feed[inp.name] = np.zeros((batch, seq), dtype=np.int64)
    return feed


class _Runner:
    """One timed call: plain ``run`` on CPU; I/O binding with device-resident inputs on CUDA."""

    def __init__(self, session: Any, feed: dict[str, np.ndarray], device: str) -> None:
        self.session = session
        self.device = device
        if device in GPU_DEVICES:
            import onnxruntime as ort

            self.binding = session.io_binding()
            for name, value in feed.items():
                self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
            for out in session.get_outputs():
                self.binding.bind_output(out.name, "cuda")
        else:
            self.feed = feed

    def __call__(self) -> None:
        if self.device in GPU_DEVICES:
            self.session.run_with_iobinding(self.binding)
            self.binding.synchronize_outputs()
        else:
            self.session.run(None, self.feed)


def _timed(run: Callable[[], Any]) -> Callable[[], float]:
    def timed() -> float:
        start = time.perf_counter()
        run()
        return (time.perf_counter() - start) * 1000

    return timed


def interleaved_rounds(runners: Mapping[str, Callable[[], T]], warmup: int, rounds: int) -> dict[str, list[T]]:
    """Call every runner ``warmup`` times untimed, then once per round for ``rounds`` rounds, each round running
    every model in turn, the order alternating (ABBA...) so that neither model always runs on the other's warm
    caches. Returns what each call returned, by runner and round."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    results: dict[str, list[T]] = {name: [] for name in runners}
    order = list(runners.items())
    for i in range(rounds):
        for name, run in (order if i % 2 == 0 else order[::-1]):
            results[name].append(run())
    return results


def round_ratio(model_ms: Sequence[float], reference_ms: Sequence[float]) -> dict[str, float]:
    """Ratio of two models' medians (``p50``), and the 10th/90th percentiles of the per-round ratio."""
    per_round = np.asarray(model_ms) / np.asarray(reference_ms)
    return {"p50": float(np.median(model_ms) / np.median(reference_ms)),
            "p10": float(np.percentile(per_round, 10)), "p90": float(np.percentile(per_round, 90))}


def summarize(ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(ms, dtype=np.float64)
    return {"mean_ms": float(a.mean()), "p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "min_ms": float(a.min()), "runs": int(a.size)}


def measure_latency(
    models: Mapping[str, str | Path],
    *,
    device: str = "cpu",
    batch_sizes: Sequence[int] = (1, 8, 32),
    seq_lens: Sequence[int] = (32, 128),
    threads: int | None = 2,
    warmup: int = 3,
    rounds: int = 10,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Time every model on every batch x sequence cell, interleaved round by round, the order alternating.

    Sessions run with intra-op spinning off (see :func:`~fwsvd_deploy.exporters.runtime.make_session`).

    Returns:
        ``{"cells": [{batch, sequence, models: {name: summary}, ratios: {name: {p50, p10, p90}}}], "environment"}``.
        Ratios are against the first model; p10/p90 are of the per-round ratio.
    """
    # several sessions share the cores: without spinning, none runs on the cores of the one timed before it
    vocab = min(vocab_size(path) for path in models.values())  # the same ids for every model
    sessions = {name: make_session(Path(path) / ONNX_FILE, device, threads=threads, spinning=False)
                for name, path in models.items()}
    names = list(sessions)
    cells = []
    grid = [(b, s) for b in batch_sizes for s in seq_lens]
    for batch, seq in progress_bar(grid, progress=progress, desc="Latency", unit="shape"):
        runners = {n: _timed(_Runner(s, synthetic_inputs(s, batch, seq, vocab=vocab), device))
                   for n, s in sessions.items()}
        times = interleaved_rounds(runners, warmup, rounds)
        base = names[0]
        ratios = {name: round_ratio(times[name], times[base]) for name in names[1:]}
        cells.append({"batch": batch, "sequence": seq, "models": {n: summarize(times[n]) for n in names},
                      "throughput_per_s": {n: batch * 1000.0 / float(np.median(times[n])) for n in names},
                      "ratios": ratios})
    return {"device": device, "threads": threads, "warmup": warmup, "rounds": rounds, "cells": cells,
            "environment": environment(device)}


def environment(device: str) -> dict[str, Any]:
    """What the figures were measured on."""
    import onnxruntime as ort

    env: dict[str, Any] = {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
        "python": sys.version.split()[0], "versions": package_versions(),
        "providers": ort.get_available_providers(),
    }
    if device in GPU_DEVICES:
        env["gpu"] = _gpu_info()
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_info() -> dict[str, Any]:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return {"name": pynvml.nvmlDeviceGetName(handle), "driver": pynvml.nvmlSystemGetDriverVersion()}
    except Exception as exc:  # NVML absent or no GPU
        return {"available": False, "reason": f"NVML unavailable: {first_line(exc)}"}
