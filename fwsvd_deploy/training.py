"""Supervised fine-tuning and evaluation of sequence classifiers (PyTorch).

``finetune`` trains a fresh head (and the body), and equally a compressed model for recovery: the
factorised layers are plain Linears, so training keeps their low-rank structure.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import FinetuneConfig
from .data import TaskData
from .errors import DatasetError, FwsvdError
from .losses import forward_inputs, loss_kind, per_example_losses
from .progress import progress_bar
from .validators.metrics import classification_metrics, regression_metrics


@dataclass(frozen=True)
class EvalResult:
    """Metrics of a model on one split."""

    metrics: dict[str, float]
    num_examples: int

    @property
    def accuracy(self) -> float:
        return self.metrics["accuracy"]


@dataclass(frozen=True)
class FinetuneResult:
    """What fine-tuning did: steps, evaluation history, and which weights were kept.

    ``best_epoch`` (classifiers) or ``best_step`` (causal LMs, 0: the starting weights) tells where the kept
    weights came from; ``best_metric`` is their accuracy/MSE, or their held-out perplexity.
    """

    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    best_metric: float | None = None
    best_step: int | None = None


def _primary(kind: str) -> tuple[str, bool]:
    return ("accuracy", True) if kind == "classification" else ("mse", False)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: TaskData,
    tokenizer: Any,
    *,
    batch_size: int = 64,
    max_length: int = 128,
    progress: bool | None = None,
) -> EvalResult:
    """Accuracy, macro-F1 and MCC (classification) or MSE/Pearson/Spearman (regression), plus loss, in PyTorch.

    Raises:
        DatasetError: when ``data`` has no labels.
    """
    if data.labels is None:
        raise DatasetError(f"{data.source}: evaluation needs labels")
    kind = loss_kind(model)
    was_training = model.training
    model.eval()
    losses: list[torch.Tensor] = []
    preds: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    bar = progress_bar(data.batches(tokenizer, batch_size, max_length), progress=progress,
                       total=data.num_batches(batch_size), desc="Evaluate", unit="batch", leave=False)
    for batch in bar:
        logits = model(**forward_inputs(model, batch)).logits.float()
        y = batch["labels"]
        if kind == "classification":
            losses.append(nn.functional.cross_entropy(logits, y, reduction="none"))
            preds.append(logits.argmax(-1))
        else:
            losses.append(nn.functional.mse_loss(logits.squeeze(-1), y.float(), reduction="none"))
            preds.append(logits.squeeze(-1))
        labels.append(y)
    model.train(was_training)
    pred = torch.cat(preds).numpy()
    true = torch.cat(labels).numpy()
    metrics = {"loss": float(torch.cat(losses).mean())}
    if kind == "classification":
        metrics.update(classification_metrics(pred, true))
    else:
        metrics.update(regression_metrics(pred, true))
    return EvalResult(metrics, len(data))


def _trainable(model: nn.Module, cfg: FinetuneConfig) -> list[tuple[str, nn.Parameter]]:
    """The parameters training updates: all, or only the factorised layers' (``trainable='factors'``)."""
    if cfg.trainable == "all":
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    from .compression.layers import LowRankLinear

    factors = {id(p) for m in model.modules() if isinstance(m, LowRankLinear) for p in m.parameters()}
    if not factors:
        raise FwsvdError("trainable='factors' needs a compressed model; this one has no factorised layers")
    return [(n, p) for n, p in model.named_parameters() if id(p) in factors]


def _optimizer(model: nn.Module, cfg: FinetuneConfig, total_steps: int) -> tuple[Any, Any]:
    """AdamW (no decay on biases and norms) with linear warm-up and decay; frozen parameters stop needing grads."""
    from transformers import get_linear_schedule_with_warmup

    chosen = _trainable(model, cfg)
    keep = {id(p) for _, p in chosen}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    decay = [p for n, p in chosen if p.dim() >= 2 and "norm" not in n.lower()]
    no_decay = [p for n, p in chosen if not (p.dim() >= 2 and "norm" not in n.lower())]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
    )
    return optimizer, get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)


@torch.no_grad()
def evaluate_lm(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8,
                progress: bool | None = None) -> EvalResult:
    """Perplexity of a causal LM over token windows: ``exp`` of the token-weighted mean next-token loss.

    Each window is scored on its own (no context carried over): ``length - 1`` predicted tokens per window. The
    head runs on one window at a time where the model allows it (:func:`~fwsvd_deploy.losses.split_head`): the
    same losses, with one window's logits in memory instead of the batch's.
    """
    from .data import window_batches
    from .losses import next_token_nll, split_head

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    batches = window_batches(windows, batch_size)
    split = split_head(model)
    for batch in progress_bar(batches, progress=progress, desc="Perplexity", unit="batch", leave=False):
        ids, inputs = batch["input_ids"], {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if split is None:
            pieces = [(model(**inputs).logits, ids)]
        else:  # one window's logits at a time
            hidden = split[0](**inputs).last_hidden_state
            pieces = ((split[1](row[None]), window[None]) for row, window in zip(hidden, ids, strict=True))
        for logits, window in pieces:
            nll, n = next_token_nll(logits, window)
            total, count = total + nll, count + n
    model.train(was_training)
    loss = total / max(count, 1)
    return EvalResult({"perplexity": math.exp(loss), "loss": loss, "tokens": float(count)}, int(windows.shape[0]))


def finetune(
    model: nn.Module,
    train: TaskData,
    tokenizer: Any,
    cfg: FinetuneConfig | None = None,
    *,
    eval_data: TaskData | None = None,
    max_length: int = 128,
    progress: bool | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` in place: AdamW, linear warm-up then linear decay, optional per-epoch eval.

    With ``eval_data`` and ``cfg.eval_every_epoch`` the weights of the best epoch are restored at the end.

    Raises:
        DatasetError: when the training data has no labels.
        FwsvdError: when the loss becomes NaN or inf.
    """
    cfg = cfg or FinetuneConfig()
    if train.labels is None:
        raise DatasetError(f"{train.source}: fine-tuning needs labels")
    kind = loss_kind(model)
    metric_name, higher_is_better = _primary(kind)
    steps_per_epoch = train.num_batches(cfg.batch_size)
    total_steps = cfg.max_steps if cfg.max_steps is not None else steps_per_epoch * cfg.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)

    optimizer, scheduler = _optimizer(model, cfg, total_steps)

    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    history: list[dict[str, float]] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_metric: float | None = None
    best_key: tuple[float, float] | None = None
    best_epoch: int | None = None
    step = 0
    bar = progress_bar(total=total_steps, progress=progress, desc="Fine-tune", unit="step")
    for epoch in range(epochs):
        model.train()
        for batch in train.batches(tokenizer, cfg.batch_size, max_length, shuffle=True, seed=cfg.seed + epoch):
            loss = per_example_losses(model, batch, kind).mean()
            if not torch.isfinite(loss):
                bar.close()
                raise FwsvdError(f"training loss became {float(loss)} at step {step}; lower the learning rate")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.4f}")
            if step >= total_steps:
                break
        record: dict[str, float] = {"epoch": epoch + 1, "step": step}
        if eval_data is not None and cfg.eval_every_epoch:
            result = evaluate(model, eval_data, tokenizer, batch_size=max(cfg.batch_size, 64),
                              max_length=max_length, progress=progress)
            record.update({f"eval_{k}": v for k, v in result.metrics.items()})
            value = result.metrics[metric_name]
            # ties on the metric go to the lower evaluation loss
            key = (value if higher_is_better else -value, -result.metrics["loss"])
            if best_key is None or key > best_key:
                best_key, best_metric, best_epoch = key, value, epoch + 1
                best_state = copy.deepcopy(model.state_dict()) if epochs > 1 else None
        history.append(record)
        if step >= total_steps:
            break
    bar.close()
    if best_state is not None and best_epoch != len(history):
        model.load_state_dict(best_state)
    model.eval()
    return FinetuneResult(step, time.perf_counter() - start, history, best_epoch, best_metric)


def finetune_lm(
    model: nn.Module,
    train: torch.Tensor,
    cfg: FinetuneConfig | None = None,
    *,
    eval_windows: torch.Tensor | None = None,
    progress: bool | None = None,
) -> FinetuneResult:
    """Train a causal LM in place on token windows ``(n, length)`` with the next-token loss.

    AdamW with linear warm-up and decay over ``cfg.max_steps`` (or ``cfg.epochs`` passes); with ``eval_windows``
    the held-out perplexity is measured before training, then every ``cfg.eval_steps`` steps and at the end (after
    each epoch when ``eval_steps`` is not set), and the weights of the best evaluation are restored at the end (only
    the trained parameters are kept aside), the starting weights included.

    Raises:
        FwsvdError: when the loss becomes NaN or inf, or ``trainable='factors'`` on a dense model.
    """
    from .data import window_batches

    cfg = cfg or FinetuneConfig()
    steps_per_epoch = math.ceil(train.shape[0] / cfg.batch_size)
    total_steps = cfg.max_steps if cfg.max_steps is not None else steps_per_epoch * cfg.epochs
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    optimizer, scheduler = _optimizer(model, cfg, total_steps)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    evaluate_now = eval_windows is not None and cfg.eval_every_epoch
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None

    def checkpoint(epoch: int) -> None:
        nonlocal best
        assert eval_windows is not None
        result = evaluate_lm(model, eval_windows, batch_size=cfg.batch_size, progress=False)
        history.append({"epoch": epoch, "step": step, **{f"eval_{k}": v for k, v in result.metrics.items()}})
        loss = result.metrics["loss"]
        if best is None or loss < best[0]:
            best = (loss, step, {n: p.detach().clone() for n, p in trained})
        model.train()

    step = 0
    bar = progress_bar(total=total_steps, progress=progress, desc="Train LM", unit="step")
    try:
        if evaluate_now:
            checkpoint(0)  # the starting point competes too: training must improve on it to be kept
        epoch = 0
        while step < total_steps:
            epoch += 1
            model.train()
            order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(cfg.seed + epoch))
            for batch in window_batches(train[order], cfg.batch_size):
                loss = per_example_losses(model, batch, "causal_lm").mean()
                if not torch.isfinite(loss):
                    raise FwsvdError(f"training loss became {float(loss)} at step {step}; lower the learning rate")
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for _, p in trained], cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{float(loss.detach()):.4f}")
                if evaluate_now and cfg.eval_steps is not None and (step % cfg.eval_steps == 0
                                                                    or step == total_steps):
                    checkpoint(epoch)
                if step >= total_steps:
                    break
            if evaluate_now and cfg.eval_steps is None:
                checkpoint(epoch)
    finally:
        bar.close()
        for name, p in model.named_parameters():
            p.requires_grad_(grad_flags[name])
    best_step = None
    if best is not None:
        best_step = best[1]
        params = dict(trained)
        with torch.no_grad():
            for name, value in best[2].items():
                params[name].copy_(value)
    model.eval()
    best_ppl = None if best is None else math.exp(best[0])
    return FinetuneResult(step, time.perf_counter() - start, history, best_metric=best_ppl, best_step=best_step)
