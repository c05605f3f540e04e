"""Task metrics on plain arrays (shared by PyTorch evaluation and ONNX validation)."""

from __future__ import annotations

import numpy as np


def classification_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and Matthews correlation (multi-class form)."""
    pred = np.asarray(pred).astype(np.int64)
    true = np.asarray(true).astype(np.int64)
    classes = np.union1d(pred, true)
    f1s = []
    for c in classes:
        tp = float(np.sum((pred == c) & (true == c)))
        fp = float(np.sum((pred == c) & (true != c)))
        fn = float(np.sum((pred != c) & (true == c)))
        denom = 2 * tp + fp + fn
        f1s.append(0.0 if denom == 0 else 2 * tp / denom)
    return {
        "accuracy": float(np.mean(pred == true)) if len(true) else float("nan"),
        "macro_f1": float(np.mean(f1s)) if f1s else float("nan"),
        "mcc": matthews(pred, true),
    }


def matthews(pred: np.ndarray, true: np.ndarray) -> float:
    """Matthews correlation coefficient from the confusion matrix (Gorodkin's multi-class form)."""
    classes = np.union1d(pred, true)
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    cm = np.zeros((k, k), dtype=np.float64)
    for p, t in zip(pred, true, strict=True):
        cm[index[t], index[p]] += 1
    n = cm.sum()
    correct = np.trace(cm)
    t_sum, p_sum = cm.sum(1), cm.sum(0)
    numerator = correct * n - float(t_sum @ p_sum)
    denominator = np.sqrt((n * n - float(p_sum @ p_sum)) * (n * n - float(t_sum @ t_sum)))
    return float(numerator / denominator) if denominator > 0 else 0.0


def regression_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """MSE, Pearson and Spearman correlations."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    return {"mse": float(np.mean((pred - true) ** 2)), "pearson": _pearson(pred, true),
            "spearman": _pearson(_ranks(pred), _ranks(true))}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x):  # average ties
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks
