"""Empirical Fisher: exactness against a per-example loop, estimators, caching, data parallelism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import TOL, tiny_causal_lm, tiny_model, toy_data
from fwsvd_deploy import FisherConfig, collect_fisher, resolve_targets
from fwsvd_deploy.errors import FisherError
from fwsvd_deploy.losses import loss_kind, per_example_losses


def _loop_fisher(model, data, tokenizer, estimator: str, batch_size: int = 8):
    """Reference: ordinary autograd, one backward per example (or per batch for batch_mean)."""
    targets = resolve_targets(model)
    sums = {t.name: torch.zeros_like(t.module.weight) for t in targets}
    kind = loss_kind(model)
    size = 1 if estimator == "per_example" else batch_size
    for batch in data.batches(tokenizer, size, 32):
        model.zero_grad()
        per_example_losses(model, batch, kind).mean().backward()
        for t in targets:
            sums[t.name] += t.module.weight.grad.square()
    return sums


def _assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    assert float((a - b).norm() / b.norm()) < rel


@pytest.mark.parametrize("arch", ["bert", "gpt2", "distilbert"])
@pytest.mark.parametrize("estimator", ["per_example", "batch_mean"])
def test_matches_explicit_autograd(arch, estimator, tokenizer):
    data = toy_data(20)
    model = tiny_model(arch)
    got = collect_fisher(model, data, tokenizer, FisherConfig(num_samples=None, batch_size=8, estimator=estimator),
                         max_length=32)
    want = _loop_fisher(model, data, tokenizer, estimator)
    assert got.num_examples == 20 and got.estimator == estimator and not got.from_cache
    for name, tensor in want.items():
        assert got.fisher[name].dtype == torch.float32
        _assert_close_rel(got.fisher[name], tensor, TOL["fisher_sum"])


def test_estimators_differ(tokenizer, data):
    model = tiny_model("bert")
    a = collect_fisher(model, data, tokenizer, FisherConfig(estimator="per_example"), max_length=32).fisher
    b = collect_fisher(model, data, tokenizer, FisherConfig(estimator="batch_mean"), max_length=32).fisher
    name = next(iter(a))
    assert float((a[name] - b[name]).norm() / a[name].norm()) > 0.1


def test_causal_lm_uses_next_token_loss(tokenizer, data):
    model = tiny_causal_lm()
    got = collect_fisher(model, data.select(range(12)), tokenizer, FisherConfig(batch_size=4), max_length=32)
    assert len(got.fisher) == 8 and all(torch.isfinite(f).all() and f.sum() > 0 for f in got.fisher.values())


def test_model_state_is_restored(tokenizer, data):
    model = tiny_model("bert").train()
    flags = [p.requires_grad for p in model.parameters()]
    collect_fisher(model, data, tokenizer, max_length=32)
    assert model.training and flags == [p.requires_grad for p in model.parameters()]
    assert all(p.grad is None for p in model.parameters())


def test_cache_hit_skips_the_backward_passes(tokenizer, data, tmp_path):
    model = tiny_model("bert")
    cfg = FisherConfig(cache_dir=str(tmp_path))
    first = collect_fisher(model, data, tokenizer, cfg, max_length=32)
    assert not first.from_cache and Path(first.cache_path).is_file()
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    second = collect_fisher(model, data, tokenizer, cfg, max_length=32)
    handle.remove()
    assert second.from_cache and calls == [] and second.key == first.key
    assert all(torch.equal(first.fisher[k], second.fisher[k]) for k in first.fisher)
    with safe_open(first.cache_path, "pt") as f:
        assert json.loads(f.metadata()["meta"])["estimator"] == "per_example"
    # other data, other settings or other weights: a new key
    assert collect_fisher(model, data.select(range(10)), tokenizer, cfg, max_length=32).key != first.key
    assert collect_fisher(model, data, tokenizer, cfg, max_length=8).key != first.key  # truncated: other batches
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    assert not collect_fisher(model, data, tokenizer, cfg, max_length=32).from_cache
    assert not list(tmp_path.glob(".*tmp"))


def test_a_corrupt_cache_file_is_a_miss_and_is_rewritten(tokenizer, data, tmp_path, caplog):
    model = tiny_model("bert")
    cfg = FisherConfig(cache_dir=str(tmp_path))
    first = collect_fisher(model, data, tokenizer, cfg, max_length=32)
    path = Path(first.cache_path)
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="fwsvd_deploy"):
        again = collect_fisher(model, data, tokenizer, cfg, max_length=32)
    assert not again.from_cache and "is unreadable" in caplog.text and "recomputing" in caplog.text
    assert all(torch.equal(first.fisher[k], again.fisher[k]) for k in first.fisher)
    assert collect_fisher(model, data, tokenizer, cfg, max_length=32).from_cache  # the file was written anew


def test_a_cache_path_that_is_a_file_is_refused_before_any_pass(tokenizer, data, tmp_path):
    model = tiny_model("bert")
    (tmp_path / "file").write_text("x")
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(FisherError, match="is not a folder"):
        collect_fisher(model, data, tokenizer, FisherConfig(cache_dir=str(tmp_path / "file" / "sub")),
                       max_length=32)
    handle.remove()
    assert calls == []


def test_the_examples_drawn_follow_the_seed(tokenizer, data):
    model = tiny_model("bert")
    cfg = FisherConfig(num_samples=16, cache_dir=None)
    a, b = (collect_fisher(model, data, tokenizer, cfg, max_length=32, seed=s) for s in (0, 1))
    again = collect_fisher(model, data, tokenizer, cfg, max_length=32, seed=0)
    name = next(iter(a.fisher))
    assert not torch.equal(a.fisher[name], b.fisher[name]) and torch.equal(a.fisher[name], again.fisher[name])


def test_compress_checks_the_layers_the_statistics_were_collected_for(tokenizer, data):
    from fwsvd_deploy import CompressionConfig, compress

    model = tiny_model("bert")
    fisher = collect_fisher(model, data, tokenizer, target_modules=("query",), max_length=32)
    assert fisher.targets == ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query")
    with pytest.raises(FisherError, match="collected for other layers than the targets"):
        compress(model, CompressionConfig(method="fwsvd", target_modules=("query", "key")), fisher)
    compress(model, CompressionConfig(method="fwsvd", target_modules=("query",)), fisher)


def test_non_finite_gradients_are_an_error(tokenizer, data):
    model = tiny_model("bert")
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight[0, 0] = float("inf")
    with pytest.raises(FisherError, match="NaN or inf"):
        collect_fisher(model, data, tokenizer, max_length=32)


def test_unlabelled_data_is_an_error(tokenizer, data):
    from dataclasses import replace

    with pytest.raises(FisherError, match="labelled"):
        collect_fisher(tiny_model("bert"), replace(data, labels=None), tokenizer, max_length=32)


def test_two_processes_equal_one(tokenizer, tmp_path):
    """torchrun with 2 CPU processes (gloo): each rank takes half the batches, the sums are all-reduced."""
    from fwsvd_deploy.compression import collect_statistics

    out = tmp_path / "stats.safetensors"
    tests_dir = Path(__file__).parent
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(tests_dir / "fisher_worker.py"), str(out), str(tests_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = load_file(str(out))
    model = tiny_model("bert")
    one = collect_statistics(model, list(toy_data().batches(tokenizer, 5, 32)), resolve_targets(model),
                             kinds=("fisher", "inputs"), progress=False)
    assert {k[len("fisher."):] for k in two if k.startswith("fisher.")} == set(one.fisher)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert int(meta["num_examples"]) == one.num_examples == len(toy_data())
    assert {k[len("tokens."):]: int(v) for k, v in meta.items() if k.startswith("tokens.")} == one.tokens
    for name, tensor in one.fisher.items():
        _assert_close_rel(two[f"fisher.{name}"], tensor, TOL["fisher_sum"])
    for group, moment in one.second_moment.items():
        _assert_close_rel(two[f"moment.{group}"], moment, TOL["fisher_sum"])
        _assert_close_rel(two[f"abs.{group}"], one.abs_sum[group], TOL["fisher_sum"])


@pytest.mark.parametrize("estimator", ["per_example", "batch_mean"])
def test_shared_layers_sum_all_uses_before_squaring(tokenizer, estimator):
    """ALBERT runs one layer several times per forward: an example's gradient is the sum over its uses."""
    from conftest import tiny_encoder

    data = toy_data(12)
    model = tiny_encoder("albert", "text-classification")
    got = collect_fisher(model, data, tokenizer, FisherConfig(num_samples=None, batch_size=4, estimator=estimator),
                         max_length=32)
    want = _loop_fisher(model, data, tokenizer, estimator, batch_size=4)
    assert len(want) == 6
    for name, tensor in want.items():
        _assert_close_rel(got.fisher[name], tensor, TOL["fisher_sum"])


def test_next_token_losses_match_a_float64_log_softmax() -> None:
    from fwsvd_deploy.losses import next_token_nll, token_nll

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 50, generator=gen) * 4
    ids = torch.randint(0, 50, (3, 9), generator=gen)
    reference = -torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    got = token_nll(logits, ids)
    assert got.shape == (3, 8)
    torch.testing.assert_close(got.double(), reference, rtol=1e-6, atol=1e-6)
    nll, count = next_token_nll(logits, ids)
    assert count == 24 and nll == pytest.approx(float(reference.sum()), rel=1e-6)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0  # padding: a target or a context token that is padding is not scored
    nll, count = next_token_nll(logits, ids, mask)
    keep = (mask[:, 1:] * mask[:, :-1]).bool()
    assert count == 21 and nll == pytest.approx(float(reference[keep].sum()), rel=1e-6)
