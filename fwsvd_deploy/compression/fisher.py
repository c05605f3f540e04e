"""Empirical Fisher of every targeted weight from labelled examples: a Fisher-only view of :mod:`.statistics`."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import CalibrationConfig
from ..data import TaskData
from ..errors import FisherError
from ..losses import loss_kind, per_example_losses
from .statistics import FISHER, CalibrationStats, FisherResult, check_cache_dir, collect_statistics
from .targets import Target, resolve_targets

__all__ = ["FisherResult", "check_cache_dir", "classifier_batches", "collect_fisher", "loss_kind", "per_example_losses"]

DEFAULT_EXAMPLES = 512


def classifier_batches(data: TaskData, tokenizer: Any, batch_size: int, max_length: int) -> list[dict]:
    """Tokenised calibration batches of labelled (or unlabelled) examples, each padded to its longest."""
    return list(data.batches(tokenizer, batch_size, max_length))


def collect_fisher(
    model: nn.Module,
    data: TaskData,
    tokenizer: Any,
    cfg: CalibrationConfig | None = None,
    *,
    target_modules: str | tuple[str, ...] | list[str] = "all-linear",
    exclude_modules: str | tuple[str, ...] | list[str] | None = None,
    targets: list[Target] | None = None,
    max_length: int = 128,
    seed: int = 0,
    progress: bool | None = None,
) -> CalibrationStats:
    """Estimate the empirical Fisher of every targeted weight from labelled examples.

    ``cfg.num_samples`` examples are drawn from ``data`` with ``seed`` (``None`` takes 512). ``targets``, when
    given, are layers already resolved with :func:`resolve_targets` (instead of the patterns).

    Raises:
        FisherError: on non-finite gradients, unlabelled data, a model without a task loss or a cache path that
            is a file.
    """
    cfg = cfg or CalibrationConfig()
    loss_kind(model)
    check_cache_dir(cfg.cache_dir)
    if targets is None:
        targets = resolve_targets(model, target_modules, exclude_modules)
    data = data.sample(DEFAULT_EXAMPLES if cfg.num_samples is None else cfg.num_samples, seed=seed)
    if len(data) == 0:
        raise FisherError("no examples to estimate Fisher from")
    if data.labels is None and loss_kind(model) != "causal_lm":
        raise FisherError("Fisher needs labelled examples; the dataset has no labels")
    batches = classifier_batches(data, tokenizer, cfg.batch_size, max_length)
    return collect_statistics(model, batches, targets, kinds=(FISHER,), estimator=cfg.estimator,
                              cache_dir=cfg.cache_dir, num_examples=len(data), progress=progress, desc="Fisher")
