"""The release gate: every check evaluated, every failure collected, strict comparisons, no rounding first."""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass
from typing import Any

from ..config import GateConfig
from ..errors import ConfigError
from .decoder import CAUSAL_LM_TASK
from .perplexity import PARITY_RTOL

_OPS = {"<=": operator.le, ">=": operator.ge}
# thresholds that only make sense for one kind of task; the others apply to every task
ENCODER_THRESHOLDS = ("max_accuracy_drop", "max_latency_ratio", "max_logit_diff")
CAUSAL_LM_THRESHOLDS = ("max_perplexity_ratio", "max_decode_latency_ratio", "max_prefill_latency_ratio")


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None
    threshold: float
    comparison: str
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(name: str, value: float | None, comparison: str, threshold: float, detail: str) -> Check:
    # A figure that could not be measured fails its check: a gate fails closed.
    passed = value is not None and bool(_OPS[comparison](value, threshold))
    return Check(name, value, threshold, comparison, passed, detail)


def check_thresholds_apply(gate: GateConfig, task: str) -> None:
    """Refuse a threshold set for another kind of task than the models' (it would never be checked).

    Raises:
        ConfigError: naming the thresholds, the task and the ones that do apply.
    """
    causal = task == CAUSAL_LM_TASK
    foreign = ENCODER_THRESHOLDS if causal else CAUSAL_LM_THRESHOLDS
    wrong = [name for name in foreign if getattr(gate, name) is not None]
    if wrong:
        kind = "a causal language model" if causal else f"a {task} model"
        own = CAUSAL_LM_THRESHOLDS if causal else ENCODER_THRESHOLDS
        raise ConfigError(f"gate {', '.join(wrong)} does not apply to {kind}; drop it and use "
                          f"{', '.join(own)}, min_agreement or max_memory_ratio")


def evaluate_gate(gate: GateConfig, results: dict[str, Any]) -> list[Check]:
    """Compare the measured figures with the thresholds that are set."""
    checks = []
    acc = results.get("accuracy") or {}
    if gate.max_accuracy_drop is not None:
        metric = acc.get("primary_metric", "accuracy")
        base, cand = acc.get("baseline", {}).get(metric), acc.get("candidate", {}).get(metric)
        drop = None if base is None or cand is None else (base - cand) * 100.0
        checks.append(_check("accuracy_drop", drop, "<=", gate.max_accuracy_drop,
                             f"{metric}: baseline {base} - candidate {cand}, in points"))
    if gate.min_agreement is not None:
        what = ("share of scored positions with the same greedy next token" if acc.get("task") == CAUSAL_LM_TASK
                else "share of examples with the same predicted class")
        checks.append(_check("agreement", acc.get("comparison", {}).get("agreement"), ">=", gate.min_agreement, what))
    if gate.max_logit_diff is not None:
        checks.append(_check("max_logit_diff", acc.get("comparison", {}).get("max_logit_diff"), "<=",
                             gate.max_logit_diff, "largest |baseline - candidate| logit"))
    if gate.max_latency_ratio is not None:
        cells = (results.get("latency") or {}).get("cells") or []
        ratios = [c["ratios"]["candidate"]["p50"] for c in cells if "candidate" in c["ratios"]]
        worst = max(ratios) if ratios else None
        where = ""
        if ratios:
            cell = cells[ratios.index(worst)]
            where = f" (worst at batch {cell['batch']} x sequence {cell['sequence']})"
        checks.append(_check("latency_ratio", worst, "<=", gate.max_latency_ratio,
                             f"candidate/baseline median latency, worst cell of the grid{where}"))
    if gate.max_memory_ratio is not None:
        mem = results.get("memory") or {}
        b, c = mem.get("baseline", {}).get("disk_bytes"), mem.get("candidate", {}).get("disk_bytes")
        ratio = None if not b or c is None else c / b
        checks.append(_check("memory_ratio", ratio, "<=", gate.max_memory_ratio, "candidate/baseline size on disk"))
    fusions = results.get("fusions")
    if fusions is not None:
        checks.append(_fusion_check(fusions["baseline"], fusions["candidate"], fusions["allowed"]))
    if acc.get("task") == CAUSAL_LM_TASK:
        checks += _causal_lm_checks(gate, results)
    return checks


def _causal_lm_checks(gate: GateConfig, results: dict[str, Any]) -> list[Check]:
    acc = results["accuracy"]
    checks = []
    if gate.max_perplexity_ratio is not None:
        base, cand = acc["baseline"].get("perplexity"), acc["candidate"].get("perplexity")
        ratio = None if base is None or cand is None else cand / base
        checks.append(_check("perplexity_ratio", ratio, "<=", gate.max_perplexity_ratio,
                             f"candidate/baseline perplexity through ONNX Runtime: {cand} / {base}"))
    cells = (results.get("generation") or {}).get("cells") or []
    for phase, threshold, what in (("decode", gate.max_decode_latency_ratio, "per-token decode time with the KV cache"),
                                   ("prefill", gate.max_prefill_latency_ratio, "prefill time of the prompt")):
        if threshold is None:
            continue
        ratios = [c["ratios"]["candidate"][phase]["p50"] for c in cells if "candidate" in c["ratios"]]
        worst = max(ratios) if ratios else None
        where = (f", the worst batch size ({cells[ratios.index(worst)]['batch']} of "
                 f"{', '.join(str(c['batch']) for c in cells)})" if ratios else "")
        checks.append(_check(f"{phase}_latency_ratio", worst, "<=", threshold,
                             f"candidate/baseline median {what}{where}"))
    # ONNX Runtime against PyTorch for the same model: set by giving the PyTorch folders, always checked then
    for role, parity in (acc.get("pytorch") or {}).items():
        checks.append(_check(f"onnx_vs_pytorch_perplexity_{role}", parity.get("relative_diff"), "<=", PARITY_RTOL,
                             f"|ONNX Runtime - PyTorch| / PyTorch perplexity of the {role} ({parity.get('model')})"))
    return checks


def _fusion_check(baseline: dict[str, int], candidate: dict[str, int], allowed: bool) -> Check:
    """Fused operators the candidate lacks against the baseline, family by family; zero passes.

    A candidate optimised with ``allow_fusion_loss`` passes with its loss stated in the detail.
    """
    missing = {k: v - candidate.get(k, 0) for k, v in baseline.items() if candidate.get(k, 0) < v}
    value = float(sum(missing.values()))
    detail = "fused operators the candidate lacks against the baseline"
    if missing:
        detail += ": " + ", ".join(f"{n} {k}" for k, n in missing.items())
        if allowed:
            detail += " (allowed: the candidate was optimised with allow_fusion_loss)"
    return Check("fused_operators", value, 0.0, "<=", value <= 0 or allowed, detail)
