"""Perplexity of causal language models on token windows, through ONNX Runtime or PyTorch, and the greedy
next-token agreement of two models.

Every window of ``L`` tokens scores its ``L - 1`` next tokens (position ``t`` predicts token ``t + 1``); windows do not
overlap (the stride is the window), so no token is scored twice and none sees context from the window before.
Perplexity is ``exp`` of the mean negative log-likelihood over all scored tokens (token-weighted). ONNX Runtime and
PyTorch logits go through the same reduction (:func:`token_scores`, log-sum-exp accumulated in float64), so their
perplexities differ only by the models' logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..progress import progress_bar
from .decoder import DecoderGraph

# ONNX Runtime vs PyTorch perplexity of the same model, relative difference allowed (float32 graphs)
PARITY_RTOL = 1e-3
# float32 logits one batch of windows may hold: a 256-token window of a 49152-token vocabulary takes 48 MiB
LOGITS_BUDGET = 256 * 2**20


def window_batch(requested: int, length: int, vocab: int) -> int:
    """Windows per forward pass: ``requested``, fewer when their logits would pass :data:`LOGITS_BUDGET`."""
    return max(1, min(requested, LOGITS_BUDGET // (length * vocab * 4)))


def token_scores(logits: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Negative log-likelihood of each next token and the greedy prediction at each scored position.

    Args:
        logits: ``(batch, length, vocab)``.
        ids: ``(batch, length)`` the windows' tokens.

    Returns:
        ``nll`` (float64) and ``predicted`` token ids, both ``(batch, length - 1)``.
    """
    batch, length = ids.shape
    scored = logits[:, :-1]
    predicted = scored.argmax(-1)
    nll = np.empty((batch, length - 1), dtype=np.float64)
    rows = np.arange(length - 1)
    for i in range(batch):
        x = scored[i].astype(np.float32, copy=False)
        top = x.max(-1)
        lse = np.log(np.exp(x - top[:, None]).sum(-1, dtype=np.float64)) + top
        nll[i] = lse - x[rows, ids[i, 1:]]
    return nll, predicted


@dataclass
class Tally:
    """Running sums over scored tokens."""

    nll: float = 0.0
    tokens: int = 0
    correct: int = 0

    def add(self, nll: np.ndarray, predicted: np.ndarray, ids: np.ndarray) -> None:
        self.nll += float(nll.sum())
        self.tokens += nll.size
        self.correct += int((predicted == ids[:, 1:]).sum())

    def metrics(self) -> dict[str, float]:
        mean = self.nll / self.tokens
        return {"perplexity": math.exp(mean), "nll": mean, "next_token_accuracy": self.correct / self.tokens}


def _batches(windows: np.ndarray, batch: int, progress: bool | None, desc: str) -> Iterator[np.ndarray]:
    starts = range(0, len(windows), batch)
    for start in progress_bar(starts, progress=progress, desc=desc, unit="batch", leave=False):
        yield windows[start:start + batch]


def onnx_perplexity(models: Mapping[str, tuple[Any, DecoderGraph]], windows: np.ndarray, batch: int, *,
                    progress: bool | None = None) -> dict[str, Any]:
    """Perplexity of each ONNX model and the greedy agreement of every model with the first, batch by batch.

    Args:
        models: name -> (session, graph); the first is the reference of the agreement.
        windows: ``(n, length)`` token ids.
        batch: windows per forward pass.

    Returns:
        ``{name: metrics}`` and ``agreement``: ``{name: share of scored positions whose greedy next token equals
        the first model's}`` for the others.
    """
    tallies = {name: Tally() for name in models}
    same = dict.fromkeys(list(models)[1:], 0)
    for ids in _batches(windows, batch, progress, "Perplexity"):
        reference = None
        for name, (session, graph) in models.items():
            logits = session.run(["logits"], graph.prefill_feed(ids))[0]
            nll, predicted = token_scores(logits, ids)
            tallies[name].add(nll, predicted, ids)
            if reference is None:
                reference = predicted
            else:
                same[name] += int((predicted == reference).sum())
    scored = tallies[next(iter(models))].tokens
    return {"metrics": {name: t.metrics() for name, t in tallies.items()},
            "agreement": {name: n / scored for name, n in same.items()}}


def torch_perplexity(model: Any, windows: np.ndarray, batch: int, *, progress: bool | None = None) -> dict[str, float]:
    """Perplexity of a PyTorch causal LM on the same windows, through the same reduction as :func:`onnx_perplexity`."""
    import torch

    tally = Tally()
    with torch.inference_mode():
        for ids in _batches(windows, batch, progress, "Perplexity (PyTorch)"):
            tokens = torch.from_numpy(ids)
            logits = model(input_ids=tokens, attention_mask=torch.ones_like(tokens), use_cache=False).logits
            tally.add(*token_scores(logits.float().numpy(), ids), ids)
    return tally.metrics()


def relative_difference(value: float, reference: float) -> float:
    return abs(value - reference) / abs(reference)
