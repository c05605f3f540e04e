"""Task accuracy of ONNX models through ONNX Runtime (the artefact that ships), and baseline/candidate agreement."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data import TaskData, align_labels
from ..errors import ConfigError, DatasetError
from ..exporters.runtime import ONNX_FILE, make_session, onnx_config, run_session
from ..modeling import load_tokenizer
from ..progress import progress_bar
from .metrics import classification_metrics, regression_metrics


@dataclass(frozen=True)
class OnnxEval:
    """Outputs and metrics of one model on one split."""

    logits: np.ndarray
    metrics: dict[str, float]
    num_examples: int
    kind: str


def task_from_outputs(outputs: dict[str, list[Any]], folder: Path) -> str:
    """``text-classification``, ``token-classification`` or ``question-answering``, from a graph's output shapes."""
    if "start_logits" in outputs and "end_logits" in outputs:
        return "question-answering"
    if "logits" in outputs:
        return "token-classification" if len(outputs["logits"]) == 3 else "text-classification"
    raise ConfigError(f"{folder} outputs {sorted(outputs)}; validation needs a classification, token-classification "
                      "or question-answering model")


def aligned_data(folder: Path, data: TaskData) -> TaskData:
    """``data`` with labels mapped onto the head described by the folder's config."""
    config = onnx_config(folder)
    label2id = config.get("label2id") or {}
    if all(str(k).startswith("LABEL_") for k in label2id):
        label2id = {}
    num_labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 2))
    return align_labels(data, label2id or None, num_labels)


def evaluate_onnx(folder: str | Path, data: TaskData, *, device: str = "cpu", batch_size: int = 64,
                  max_length: int = 128, threads: int | None = None, progress: bool | None = None) -> OnnxEval:
    """Run a text-classification ONNX folder over ``data`` and score it.

    Raises:
        DatasetError: when the data has no labels or they do not fit the model's head.
        ConfigError: when the graph has no ``logits`` output (another task).
    """
    folder = Path(folder)
    if data.labels is None:
        raise DatasetError(f"{data.source}: accuracy needs labels")
    data = aligned_data(folder, data)
    session = make_session(folder / ONNX_FILE, device, threads=threads)
    if "logits" not in [o.name for o in session.get_outputs()]:
        raise ConfigError(f"{folder} has no 'logits' output; accuracy checks need a text-classification model")
    tokenizer = load_tokenizer(str(folder))
    outs = []
    bar = progress_bar(data.batches(tokenizer, batch_size, max_length), progress=progress,
                       total=data.num_batches(batch_size), desc=f"Evaluate {folder.name}", unit="batch", leave=False)
    for batch in bar:
        feed = {k: v.numpy().astype(np.int64) for k, v in batch.items() if k != "labels"}
        outs.append(run_session(session, feed)["logits"].astype(np.float32))
    logits = np.concatenate(outs)
    labels = np.asarray(data.labels)
    if logits.shape[-1] == 1:
        return OnnxEval(logits, regression_metrics(logits[:, 0], labels), len(data), "regression")
    return OnnxEval(logits, classification_metrics(logits.argmax(-1), labels), len(data), "classification")


def agreement(baseline: OnnxEval, candidate: OnnxEval) -> dict[str, float]:
    """Prediction agreement and logit differences between two models on the same examples."""
    if baseline.logits.shape != candidate.logits.shape:
        raise ConfigError(
            f"baseline logits {baseline.logits.shape} and candidate logits {candidate.logits.shape} differ in shape; "
            "the models have different heads"
        )
    diff = np.abs(baseline.logits.astype(np.float64) - candidate.logits.astype(np.float64))
    out = {"max_logit_diff": float(diff.max()), "mean_logit_diff": float(diff.mean())}
    if baseline.kind == "classification":
        out["agreement"] = float(np.mean(baseline.logits.argmax(-1) == candidate.logits.argmax(-1)))
    return out
