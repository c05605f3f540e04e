"""Baseline vs candidate on the same data, provider and machine: accuracy, latency, memory, then the gate."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DataConfig, GateConfig, ValidateConfig, check_gate_measured
from ..data import load_eval_split
from ..errors import ConfigError, GateFailedError
from ..exporters.quantize import check_runs_on
from ..exporters.runtime import ONNX_FILE, make_session, onnx_config, require_provider
from ..manifest import folder_fingerprint, read_manifest, write_manifest
from ..modeling import check_sequence_lengths
from ..outputs import atomic_output_dir, check_output_dir
from .accuracy import agreement, evaluate_onnx, task_from_outputs
from .causal_lm import causal_lm_results, check_no_pytorch_models
from .decoder import CAUSAL_LM_TASK, check_pair_roles
from .gate import Check, check_thresholds_apply, evaluate_gate
from .generation import cache_sharing, use_cuda_graph
from .latency import environment, measure_latency
from .memory import measure_memory
from .report import REPORT_SCHEMA, REPORT_VERSION, write_reports


@dataclass(frozen=True)
class ValidationResult:
    out_dir: Path
    report: dict[str, Any]
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return self.report["gate"]["passed"]


def _signature(folder: Path, device: str) -> tuple[list[str], dict[str, list[Any]]]:
    session = make_session(folder / ONNX_FILE, device)
    return [i.name for i in session.get_inputs()], {o.name: o.shape for o in session.get_outputs()}


def check_compatible(baseline: Path, candidate: Path, device: str) -> str:
    """Both models must take the same inputs and give the same outputs; returns their task.

    Causal language models are recognised by their ``config.json``; their graphs are compared when they are opened
    (see :func:`~.causal_lm.causal_lm_results`).
    """
    for folder in (baseline, candidate):
        if not (folder / ONNX_FILE).is_file():
            raise ConfigError(f"{folder} has no {ONNX_FILE}; give folders written by 'fwsvd-deploy export/optimize'")
    if check_pair_roles(baseline, candidate):
        return CAUSAL_LM_TASK
    b_in, b_out = _signature(baseline, device)
    c_in, c_out = _signature(candidate, device)
    if sorted(b_in) != sorted(c_in):
        raise ConfigError(f"baseline inputs {b_in} differ from candidate inputs {c_in}; compare models of one family")
    if sorted(b_out) != sorted(c_out):
        raise ConfigError(f"baseline outputs {sorted(b_out)} differ from candidate outputs {sorted(c_out)}; "
                          "the tasks differ")
    b_labels, c_labels = _labels(onnx_config(baseline)), _labels(onnx_config(candidate))
    if len(b_labels) != len(c_labels) or (_named(b_labels) and _named(c_labels) and b_labels != c_labels):
        raise ConfigError(f"baseline classes {b_labels} differ from candidate classes {c_labels}; the candidate's "
                          "head must name the same classes in the same order as the baseline's")
    return task_from_outputs(b_out, baseline)


def _labels(config: dict[str, Any]) -> list[str]:
    """Class names by id from a ``config.json`` (transformers' placeholders LABEL_i when it names none)."""
    id2label = config.get("id2label") or {}
    if not id2label:
        return [f"LABEL_{i}" for i in range(int(config.get("num_labels", 0) or 0))]
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def _named(labels: list[str]) -> bool:
    return any(not name.startswith("LABEL_") for name in labels)


def check_lengths(folders: tuple[Path, ...], data_cfg: DataConfig, cfg: ValidateConfig) -> None:
    """Sequence lengths the measurements would run against the models' positions, before any of them runs."""
    lengths: dict[str, Any] = {"max_length": data_cfg.max_length}
    if cfg.latency:
        lengths["seq_lens"] = cfg.seq_lens
    if cfg.memory:
        lengths["memory_seq"] = cfg.memory_seq
    for folder in folders:
        check_sequence_lengths(onnx_config(folder), str(folder), lengths)


def validate(
    baseline: str | Path,
    candidate: str | Path,
    data_cfg: DataConfig,
    cfg: ValidateConfig,
    gate: GateConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: bool | None = None,
    raise_on_failure: bool = True,
    pytorch_models: Mapping[str, str | Path | None] | None = None,
) -> ValidationResult:
    """Measure both models, evaluate the gate, write report.json / report.md / junit.xml / manifest.json.

    The report is written whether the gate passes or not; then a failed gate raises :class:`GateFailedError`
    (exit code 1) naming every failed check, unless ``raise_on_failure`` is false. For causal language models,
    ``pytorch_models`` (``baseline``/``candidate`` -> the PyTorch folder each graph was exported from) adds the
    ONNX-vs-PyTorch perplexity check.

    Raises:
        DeviceUnavailableError: ``cfg.device == 'cuda'`` without CUDA.
        ConfigError: incompatible models, or a threshold for another kind of task.
        GateFailedError: a check failed.
    """
    baseline, candidate = Path(baseline), Path(candidate)
    check_gate_measured(cfg, gate)
    require_provider(cfg.device)
    check_output_dir(out_dir, overwrite, inputs=[baseline, candidate, data_cfg.dataset, data_cfg.eval_dataset])
    for folder in (baseline, candidate):  # before any session is opened on the provider
        if (folder / ONNX_FILE).is_file():
            check_runs_on(folder / ONNX_FILE, cfg.device)
    task = check_compatible(baseline, candidate, cfg.device)
    check_thresholds_apply(gate, task)
    if task != CAUSAL_LM_TASK:
        check_no_pytorch_models(pytorch_models, task)
        check_lengths((baseline, candidate), data_cfg, cfg)
        if cfg.cuda_graph:
            raise ConfigError("--cuda-graph captures a causal language model's decode steps; the encoder grid "
                              "runs without it: drop --cuda-graph")
    elif cfg.latency:  # a graph that cannot be captured is refused now, not after the perplexity pass
        use_cuda_graph({"baseline": baseline, "candidate": candidate}, cfg.device, cfg.cuda_graph)
    start = time.perf_counter()
    if task == CAUSAL_LM_TASK:
        results, source = causal_lm_results({"baseline": baseline, "candidate": candidate}, data_cfg, cfg,
                                             pytorch_models=pytorch_models, progress=progress)
    else:
        results, source = _encoder_results(task, baseline, candidate, data_cfg, cfg, progress)
    described = {"baseline": _describe(baseline), "candidate": _describe(candidate)}
    results["fusions"] = _fusions(described)
    checks = evaluate_gate(gate, results)
    passed = all(c.passed for c in checks)
    report = {
        "schema": REPORT_SCHEMA,
        "schema_version": REPORT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **described,
        "settings": cfg.to_dict(),
        "data": {**data_cfg.to_dict(), "source": source},
        **results,
        "environment": environment(cfg.device),
        "gate": {"passed": passed, "thresholds": gate.to_dict(), "checks": [c.to_dict() for c in checks]},
        "notes": _notes(described, cfg, task == CAUSAL_LM_TASK),
        "seconds": time.perf_counter() - start,
    }
    with atomic_output_dir(out_dir, overwrite, inputs=[baseline, candidate]) as tmp:
        write_reports(tmp, report, checks)
        write_manifest(tmp, {"kind": "validation", "inputs": {"baseline": report["baseline"],
                                                             "candidate": report["candidate"]},
                             "settings": cfg.to_dict(), "gate": gate.to_dict(), "passed": passed})
    result = ValidationResult(Path(out_dir), report, checks)
    if not passed and raise_on_failure:
        raise GateFailedError(gate_failure_message(checks, Path(out_dir)))
    return result


def _encoder_results(task: str, baseline: Path, candidate: Path, data_cfg: DataConfig, cfg: ValidateConfig,
                     progress: bool | None) -> tuple[dict[str, Any], str]:
    """Accuracy, latency grid and memory of two encoder models, and the evaluation data's source."""
    kwargs = {"device": cfg.device, "batch_size": cfg.eval_batch_size, "max_length": data_cfg.max_length,
              "threads": cfg.threads, "progress": progress}
    if task == "text-classification":
        evaluation = load_eval_split(data_cfg)
        source = evaluation.source
        base_eval = evaluate_onnx(baseline, evaluation, **kwargs)
        cand_eval = evaluate_onnx(candidate, evaluation, **kwargs)
        accuracy = {"task": task, "primary_metric": "accuracy" if base_eval.kind == "classification" else "pearson",
                    "baseline": base_eval.metrics, "candidate": cand_eval.metrics,
                    "comparison": agreement(base_eval, cand_eval), "examples": base_eval.num_examples}
    else:
        accuracy, source = _span_accuracy(task, baseline, candidate, data_cfg, kwargs)
    results: dict[str, Any] = {"accuracy": accuracy, "latency": None, "memory": None}
    if cfg.latency:
        results["latency"] = measure_latency({"baseline": baseline, "candidate": candidate}, device=cfg.device,
                                             batch_sizes=cfg.batch_sizes, seq_lens=cfg.seq_lens,
                                             threads=cfg.threads, warmup=cfg.warmup, rounds=cfg.rounds,
                                             progress=progress)
    if cfg.memory:
        results["memory"] = {name: measure_memory(folder, cfg.device, cfg.memory_batch, cfg.memory_seq, cfg.threads)
                             for name, folder in (("baseline", baseline), ("candidate", candidate))}
    return results, source


def _span_accuracy(task: str, baseline: Path, candidate: Path, data_cfg: DataConfig,
                   kwargs: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Accuracy section for token classification (words, tags) or question answering (question, context, answers)."""
    import numpy as np

    from ..data import load_rows
    from .spans import evaluate_qa, evaluate_tokens, matching_tag_rows

    skipped = 0
    if task == "question-answering":
        if data_cfg.text_pair_column is None:
            raise ConfigError("question answering needs --text-column QUESTION --text-pair-column CONTEXT "
                              "--label-column ANSWERS")
        columns = [data_cfg.text_column, data_cfg.text_pair_column, data_cfg.label_column]
        rows = load_rows(data_cfg, data_cfg.eval_split, columns, data_cfg.max_eval_samples)
        b, c = (evaluate_qa(f, rows, *columns, **kwargs) for f in (baseline, candidate))
        diffs = np.concatenate([np.abs(x - y) for x, y in zip(b["logits"], c["logits"], strict=True)])
    else:
        columns = [data_cfg.text_column, data_cfg.label_column]
        rows, skipped = matching_tag_rows(load_rows(data_cfg, data_cfg.eval_split, columns,
                                                    data_cfg.max_eval_samples), *columns)
        b, c = (evaluate_tokens(f, rows, *columns, onnx_config(f), **kwargs) for f in (baseline, candidate))
        diffs = np.abs(b["logits"].astype(np.float64) - c["logits"].astype(np.float64))
    same = [float(x == y) for x, y in zip(b["predictions"], c["predictions"], strict=True)]
    comparison = {"agreement": float(np.mean(same)), "max_logit_diff": float(diffs.max()),
                  "mean_logit_diff": float(diffs.mean())}
    accuracy = {"task": task, "primary_metric": b["primary"], "baseline": b["metrics"], "candidate": c["metrics"],
                "comparison": comparison, "examples": len(rows)}
    if task == "token-classification":
        accuracy["skipped_examples"] = skipped
    return accuracy, f"{data_cfg.dataset}[{data_cfg.eval_split}]"


def gate_failure_message(checks: list[Check], out_dir: Path) -> str:
    failed = [f"{c.name} = {c.value if c.value is None else f'{c.value:.6g}'} (needs {c.comparison} {c.threshold:g})"
              for c in checks if not c.passed]
    return f"gate failed: {'; '.join(failed)}; report in {out_dir / 'report.md'}"


def _describe(folder: Path) -> dict[str, Any]:
    manifest = read_manifest(folder) or {}
    settings = manifest.get("settings") or {}
    return {"path": str(folder), "fingerprint": folder_fingerprint(folder), "kind": manifest.get("kind"),
            "fusions": manifest.get("fusions"), "compressed": (manifest.get("input") or {}).get("compressed"),
            "built_for": settings.get("device") if manifest.get("kind") == "onnx-optimized" else None,
            "fusions_complete": manifest.get("fusions_complete"),
            "allow_fusion_loss": bool(settings.get("allow_fusion_loss", False)),
            "quantization": manifest.get("quantization")}


def _fusions(described: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Fused-operator counts of both graphs (from their manifests), for the gate; ``None`` when one has none."""
    base, cand = described["baseline"]["fusions"], described["candidate"]["fusions"]
    if not base or not cand:
        return None
    return {"baseline": base, "candidate": cand, "allowed": described["candidate"]["allow_fusion_loss"]}


def _notes(described: dict[str, dict[str, Any]], cfg: ValidateConfig, decoder: bool = False) -> list[str]:
    """What a reader of the report must know to read its figures right."""
    notes = []
    if decoder and cfg.device == "cuda" and cfg.cuda_graph is None and cfg.latency:
        blocked = [f"{role} ({why})" for role, info in described.items()
                   if (why := cache_sharing(info["path"])) is not None]
        if blocked:
            notes.append("decode steps ran without CUDA graphs, on a KV cache grown each step: "
                         + "; ".join(blocked))
    for role, info in described.items():
        built = info["built_for"]
        if built is not None and built != "cpu" and cfg.device == "cpu":
            notes.append(f"the {role} graph was built for {built.upper()} and validated on the CPU execution "
                         "provider: its latency and memory here do not stand for the target device")
        if built == "cpu" and cfg.device != "cpu":
            notes.append(f"the {role} graph was built for the CPU and validated on {cfg.device.upper()}: its fused "
                         "operators are the CPU's (a decoder's GroupQueryAttention carries a padding bias the CPU "
                         "takes); optimise with --device cuda for figures that stand for the target")
        if info["fusions_complete"] is False:
            notes.append(f"the {role} graph lost fused operators against its dense-structured reference; "
                         "allowed by allow_fusion_loss")
    return notes
