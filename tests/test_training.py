"""Fine-tuning and evaluation, including recovery fine-tuning of a compressed model."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model, toy_data
from fwsvd_deploy import CompressionConfig, FinetuneConfig, LowRankLinear, compress, evaluate, finetune


def test_finetune_learns_and_keeps_the_best_epoch(tokenizer):
    train, dev = toy_data(128, seed=0), toy_data(32, seed=1)
    model = tiny_model("bert")
    before = evaluate(model, dev, tokenizer, max_length=32)
    result = finetune(model, train, tokenizer,
                      FinetuneConfig(epochs=6, learning_rate=3e-3, batch_size=16, warmup_ratio=0.0),
                      eval_data=dev, max_length=32, progress=False)
    after = evaluate(model, dev, tokenizer, max_length=32)
    assert result.steps == 48 and len(result.history) == 6
    assert before.accuracy == 0.5 and after.accuracy == 1.0
    best = result.history[result.best_epoch - 1]
    assert after.metrics["loss"] == pytest.approx(best["eval_loss"], rel=1e-6)  # the best epoch's weights
    assert set(after.metrics) == {"loss", "accuracy", "macro_f1", "mcc"}


def test_max_steps_overrides_epochs(tokenizer):
    result = finetune(tiny_model("bert"), toy_data(64), tokenizer, FinetuneConfig(epochs=5, max_steps=3,
                      batch_size=16), max_length=32, progress=False)
    assert result.steps == 3


def test_recovery_finetune_keeps_the_low_rank_structure(tokenizer):
    train = toy_data(64)
    model = tiny_model("bert")
    report = compress(model, CompressionConfig(method="svd", ratio=0.3))
    down = model.bert.encoder.layer[0].attention.self.query.down.weight.clone()
    finetune(model, train, tokenizer, FinetuneConfig(epochs=1, learning_rate=1e-3, batch_size=16), max_length=32,
             progress=False)
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert ranks == report.ranks
    assert not torch.equal(down, model.bert.encoder.layer[0].attention.self.query.down.weight)
    assert sum(p.numel() for p in model.parameters()) == report.model_params_after
