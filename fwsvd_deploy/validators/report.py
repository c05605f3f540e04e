"""The validation report: ``report.json`` (versioned schema), ``report.md`` for people, ``junit.xml`` for CI."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .decoder import CAUSAL_LM_TASK
from .gate import Check

REPORT_SCHEMA = "fwsvd-deploy/validation-report"
REPORT_VERSION = 1

# JSON Schema (draft 2020-12) of report.json; tests validate every written report against it.
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema", "schema_version", "created", "baseline", "candidate", "settings", "accuracy", "gate"],
    "properties": {
        "schema": {"const": REPORT_SCHEMA},
        "schema_version": {"const": REPORT_VERSION},
        "created": {"type": "string"},
        "baseline": {"$ref": "#/$defs/model"},
        "candidate": {"$ref": "#/$defs/model"},
        "settings": {"type": "object"},
        "data": {"type": "object"},
        "accuracy": {
            "type": "object",
            "required": ["baseline", "candidate", "comparison", "examples"],
            "properties": {
                "baseline": {"type": "object", "additionalProperties": {"type": "number"}},
                "candidate": {"type": "object", "additionalProperties": {"type": "number"}},
                "comparison": {"type": "object", "additionalProperties": {"type": "number"}},
                "examples": {"type": "integer", "minimum": 1},
            },
        },
        "latency": {"type": ["object", "null"]},
        "generation": {
            "type": ["object", "null"],
            "required": ["prompt_tokens", "new_tokens", "threads", "rounds", "cells"],
            "properties": {"cells": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["batch", "models", "ratios"],
                "properties": {"models": {"type": "object", "additionalProperties": {
                    "type": "object",
                    "required": ["prefill", "decode", "decode_per_round", "prefill_tokens_per_s",
                                 "decode_tokens_per_s"],
                }}},
            }}},
        },
        "memory": {"type": ["object", "null"]},
        "environment": {"type": "object"},
        "notes": {"type": "array", "items": {"type": "string"}},
        "gate": {
            "type": "object",
            "required": ["passed", "checks", "thresholds"],
            "properties": {
                "passed": {"type": "boolean"},
                "thresholds": {"type": "object"},
                "checks": {"type": "array", "items": {
                    "type": "object",
                    "required": ["name", "value", "threshold", "comparison", "passed", "detail"],
                    "properties": {
                        "name": {"type": "string"},
                        "value": {"type": ["number", "null"]},
                        "threshold": {"type": "number"},
                        "comparison": {"enum": ["<=", ">="]},
                        "passed": {"type": "boolean"},
                        "detail": {"type": "string"},
                    },
                }},
            },
        },
    },
    "$defs": {"model": {"type": "object", "required": ["path", "fingerprint"],
                        "properties": {"path": {"type": "string"}, "fingerprint": {"type": "string"}}}},
}


def write_reports(folder: Path, report: dict[str, Any], checks: list[Check]) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (folder / "report.md").write_text(markdown(report, checks))
    (folder / "junit.xml").write_text(junit(checks, report))
    if report.get("latency"):
        from .plots import latency_plot

        latency_plot(report["latency"], folder / "latency.png")
    if report.get("generation"):
        from .plots import generation_plot

        generation_plot(report["generation"], folder / "generation.png")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def check_value(value: float | None) -> str:
    """A check's figure for people: four decimals, or three significant digits below 0.001 (parity, logit diffs)."""
    if value is not None and value and abs(value) < 1e-3:
        return f"{value:.3g}"
    return _fmt(None if value is None else float(value))


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.3f}"


def markdown(report: dict[str, Any], checks: list[Check]) -> str:
    gate = "PASSED" if report["gate"]["passed"] else "FAILED"
    acc = report["accuracy"]
    causal = acc.get("task") == CAUSAL_LM_TASK
    examples = f"{acc['examples']} " + (f"windows of {acc['windows']['length']} tokens" if causal else "examples")
    lines = [
        f"# Validation: {gate}",
        "",
        f"Baseline `{report['baseline']['path']}` vs candidate `{report['candidate']['path']}` on "
        f"{examples} of {report.get('data', {}).get('source', 'the evaluation split')}, "
        f"{report['settings']['device']} execution provider.",
        "",
        "## Gate",
        "",
        "| check | value | threshold | result | what |",
        "|---|---:|---:|---|---|",
    ]
    for c in checks:
        lines.append(f"| {c.name} | {check_value(c.value)} | {c.comparison} {c.threshold:g} | "
                     f"{'pass' if c.passed else '**FAIL**'} | {c.detail} |")
    if not checks:
        lines.append("| (no thresholds set) | | | | |")
    for note in report.get("notes") or []:
        lines += ["", f"Note: {note}."]
    if causal:
        from .causal_lm import markdown_sections

        lines += markdown_sections(report)
    else:
        lines += _accuracy_lines(acc)
    latency = report.get("latency")
    if latency:
        lines += ["", f"## Latency ({latency['threads']} threads, {latency['rounds']} interleaved rounds, median ms; "
                  "plot: latency.png)", "", *latency_table(latency)]
    memory = report.get("memory")
    if memory:
        lines += ["", "## Memory", "", "| | baseline | candidate | ratio |", "|---|---:|---:|---:|"]
        b, c = memory["baseline"], memory["candidate"]
        lines.append(f"| size on disk (MB) | {b['disk_bytes'] / 2**20:.1f} | {c['disk_bytes'] / 2**20:.1f} | "
                     f"{_ratio(c['disk_bytes'], b['disk_bytes'])} |")
        lines.append(f"| parameters | {b['parameters']:,} | {c['parameters']:,} | "
                     f"{_ratio(c['parameters'], b['parameters'])} |")
        if "weight_bytes" in b and "weight_bytes" in c:  # what the matrix products read, by kind of weight
            for kind in ("float", "int8", "int4", "scales"):
                wb, wc = b["weight_bytes"].get(kind, 0), c["weight_bytes"].get(kind, 0)
                if wb or wc:
                    lines.append(f"| matrix weights: {kind} (MB) | {wb / 2**20:.1f} | {wc / 2**20:.1f} | "
                                 f"{_ratio(wc, wb) if wb else '-'} |")
        if b["host"].get("available") and c["host"].get("available"):
            hb, hc = b["host"]["session_mb"], c["host"]["session_mb"]
            lines.append(f"| session peak host memory (MB) | {hb:.0f} | {hc:.0f} | {_ratio(hc, hb)} |")
        if "kv_cache_bytes_per_token" in b:
            kb, kc = b["kv_cache_bytes_per_token"], c["kv_cache_bytes_per_token"]
            lines.append(f"| KV-cache bytes per token | {kb:,} | {kc:,} | {_ratio(kc, kb)} |")
        bd, device = b.get("device", {}), c.get("device", {})
        if device.get("available") and bd.get("available"):
            lines.append(f"| session device memory (MB) | {bd['used_mb']:.0f} | {device['used_mb']:.0f} | "
                         f"{_ratio(device['used_mb'], bd['used_mb'])} |")
            lines += ["", f"Device memory: {device.get('method')}."]
        elif not device.get("available"):
            lines.append(f"| device memory | unavailable | unavailable | {device.get('reason', '')} |")
        if "probe" in b:
            p = b["probe"]
            lines += ["", f"Session peak memory: loading the model, a prefill of {p['prompt_tokens']} tokens at batch "
                      f"{p['batch']}, then {p['new_tokens']} decode steps."]
    return "\n".join(lines) + "\n"


def latency_table(latency: dict[str, Any]) -> list[str]:
    """Markdown rows of a latency grid: every model's median, and every later model's ratio to the first with the
    p10-p90 of its per-round ratio."""
    cells = latency["cells"]
    names = list(cells[0]["models"])
    first, others = names[0], names[1:]
    lines = ["| batch x sequence | " + " | ".join(f"{n} p50 ms" for n in names)
             + "".join(f" | {n} / {first} | p10-p90" for n in others) + " |",
             "|---|" + "---:|" * len(names) + "---:|---|" * len(others)]
    for cell in cells:
        row = [f"{cell['models'][n]['p50_ms']:.1f}" for n in names]
        for n in others:
            r = cell["ratios"][n]
            row += [f"{r['p50']:.3f}", f"{r['p10']:.3f}-{r['p90']:.3f}"]
        lines.append(f"| {cell['batch']} x {cell['sequence']} | " + " | ".join(row) + " |")
    return lines


def _accuracy_lines(acc: dict[str, Any]) -> list[str]:
    lines = ["", "## Accuracy (ONNX Runtime)", "", "| metric | baseline | candidate |", "|---|---:|---:|"]
    for key, value in acc["baseline"].items():
        lines.append(f"| {key} | {_fmt(value)} | {_fmt(acc['candidate'].get(key))} |")
    for key, value in acc["comparison"].items():
        lines.append(f"| {key} | | {_fmt(value, 6)} |")
    return lines


def junit(checks: list[Check], report: dict[str, Any]) -> str:
    failures = sum(not c.passed for c in checks)
    suite = ET.Element("testsuite", name="fwsvd-deploy.gate", tests=str(len(checks)), failures=str(failures),
                       errors="0", skipped="0")
    for c in checks:
        case = ET.SubElement(suite, "testcase", classname="fwsvd-deploy.gate", name=c.name)
        ET.SubElement(case, "system-out").text = f"{c.name} = {c.value} ({c.comparison} {c.threshold}): {c.detail}"
        if not c.passed:
            message = f"{c.name} = {c.value}, needs {c.comparison} {c.threshold}"
            failure = ET.SubElement(case, "failure", message=message)
            failure.text = c.detail
    root = ET.Element("testsuites", name="fwsvd-deploy", tests=str(len(checks)), failures=str(failures))
    root.append(suite)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
