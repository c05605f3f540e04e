"""Task losses: what fine-tuning, evaluation and Fisher estimation differentiate or report.

Cross-entropy for classifiers, MSE for regression heads, next-token cross-entropy for causal language models.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FisherError


def forward_inputs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a tokenised batch that the model's forward accepts (DistilBERT takes no token types)."""
    accepted = _forward_params(type(model))
    return {k: v for k, v in batch.items() if k != "labels" and k in accepted}


def accepted_inputs(model: nn.Module) -> frozenset[str]:
    """The parameter names of the model's forward."""
    return _forward_params(type(model))


@functools.lru_cache(maxsize=64)
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def loss_kind(model: nn.Module) -> str:
    """``classification``, ``regression`` or ``causal_lm`` from the model's class and config."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        config = model.config
        regression = config.num_labels == 1 or getattr(config, "problem_type", None) == "regression"
        return "regression" if regression else "classification"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    raise FisherError(
        f"cannot form a task loss for {name}; supported: *ForSequenceClassification and causal LMs"
    )


def per_example_losses(model: nn.Module, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """The task loss of each example in ``batch``, shape ``(batch,)``."""
    logits = model(**forward_inputs(model, batch)).logits
    if kind == "causal_lm":
        ids = batch["input_ids"]
        mask = batch.get("attention_mask", torch.ones_like(ids))[:, 1:].to(logits.dtype)
        token_loss = token_nll(logits, ids)
        return (token_loss * mask).sum(1) / mask.sum(1).clamp_min(1)
    if "labels" not in batch:
        raise FisherError("Fisher needs labelled examples; the dataset has no labels")
    labels = batch["labels"]
    if kind == "regression":
        return F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction="none")
    return F.cross_entropy(logits.float(), labels, reduction="none")


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The negative log-likelihood of each next token, ``(batch, length - 1)``, in ``logits``' float type.

    The vocabulary stays the last, contiguous axis. Cross-entropy over a transposed ``(batch, vocab, length)`` view
    takes a strided path that was 3.5 times slower forward and backward for SmolLM2's 49,152-token vocabulary, and
    less exact: on 8 of its windows the summed float32 NLL missed a float64 log-softmax by -0.27 (of 6,705.5), this
    one by -0.04.
    """
    batch, length, vocab = logits.shape
    flat = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1), reduction="none")
    return flat.view(batch, length - 1)


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (float64) and the number of predicted tokens."""
    target = ids[:, 1:]
    nll = token_nll(logits.float(), ids).double()
    if mask is not None:
        keep = mask[:, 1:].bool() & mask[:, :-1].bool()
        return float(nll[keep].sum()), int(keep.sum())
    return float(nll.sum()), int(target.numel())


# Causal LMs whose logits are their output embeddings applied to the base model's last hidden state, unscaled.
_PLAIN_HEAD_TYPES = ("llama", "mistral", "qwen2", "gpt2", "opt")


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(base model, LM head)`` of a causal LM whose logits are ``head(base(...).last_hidden_state)``, so that
    perplexity can take one window's logits at a time (a batch of 8 windows of 256 tokens has 400 MB of logits
    for a 49,152-token vocabulary); ``None`` for another model, which is run whole."""
    if getattr(getattr(model, "config", None), "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(body, nn.Module) or body is model or not isinstance(head, nn.Module):
        return None
    return body, head
