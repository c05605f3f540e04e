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
    """What fine-tuning did: steps, per-epoch metrics, and the epoch whose weights were kept."""

    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    best_metric: float | None = None


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
    from transformers import get_linear_schedule_with_warmup

    cfg = cfg or FinetuneConfig()
    if train.labels is None:
        raise DatasetError(f"{train.source}: fine-tuning needs labels")
    kind = loss_kind(model)
    metric_name, higher_is_better = _primary(kind)
    steps_per_epoch = train.num_batches(cfg.batch_size)
    total_steps = cfg.max_steps if cfg.max_steps is not None else steps_per_epoch * cfg.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)

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
