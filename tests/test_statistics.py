"""Calibration statistics in one pass: input second moments and |x| per distinct input, padding excluded, caching."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import TOL, tiny_decoder, tiny_model, toy_data
from fwsvd_deploy.compression import collect_fisher, collect_statistics, resolve_targets
from fwsvd_deploy.data import window_batches
from fwsvd_deploy.errors import FisherError


def _captured_inputs(model, batches, targets):
    """Reference: every target's input rows (real tokens only), captured by plain hooks."""
    seen = {t.name: [] for t in targets}
    handles = []
    mask = {}
    for t in targets:
        def hook(module, args, output, name=t.name):
            x = args[0].detach().double()
            seen[name].append(x[mask["m"]] if x.dim() == 3 else x)
        handles.append(t.module.register_forward_hook(hook))
    with torch.no_grad():
        for batch in batches:
            mask["m"] = batch["attention_mask"].bool()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in handles:
        h.remove()
    return {k: torch.cat([v.reshape(-1, v.shape[-1]) for v in vs]) for k, vs in seen.items()}


def _windows(n: int = 6, length: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 20000, (n, length), generator=g)


def test_second_moments_equal_x_transpose_x_and_inputs_are_shared():
    model = tiny_decoder("llama")
    targets = resolve_targets(model)
    batches = window_batches(_windows(), 4)
    stats = collect_statistics(model, batches, targets, kinds=("inputs",), progress=False)
    rows = _captured_inputs(model, batches, targets)
    for name in stats.targets:
        x = rows[name]
        torch.testing.assert_close(stats.covariance(name), x.T @ x / x.shape[0], atol=TOL["moment"], rtol=TOL["moment"])
        torch.testing.assert_close(stats.abs_mean(name), x.abs().mean(0), atol=TOL["moment"], rtol=TOL["moment"])
    layer = "model.layers.0"
    groups = {name.rpartition(".")[2]: stats.group(name) for name in stats.targets if name.startswith(layer + ".")}
    assert groups["q_proj"] == groups["k_proj"] == groups["v_proj"] == f"{layer}.self_attn.q_proj"
    assert groups["gate_proj"] == groups["up_proj"] == f"{layer}.mlp.gate_proj"
    assert groups["o_proj"] == f"{layer}.self_attn.o_proj" and groups["down_proj"] == f"{layer}.mlp.down_proj"
    assert len(stats.second_moment) == 2 * 4  # four distinct inputs per layer, not seven
    assert stats.second_moment[groups["q_proj"]].dtype == torch.float64
    assert stats.tokens[groups["q_proj"]] == 6 * 16 and stats.fisher is None


def test_padding_tokens_are_excluded(tokenizer):
    model = tiny_model("bert")
    targets = resolve_targets(model)
    data = toy_data(8)
    padded = list(data.batches(tokenizer, 8, 32))
    alone = list(data.batches(tokenizer, 1, 32))
    assert (padded[0]["attention_mask"] == 0).any()  # the batch really has padding
    a = collect_statistics(model, padded, targets, kinds=("inputs",), progress=False)
    b = collect_statistics(model, alone, targets, kinds=("inputs",), progress=False)
    for group, moment in a.second_moment.items():
        assert a.tokens[group] == b.tokens[group] == int(padded[0]["attention_mask"].sum())
        torch.testing.assert_close(moment, b.second_moment[group], rtol=TOL["moment"], atol=TOL["moment"])


def test_padding_is_excluded_where_a_layer_sees_the_batch_flattened():
    """OPT runs its MLP on (batch * tokens, features): the padding rows are dropped there too."""
    model = tiny_decoder("opt")
    targets = resolve_targets(model)
    ids = _windows(4)
    lengths = [16, 9, 12, 5]
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    padded = [{"input_ids": ids, "attention_mask": mask}]
    alone = [{"input_ids": ids[i:i + 1, :n], "attention_mask": mask[i:i + 1, :n]} for i, n in enumerate(lengths)]
    a = collect_statistics(model, padded, targets, kinds=("inputs",), progress=False)
    b = collect_statistics(model, alone, targets, kinds=("inputs",), progress=False)
    assert "model.decoder.layers.0.fc1" in a.second_moment
    for group, moment in a.second_moment.items():
        assert a.tokens[group] == b.tokens[group] == sum(lengths)
        torch.testing.assert_close(moment, b.second_moment[group], rtol=TOL["moment"], atol=TOL["moment"])


def test_fisher_and_inputs_in_one_pass_equal_separate_passes(tokenizer):
    model = tiny_model("bert")
    targets = resolve_targets(model)
    batches = list(toy_data(12).batches(tokenizer, 4, 32))
    both = collect_statistics(model, batches, targets, kinds=("fisher", "inputs"), progress=False)
    fisher = collect_statistics(model, batches, targets, kinds=("fisher",), progress=False)
    inputs = collect_statistics(model, batches, targets, kinds=("inputs",), progress=False)
    for name in both.targets:
        assert torch.equal(both.fisher[name], fisher.fisher[name])
    for group in both.second_moment:
        assert torch.equal(both.second_moment[group], inputs.second_moment[group])


def test_each_kind_is_cached_and_a_corrupt_file_is_recomputed(tmp_path, caplog):
    model = tiny_decoder("qwen2")
    targets = resolve_targets(model)
    batches = window_batches(_windows(), 3)
    first = collect_statistics(model, batches, targets, kinds=("inputs",), cache_dir=str(tmp_path), progress=False)
    assert not first.from_cache and len(first.cache_paths) == 1
    again = collect_statistics(model, batches, targets, kinds=("inputs",), cache_dir=str(tmp_path), progress=False)
    assert again.from_cache and again.input_of == first.input_of and again.tokens == first.tokens
    assert all(torch.equal(again.second_moment[g], m) for g, m in first.second_moment.items())
    # adding Fisher computes Fisher only; the inputs still come from the cache
    both = collect_statistics(model, batches, targets, kinds=("fisher", "inputs"), cache_dir=str(tmp_path),
                              progress=False)
    assert not both.from_cache and both.fisher is not None and len(both.cache_paths) == 2
    path = tmp_path / first.cache_paths[0].rpartition("/")[2]
    path.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="fwsvd_deploy"):
        redone = collect_statistics(model, batches, targets, kinds=("inputs",), cache_dir=str(tmp_path),
                                    progress=False)
    assert not redone.from_cache and "is unreadable" in caplog.text
    assert all(torch.equal(redone.second_moment[g], m) for g, m in first.second_moment.items())
    assert not list(tmp_path.glob(".*tmp"))


def test_causal_lm_fisher_from_windows_needs_no_labels():
    model = tiny_decoder("llama")
    stats = collect_statistics(model, window_batches(_windows(4), 2), resolve_targets(model), kinds=("fisher",),
                               progress=False)
    assert stats.num_examples == 4 and all(torch.isfinite(f).all() and f.sum() > 0 for f in stats.fisher.values())


def _loop_window_fisher(model, windows, targets):
    """Reference: ordinary autograd on the weights, one backward per window."""
    from fwsvd_deploy.losses import per_example_losses

    sums = {t.name: torch.zeros_like(t.module.weight) for t in targets}
    for batch in window_batches(windows, 1):
        model.zero_grad()
        per_example_losses(model, batch, "causal_lm").sum().backward()
        for t in targets:
            sums[t.name] += t.module.weight.grad.square()
    model.zero_grad()
    return sums


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_causal_lm_fisher_is_exact_per_window_without_weight_gradients(arch, monkeypatch):
    """The backward starts at the embeddings (no weight gradient computed); a model without input embeddings
    falls back to gradients on the target weights. Both equal one plain backward per window."""
    from fwsvd_deploy.compression import statistics

    model = tiny_decoder(arch)
    targets = resolve_targets(model)
    windows = _windows(5)
    want = _loop_window_fisher(model, windows, targets)
    target_weights = {id(t.module.weight) for t in targets}
    losses = statistics.per_example_losses
    for fallback in (False, True):
        grads = set()  # which parameters require grad while the losses are computed

        def recording(*args, grads=grads, **kwargs):
            grads.update(id(p) for p in model.parameters() if p.requires_grad)
            return losses(*args, **kwargs)

        monkeypatch.setattr(statistics, "per_example_losses", recording)
        if fallback:
            monkeypatch.setattr(type(model), "get_input_embeddings", lambda self: None)
        got = collect_statistics(model, window_batches(windows, 2), targets, kinds=("fisher",), progress=False)
        assert got.num_examples == 5
        assert grads == (target_weights if fallback else set())
        for name, tensor in want.items():
            assert float(tensor.sum()) > 0
            assert float((got.fisher[name] - tensor).norm() / tensor.norm()) < TOL["fisher_sum"], (fallback, name)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_classifier_fisher_needs_labels(tokenizer):
    from dataclasses import replace

    model = tiny_model("bert")
    batches = list(replace(toy_data(4), labels=None).batches(tokenizer, 2, 32))
    with pytest.raises(FisherError, match="labelled"):
        collect_statistics(model, batches, resolve_targets(model), kinds=("fisher",), progress=False)
    # input statistics need no labels
    stats = collect_statistics(model, batches, resolve_targets(model), kinds=("inputs",), progress=False)
    assert stats.second_moment


def test_collect_fisher_draws_its_sample_with_the_seed(tokenizer):
    model = tiny_model("bert")
    from fwsvd_deploy.config import CalibrationConfig

    cfg = CalibrationConfig(num_samples=10)
    a = collect_fisher(model, toy_data(40), tokenizer, cfg, max_length=32, seed=0).fisher
    b = collect_fisher(model, toy_data(40), tokenizer, cfg, max_length=32, seed=1).fisher
    name = next(iter(a))
    assert float((a[name] - b[name]).norm() / a[name].norm()) > 100 * TOL["fisher_sum"]  # another sample
