"""Validation of a causal language model against its baseline: perplexity and greedy agreement through ONNX Runtime,
optionally ONNX Runtime against PyTorch, generation speed with the KV cache, and memory.

Every input is checked before the first forward pass: window and prompt lengths against the models' positions, the
text against one window, the PyTorch folders against the ONNX graphs, the two graphs against each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import DataConfig, ValidateConfig
from ..data import lm_windows, load_text
from ..errors import ConfigError
from ..exporters.runtime import ONNX_FILE, make_session
from ..modeling import load_tokenizer
from ..outputs import release_memory
from .decoder import CAUSAL_LM_TASK, DecoderGraph, architectures, check_lengths, check_same_interface
from .generation import generation_table, measure_generation, use_cuda_graph
from .memory import decoder_probe, measure_memory
from .perplexity import onnx_perplexity, relative_difference, window_batch


def causal_lm_results(
    folders: Mapping[str, Path],
    data_cfg: DataConfig,
    cfg: ValidateConfig,
    *,
    pytorch_models: Mapping[str, str | Path | None] | None = None,
    progress: bool | None = None,
) -> tuple[dict[str, Any], str]:
    """Measure a baseline and a candidate decoder (``folders``: ``baseline``, ``candidate``).

    Args:
        pytorch_models: role -> the PyTorch folder its ONNX graph was exported from (dense, or written by
            ``compress``); each one given has its perplexity computed on the same windows and compared.

    Returns:
        The report's ``accuracy`` (perplexity, next-token accuracy, greedy agreement), ``latency`` (``None``),
        ``generation`` and ``memory`` sections, and the evaluation text's source.

    Raises:
        ConfigError: a length beyond the models' positions, mismatched graphs or PyTorch folders.
        DatasetError: text shorter than one window.
    """
    timed = cfg.latency or cfg.memory
    for folder in folders.values():
        check_lengths(folder, window=data_cfg.max_length, prompt_len=cfg.prompt_len if timed else None,
                      new_tokens=cfg.new_tokens)
    torch_specs = {role: str(spec) for role, spec in (pytorch_models or {}).items() if spec is not None}
    torch_vocab = {role: _pytorch_vocab(role, spec) for role, spec in torch_specs.items()}
    text = load_text(data_cfg, data_cfg.eval_split)
    windows = lm_windows(text, load_tokenizer(str(folders["baseline"])), data_cfg.max_length,
                         data_cfg.max_eval_samples, data_cfg.seed).numpy()
    sessions = {}
    for role, folder in folders.items():
        session = make_session(folder / ONNX_FILE, cfg.device, threads=cfg.threads, spin_after_run=False)
        sessions[role] = (session, DecoderGraph.from_session(session, folder))
    graphs = {role: graph for role, (_, graph) in sessions.items()}
    check_same_interface(graphs, dict(folders))
    for role, vocab in torch_vocab.items():
        if vocab != graphs[role].vocab:
            raise ConfigError(f"--{role}-model {torch_specs[role]} has a vocabulary of {vocab} but the {role} graph "
                              f"{folders[role]} of {graphs[role].vocab}; give the folder it was exported from")

    length = windows.shape[1]
    batch = min(len(windows), window_batch(cfg.eval_batch_size, length, graphs["baseline"].vocab))
    reference = {}
    checked = len(windows) if cfg.parity_windows is None else min(cfg.parity_windows, len(windows))
    if torch_specs:  # first: a folder that does not load fails in seconds, not after the ONNX passes
        import torch

        from ..modeling import load_causal_lm
        from ..training import evaluate_lm

        for role, spec in torch_specs.items():
            model = load_causal_lm(spec)
            evaluation = evaluate_lm(model, torch.from_numpy(windows[:checked]), batch_size=batch, progress=progress)
            reference[role] = evaluation.metrics["perplexity"]
            del model
    measured = onnx_perplexity(sessions, windows, batch, head=checked if reference else None, progress=progress)
    metrics = measured["metrics"]
    parity = {role: {"model": torch_specs[role], "windows": checked, "perplexity": ppl,
                     "onnx_perplexity": measured["head"][role]["perplexity"],
                     "relative_diff": relative_difference(measured["head"][role]["perplexity"], ppl)}
              for role, ppl in reference.items()} or None
    accuracy = {
        "task": CAUSAL_LM_TASK, "primary_metric": "perplexity", "baseline": metrics["baseline"],
        "candidate": metrics["candidate"],
        "comparison": {"agreement": measured["agreement"]["candidate"],
                       "perplexity_ratio": metrics["candidate"]["perplexity"] / metrics["baseline"]["perplexity"]},
        "examples": len(windows),
        "windows": {"length": length, "stride": length, "count": len(windows),
                    "scored_tokens": len(windows) * (length - 1), "batch": batch, "seed": data_cfg.seed},
        "pytorch": parity,
    }
    results: dict[str, Any] = {"accuracy": accuracy, "latency": None, "generation": None, "memory": None}
    if cfg.latency:
        if use_cuda_graph(folders, cfg.device, cfg.cuda_graph):  # its own sessions: not both on the device at once
            sessions.clear()
            release_memory()
        results["generation"] = measure_generation(
            folders, device=cfg.device, batch_sizes=cfg.gen_batch_sizes, prompt_len=cfg.prompt_len,
            new_tokens=cfg.new_tokens, threads=cfg.threads, warmup=cfg.warmup, rounds=cfg.rounds, progress=progress,
            sessions=sessions, cuda_graph=cfg.cuda_graph)
    del sessions
    if cfg.memory:
        results["memory"] = {
            role: {**measure_memory(folder, cfg.device, cfg.memory_batch, cfg.prompt_len, cfg.threads,
                                    decoder=decoder_probe(graphs[role], cfg.new_tokens)),
                   "kv_cache_bytes_per_token": graphs[role].kv_bytes_per_token,
                   "probe": {"batch": cfg.memory_batch, "prompt_tokens": cfg.prompt_len,
                             "new_tokens": cfg.new_tokens}}
            for role, folder in folders.items()}
    return results, text.source


def _pytorch_vocab(role: str, spec: str) -> int:
    """The vocabulary of a PyTorch folder given for the ONNX-vs-PyTorch check; refuses anything but a causal LM."""
    from ..modeling import is_causal_lm, load_config

    config = load_config(spec)
    if not is_causal_lm(config):
        raise ConfigError(f"--{role}-model {spec} is {architectures(config.to_dict())}, not a causal language model; "
                          f"give the PyTorch folder the {role} ONNX graph was exported from")
    return int(config.vocab_size)


def check_no_pytorch_models(pytorch_models: Mapping[str, str | Path | None] | None, task: str) -> None:
    given = [f"--{role}-model" for role, spec in (pytorch_models or {}).items() if spec is not None]
    if given:
        raise ConfigError(f"{' and '.join(given)} (the ONNX-vs-PyTorch perplexity check) applies to causal language "
                          f"models; these models are {task}")


def markdown_sections(report: dict[str, Any]) -> list[str]:
    """``report.md`` sections of a causal language model: perplexity and agreement, then generation speed."""
    acc = report["accuracy"]
    w = acc["windows"]
    lines = ["", "## Perplexity (ONNX Runtime)", "",
             f"{w['count']} windows of {w['length']} tokens (stride {w['stride']}, {w['scored_tokens']:,} scored "
             "tokens, token-weighted), greedy next-token agreement on the same positions.", "",
             "| metric | baseline | candidate |", "|---|---:|---:|"]
    for key, value in acc["baseline"].items():
        lines.append(f"| {key} | {value:.4f} | {acc['candidate'][key]:.4f} |")
    for key, value in acc["comparison"].items():
        lines.append(f"| {key} | | {value:.6f} |")
    if acc.get("pytorch"):
        lines += ["", "| ONNX Runtime vs PyTorch | windows | PyTorch perplexity | ONNX Runtime perplexity "
                  "| relative diff |", "|---|---:|---:|---:|---:|"]
        for role, p in acc["pytorch"].items():
            lines.append(f"| {role} (`{p['model']}`) | {_parity_windows(p, w)} | {p['perplexity']:.4f} | "
                         f"{p['onnx_perplexity']:.4f} | {p['relative_diff']:.2e} |")
    generation = report.get("generation")
    if generation:
        lines += ["", f"## Generation with the KV cache ({generation['prompt_tokens']} prompt tokens, "
                  f"{generation['new_tokens']} new tokens, {generation['threads']} threads, {generation['rounds']} "
                  "rounds interleaved call by call; plot: generation.png)", "",
                  "Ratios: of medians over rounds, with the 10th-90th percentile of the per-round ratio.", "",
                  *generation_table(generation)]
    return lines


def summary_lines(report: dict[str, Any]) -> list[str]:
    """What the command line prints for a causal language model, before the gate lines."""
    acc = report["accuracy"]
    lines = [f"perplexity: baseline {acc['baseline']['perplexity']:.4f}, candidate "
             f"{acc['candidate']['perplexity']:.4f} (ratio {acc['comparison']['perplexity_ratio']:.4f}) on "
             f"{acc['windows']['count']} windows of {acc['windows']['length']} tokens; greedy next-token agreement "
             f"{acc['comparison']['agreement']:.4f}"]
    for role, p in (acc.get("pytorch") or {}).items():
        lines.append(f"{role} ONNX Runtime vs PyTorch perplexity: {p['onnx_perplexity']:.4f} vs {p['perplexity']:.4f} "
                     f"(relative diff {p['relative_diff']:.2e}) on {_parity_windows(p, acc['windows'])} windows")
    for cell in (report.get("generation") or {}).get("cells", []):
        b, c = cell["models"]["baseline"], cell["models"]["candidate"]
        r = cell["ratios"]["candidate"]
        lines.append(f"batch {cell['batch']}: prefill {b['prefill']['p50_ms']:.1f} -> {c['prefill']['p50_ms']:.1f} ms "
                     f"(ratio {r['prefill']['p50']:.3f}), decode {b['decode']['mean_ms']:.2f} -> "
                     f"{c['decode']['mean_ms']:.2f} ms/token (ratio {r['decode']['p50']:.3f})")
    return lines


def _parity_windows(parity: dict[str, Any], windows: dict[str, Any]) -> str:
    """How many windows the ONNX-vs-PyTorch check ran on: ``8 of 40``, or ``40`` when all (older reports: all)."""
    checked = parity.get("windows", windows["count"])
    return str(checked) if checked == windows["count"] else f"{checked} of {windows['count']}"
