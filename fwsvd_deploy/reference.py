"""The pipeline YAML reference, generated from the configuration dataclasses so that it cannot drift from them.

Every key of every section comes from the dataclass that reads it, its default from :func:`pipeline_defaults`
for each task, and its meaning from the ``Attributes:`` section of the dataclass's docstring.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from typing import Any

from .config import _SECTIONS, PIPELINE_TASKS, FinetuneConfig, PipelineConfig, StageSwitch, pipeline_defaults

_ATTRIBUTE = re.compile(r"^ {4}(?P<names>[a-z_][a-z0-9_ /]*):\s*(?P<text>.*)$")


def attribute_docs(cls: type) -> dict[str, str]:
    """The meaning of each field from the ``Attributes:`` section of ``cls``'s docstring.

    A line may name several fields (``train_split / eval_split: ...``); each of them gets the text.
    """
    doc = inspect.cleandoc(cls.__doc__ or "")
    if "Attributes:" not in doc:
        return {}
    lines = doc.split("Attributes:", 1)[1].splitlines()
    docs: dict[str, str] = {}
    current: list[str] = []
    for line in lines:
        match = _ATTRIBUTE.match(line)
        if match:
            current = [name.strip() for name in match["names"].split("/")]
            for name in current:
                docs[name] = match["text"].strip()
        elif line.startswith(" " * 8) and current:
            for name in current:
                docs[name] = f"{docs[name]} {line.strip()}"
        elif line.strip() and not line.startswith(" " * 4):
            break  # the docstring's next section
    return docs


def section_docs(name: str) -> dict[str, str]:
    """Field meanings of one pipeline section (the fine-tuning switches read :class:`FinetuneConfig`)."""
    cls = _SECTIONS[name]
    if cls is StageSwitch:
        docs = attribute_docs(FinetuneConfig)
        what = "the base model is fine-tuned first" if name == "finetune" else "the compressed model is fine-tuned"
        docs["enabled"] = f"whether this stage runs: {what}."
        return docs
    return attribute_docs(cls)


def _value(value: Any) -> str:
    if isinstance(value, tuple):
        value = [list(v) if isinstance(v, tuple) else v for v in value]
    return f"`{json.dumps(value)}`"


def _rst_to_markdown(text: str) -> str:
    text = re.sub(r":(?:class|func|data|meth):`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`").replace("|", "\\|")


def _paragraph(text: str) -> str:
    return " ".join(text.split())


def pipeline_reference() -> str:
    """Markdown: one table per section with every key, its default for each task, and what it means."""
    defaults = {task: PipelineConfig.for_task(task).to_dict() for task in PIPELINE_TASKS}
    out = ["| key | default (`text-classification`) | default (`causal-lm`) |", "|---|---|---|"]
    for key in ("task", "model"):
        encoder, decoder = (_value(defaults[task][key]) for task in PIPELINE_TASKS)
        out.append(f"| `{key}` | {encoder} | {decoder} |")
    out.append("")
    out.append(_paragraph(_rst_to_markdown((PipelineConfig.__doc__ or "").strip().split("\n\n", 1)[-1])))
    for name, cls in _SECTIONS.items():
        docs = section_docs(name)
        fields = list(defaults["text-classification"][name])
        heading = (FinetuneConfig if cls is StageSwitch else cls).__doc__ or ""
        out += ["", f"## `{name}`", "", _paragraph(_rst_to_markdown(heading.strip().split("\n\n", 1)[0])), "",
                "| key | default (`text-classification`) | default (`causal-lm`) | meaning |", "|---|---|---|---|"]
        for key in fields:
            meaning = _rst_to_markdown(docs.get(key, "")) or "(not documented)"
            out.append(f"| `{key}` | {_value(defaults['text-classification'][name][key])} | "
                       f"{_value(defaults['causal-lm'][name][key])} | {meaning} |")
    return "\n".join(out) + "\n"


def undocumented_keys() -> list[str]:
    """``section.key`` for every pipeline key whose dataclass docstring does not describe it."""
    missing = []
    for name, cls in _SECTIONS.items():
        docs = section_docs(name)
        keys = [f.name for f in dataclasses.fields(FinetuneConfig)] + ["enabled"] if cls is StageSwitch else [
            f.name for f in dataclasses.fields(cls)]
        missing += [f"{name}.{key}" for key in keys if key not in docs]
    return missing


__all__ = ["attribute_docs", "pipeline_defaults", "pipeline_reference", "section_docs", "undocumented_keys"]
