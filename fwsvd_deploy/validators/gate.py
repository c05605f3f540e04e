"""The release gate: every check evaluated, every failure collected, strict comparisons, no rounding first."""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass
from typing import Any

from ..config import GateConfig

_OPS = {"<=": operator.le, ">=": operator.ge}


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
        checks.append(_check("agreement", acc.get("comparison", {}).get("agreement"), ">=", gate.min_agreement,
                             "share of examples with the same predicted class"))
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
