"""Perplexity of causal language models on token windows through ONNX Runtime, and the greedy next-token agreement
of two models.

Every window of ``L`` tokens scores its ``L - 1`` next tokens (position ``t`` predicts token ``t + 1``); windows do not
overlap (the stride is the window), so no token is scored twice and none sees context from the window before.
Perplexity is ``exp`` of the mean negative log-likelihood over all scored tokens (token-weighted). ONNX Runtime's
logits go through :func:`~fwsvd_deploy.losses.next_token_nll`, the reduction
:func:`~fwsvd_deploy.training.evaluate_lm` applies to PyTorch's, so the two perplexities differ only by the models'
logits.
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


def score_batch(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int, np.ndarray]:
    """Summed negative log-likelihood of the next tokens, their number, and the greedy prediction at each.

    Args:
        logits: ``(batch, length, vocab)``.
        ids: ``(batch, length)`` the windows' tokens.

    Returns:
        ``(nll, tokens, predicted)``; ``predicted`` is ``(batch, length - 1)``.
    """
    import torch

    from ..losses import next_token_nll

    nll, tokens = next_token_nll(torch.from_numpy(logits), torch.from_numpy(ids))
    return nll, tokens, logits[:, :-1].argmax(-1)


@dataclass
class Tally:
    """Running sums over scored tokens."""

    nll: float = 0.0
    tokens: int = 0
    correct: int = 0

    def add(self, nll: float, tokens: int, predicted: np.ndarray, ids: np.ndarray) -> None:
        self.nll += nll
        self.tokens += tokens
        self.correct += int((predicted == ids[:, 1:]).sum())

    def metrics(self) -> dict[str, float]:
        mean = self.nll / self.tokens
        return {"perplexity": math.exp(mean), "nll": mean, "next_token_accuracy": self.correct / self.tokens}


def _batches(windows: np.ndarray, batch: int, progress: bool | None, desc: str) -> Iterator[tuple[int, np.ndarray]]:
    starts = range(0, len(windows), batch)
    for start in progress_bar(starts, progress=progress, desc=desc, unit="batch", leave=False):
        yield start, windows[start:start + batch]


def onnx_perplexity(models: Mapping[str, tuple[Any, DecoderGraph]], windows: np.ndarray, batch: int, *,
                    head: int | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Perplexity of each ONNX model and the greedy agreement of every model with the first, batch by batch.

    Args:
        models: name -> (session, graph); the first is the reference of the agreement.
        windows: ``(n, length)`` token ids.
        batch: windows per forward pass.
        head: also score the first ``head`` windows on their own (``head`` in the result), from the same logits.

    Returns:
        ``{name: metrics}`` and ``agreement``: ``{name: share of scored positions whose greedy next token equals
        the first model's}`` for the others; with ``head``, ``head``: ``{name: metrics}`` of the first windows.
    """
    tallies = {name: Tally() for name in models}
    heads = {name: Tally() for name in models}
    same = dict.fromkeys(list(models)[1:], 0)
    for start, ids in _batches(windows, batch, progress, "Perplexity"):
        reference = None
        split = 0 if head is None else min(max(head - start, 0), len(ids))
        for name, (session, graph) in models.items():
            logits = session.run(["logits"], graph.prefill_feed(ids))[0]
            nll, tokens, predicted = score_batch(logits, ids)
            tallies[name].add(nll, tokens, predicted, ids)
            if split:
                heads[name].add(*score_batch(logits[:split], ids[:split]), ids[:split])
            if reference is None:
                reference = predicted
            else:
                same[name] += int((predicted == reference).sum())
    scored = tallies[next(iter(models))].tokens
    out: dict[str, Any] = {"metrics": {name: t.metrics() for name, t in tallies.items()},
                           "agreement": {name: n / scored for name, n in same.items()}}
    if head is not None:
        out["head"] = {name: t.metrics() for name, t in heads.items()}
    return out


def relative_difference(value: float, reference: float) -> float:
    return abs(value - reference) / abs(reference)
