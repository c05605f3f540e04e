"""Every compression method and allocation on tiny encoders and decoders: budgets, shapes under GQA, statistics."""

from __future__ import annotations

import pytest
import torch

from conftest import DECODERS, tiny_decoder, tiny_model, toy_data
from fwsvd_deploy import CompressionConfig, LowRankLinear, compress, load_compressed, save_compressed
from fwsvd_deploy.compression import collect_statistics, resolve_targets
from fwsvd_deploy.config import METHODS
from fwsvd_deploy.data import window_batches
from fwsvd_deploy.errors import ConfigError, FisherError


def _windows(n: int = 8, length: int = 24) -> torch.Tensor:
    return torch.randint(1000, 20000, (n, length), generator=torch.Generator().manual_seed(0))


def _stats(model, tokenizer=None):
    targets = resolve_targets(model)
    batches = window_batches(_windows(), 4) if tokenizer is None else list(toy_data(16).batches(tokenizer, 8, 32))
    return collect_statistics(model, batches, targets, kinds=("fisher", "inputs"), progress=False)


def _check_report(model, report, ratio):
    assert report.model_params_after == sum(p.numel() for p in model.parameters())
    for layer in report.layers:
        if layer.rank is None:
            continue
        module = model.get_submodule(layer.name) if "{" not in layer.name else None
        if module is not None:
            assert isinstance(module, LowRankLinear) and module.rank == layer.rank
        assert layer.plain_error > 0 and layer.output_error is not None and layer.fisher_error is not None
    budget = ratio * report.target_weight_params_before
    assert abs(report.target_weight_params_after - budget) <= sum(sum(layer.shape) for layer in report.layers)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", DECODERS)
def test_every_method_on_every_decoder(method, arch):
    model = tiny_decoder(arch)
    stats = _stats(model)
    report = compress(model, CompressionConfig(method=method, ratio=0.5), stats)
    _check_report(model, report, 0.5)
    assert report.method == method
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=_windows(2)).logits).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("qkv", ["separate", "joint"])
def test_every_method_on_an_encoder_separate_and_joint(method, qkv, tokenizer):
    model = tiny_model("bert")
    stats = _stats(model, tokenizer)
    report = compress(model, CompressionConfig(method=method, ratio=0.5, qkv=qkv), stats)
    _check_report(model, report, 0.5)
    assert sum("{" in layer.name for layer in report.layers) == (2 if qkv == "joint" else 0)


@pytest.mark.parametrize("method", ["svd-llm", "fisher-whitened"])
def test_joint_qkv_under_grouped_query_attention(method):
    model = tiny_decoder("llama")
    stats = _stats(model)
    report = compress(model, CompressionConfig(method=method, ratio=0.5, qkv="joint"), stats)
    joint = [layer for layer in report.layers if "{" in layer.name]
    assert len(joint) == 2 and all(layer.shape == (32 + 16 + 16, 32) for layer in joint)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.down is attn.k_proj.down is attn.v_proj.down
    assert attn.k_proj.out_features == attn.v_proj.out_features == 16


def test_ranks_follow_each_layers_own_shape_under_gqa():
    model = tiny_decoder("llama")
    report = compress(model, CompressionConfig(method="svd", ratio=0.6))
    ranks = {layer.name.rpartition(".")[2]: (layer.shape, layer.rank) for layer in report.layers}
    assert ranks["k_proj"] == ((16, 32), int(0.6 * 16 * 32 / 48))
    assert ranks["q_proj"] == ((32, 32), int(0.6 * 32 * 32 / 64))
    assert ranks["gate_proj"] == ((64, 32), int(0.6 * 64 * 32 / 96))


@pytest.mark.parametrize("method", ["svd", "asvd", "svd-llm", "fisher-whitened", "fwsvd"])
def test_loss_allocation_meets_the_budget_above_the_floor(method):
    model = tiny_decoder("llama")
    stats = _stats(model)
    cfg = CompressionConfig(method=method, ratio=0.4, allocation="loss", min_rank_fraction=0.5)
    report = compress(model, cfg, stats)
    budget = 0.4 * report.target_weight_params_before
    step = max(sum(layer.shape) for layer in report.layers)
    assert budget - step <= report.target_weight_params_after <= budget
    for layer in report.layers:
        m, n = layer.shape
        assert layer.rank is None or layer.rank >= int(0.5 * 0.4 * m * n / (m + n))  # None: bought dense
    assert report.settings["min_rank_fraction"] == 0.5
    assert report.ranks != compress(tiny_decoder("llama"), CompressionConfig(method=method, ratio=0.4), stats).ranks


def test_a_floor_that_cannot_meet_the_budget_is_refused_before_any_change():
    model = tiny_decoder("llama")
    stats = _stats(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = CompressionConfig(method="svd-llm", ratio=0.1, allocation="loss", min_rank_fraction=1.0, rank_multiple=8)
    with pytest.raises(ConfigError, match="floor ranks alone"):
        compress(model, cfg, stats)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("method", "what"), [("svd-llm", "input statistics"), ("asvd", "input statistics"),
                                              ("fisher-whitened", "Fisher statistics and input statistics"),
                                              ("fwsvd", "Fisher statistics")])
def test_missing_statistics_name_the_method(method, what):
    model = tiny_decoder("llama")
    with pytest.raises(FisherError, match=f"method='{method}' needs {what}"):
        compress(model, CompressionConfig(method=method))
    fisher_only = collect_statistics(model, window_batches(_windows(2), 2), resolve_targets(model),
                                     kinds=("fisher",), progress=False)
    if method != "fwsvd":
        with pytest.raises(FisherError, match="input statistics"):
            compress(model, CompressionConfig(method=method), fisher_only)


def test_statistics_of_another_model_are_refused():
    stats = _stats(tiny_decoder("llama"))
    with pytest.raises(FisherError, match="collected on another model"):
        compress(tiny_decoder("qwen2"), CompressionConfig(method="svd-llm"), stats)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"asvd_alpha": 0.0}, "asvd_alpha"), ({"asvd_alpha": 1.5}, "asvd_alpha"),
    ({"whitening_damp": 0.0}, "whitening_damp"), ({"fisher_power": 2.0}, "fisher_power"),
    ({"min_rank_fraction": -0.1}, "min_rank_fraction"), ({"allocation": "loss", "rank": 4}, "give ratio"),
    ({"method": "svd-llm", "allocation": "fisher"}, "needs method='fwsvd'"),
])
def test_method_settings_are_validated(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CompressionConfig(**kwargs)


def test_tied_embeddings_stay_tied_through_compression_and_reload(tmp_path, tokenizer):
    model = tiny_decoder("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    compress(model, CompressionConfig(method="svd-llm", ratio=0.5), _stats(model))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_compressed(model, tmp_path / "c", tokenizer)
    loaded = load_compressed(tmp_path / "c")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = _windows(2)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_too_few_calibration_tokens_warn_and_say_the_damping(caplog):
    import logging

    model = tiny_decoder("llama")
    stats = collect_statistics(model, window_batches(_windows(1, 8), 1), resolve_targets(model), kinds=("inputs",),
                               progress=False)  # 8 tokens for 32 and 64 input features
    with caplog.at_level(logging.WARNING, logger="fwsvd_deploy"):
        compress(model, CompressionConfig(method="svd-llm", ratio=0.5, whitening_damp=0.01), stats)
    assert "fewer calibration tokens than features" in caplog.text and "whitening_damp=0.01" in caplog.text
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=_windows(2)).logits).all()
