"""Fine-tuning and evaluation, including recovery fine-tuning of a compressed model."""

from __future__ import annotations

import pytest
import torch

from conftest import DECODERS, tiny_decoder, tiny_model, toy_data
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


# --- causal language models -------------------------------------------------------------------------------------

def _text_windows(tokenizer, n: int, length: int = 24, seed: int = 0) -> torch.Tensor:
    from conftest import toy_data as toy
    from fwsvd_deploy.data import TextData, lm_windows

    return lm_windows(TextData(toy(200, seed=seed).texts), tokenizer, length, count=n, seed=seed)


def test_lm_recovery_trains_only_the_factors_and_keeps_the_best_step(tokenizer):
    from conftest import tiny_decoder
    from fwsvd_deploy.training import evaluate_lm, finetune_lm

    model = tiny_decoder("llama")
    compress(model, CompressionConfig(method="svd", ratio=0.5))
    frozen = {n: p.clone() for n, p in model.named_parameters() if ".down." not in n and ".up." not in n}
    train, held = _text_windows(tokenizer, 32, length=16), _text_windows(tokenizer, 8, length=16, seed=1)
    before = evaluate_lm(model, held).metrics["perplexity"]
    cfg = FinetuneConfig(max_steps=20, learning_rate=3e-2, batch_size=8, eval_steps=8, trainable="factors",
                         warmup_ratio=0.0)
    result = finetune_lm(model, train, cfg, eval_windows=held, progress=False)
    after = evaluate_lm(model, held).metrics["perplexity"]
    assert result.steps == 20 and [h["step"] for h in result.history] == [0, 8, 16, 20]
    assert after < 0.8 * before and after == pytest.approx(result.best_metric, rel=1e-6)
    assert result.best_step == min(result.history, key=lambda h: h["eval_loss"])["step"]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_lm_recovery_that_only_hurts_restores_the_start(tokenizer):
    from conftest import tiny_decoder
    from fwsvd_deploy.training import evaluate_lm, finetune_lm

    model = tiny_decoder("llama")
    compress(model, CompressionConfig(method="svd", ratio=0.5))
    held = _text_windows(tokenizer, 8, length=16, seed=1)
    finetune_lm(model, _text_windows(tokenizer, 32, length=16), FinetuneConfig(max_steps=20, learning_rate=3e-2,
                batch_size=8, trainable="factors"), progress=False)  # first make it good at this text
    start = {n: p.clone() for n, p in model.named_parameters()}
    noise = torch.randint(1000, 20000, (32, 16), generator=torch.Generator().manual_seed(3))
    result = finetune_lm(model, noise, FinetuneConfig(max_steps=8, learning_rate=3e-2, batch_size=8),
                         eval_windows=held, progress=False)
    assert result.best_step == 0 and result.history[-1]["eval_loss"] > result.history[0]["eval_loss"]
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())
    assert evaluate_lm(model, held).metrics["perplexity"] == pytest.approx(result.best_metric, rel=1e-6)


def test_factors_only_needs_a_compressed_model(tokenizer):
    from conftest import tiny_decoder
    from fwsvd_deploy.errors import FwsvdError
    from fwsvd_deploy.training import finetune_lm

    with pytest.raises(FwsvdError, match="needs a compressed model"):
        finetune_lm(tiny_decoder("llama"), _text_windows(tokenizer, 8), FinetuneConfig(trainable="factors"))


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("compressed", [False, True])
def test_perplexity_one_window_of_logits_at_a_time_is_the_whole_batch_s(family, compressed):
    """evaluate_lm runs the head window by window (split_head); the losses are those of the full logits."""
    from fwsvd_deploy.losses import next_token_nll, split_head
    from fwsvd_deploy.training import evaluate_lm

    model = tiny_decoder(family)
    if compressed:
        compress(model, CompressionConfig(method="svd", ratio=0.5))
    assert split_head(model) is not None
    windows = torch.randint(5, 200, (5, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        nll, n = next_token_nll(model(input_ids=windows).logits, windows)
    got = evaluate_lm(model, windows, batch_size=2)
    assert got.metrics["tokens"] == n == 5 * 16
    assert got.metrics["loss"] == pytest.approx(nll / n, rel=1e-6)
