"""Target selection, the module swap and the compression report, on tiny models of each family."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from conftest import ARCHS, TOL, logits, tiny_model
from fwsvd_deploy import CompressionConfig, LowRankLinear, collect_fisher, compress, resolve_targets
from fwsvd_deploy.compression.svd import decompose
from fwsvd_deploy.compression.targets import Target
from fwsvd_deploy.errors import (
    AlreadyCompressedError,
    ConfigError,
    FisherError,
    NoTargetModulesError,
    UnsupportedModuleError,
)

# Expected "all-linear" targets per block: the paper's q, k, v, attention output and both FFN layers.
BLOCK_LINEARS = {"bert": 6, "roberta": 6, "distilbert": 6, "gpt2": 4}  # GPT-2 fuses q/k/v into c_attn
NOT_TARGETED = {
    "bert": ("classifier", "bert.pooler.dense"),
    "roberta": ("classifier.dense", "classifier.out_proj"),
    "distilbert": ("pre_classifier", "classifier"),
    "gpt2": ("score",),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_takes_block_linears_only(arch):
    model = tiny_model(arch)
    names = [t.name for t in resolve_targets(model)]
    assert len(names) == 2 * BLOCK_LINEARS[arch]
    for head in NOT_TARGETED[arch]:
        assert head not in names
    assert not any("embed" in n or "wte" in n or "wpe" in n for n in names)


def test_gpt2_conv1d_targets_are_found():
    targets = resolve_targets(tiny_model("gpt2"))
    assert all(isinstance(t.module, Conv1D) and t.kind == "conv1d" for t in targets)
    assert targets[0].shape == (96, 32)  # c_attn: out 3*32, in 32


@pytest.mark.parametrize(
    ("patterns", "exclude", "expected"),
    [
        (("query", "value"), None, 4),
        ("bert\\.encoder\\.layer\\.0\\..*(query|key)", None, 2),
        ("all-linear", ("intermediate.dense",), 10),
        ("all-linear", "bert\\.encoder\\.layer\\.1\\..*", 6),
    ],
)
def test_suffix_regex_and_exclude(patterns, exclude, expected):
    assert len(resolve_targets(tiny_model("bert"), patterns, exclude)) == expected


def test_zero_matches_names_the_patterns():
    with pytest.raises(NoTargetModulesError, match="nothing_like_this"):
        resolve_targets(tiny_model("bert"), ("nothing_like_this",))


def test_unsupported_module_is_refused_with_the_supported_list():
    with pytest.raises(UnsupportedModuleError, match="LayerNorm.*nn.Linear"):
        resolve_targets(tiny_model("bert"), ("attention.output.LayerNorm",))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["svd", "fwsvd"])
def test_report_counts_equal_the_real_modules(arch, method, tokenizer, data):
    model = tiny_model(arch)
    before = sum(p.numel() for p in model.parameters())
    fisher = collect_fisher(model, data, tokenizer, max_length=32) if method == "fwsvd" else None
    report = compress(model, CompressionConfig(method=method, ratio=0.5), fisher)
    assert report.model_params_before == before
    assert report.model_params_after == sum(p.numel() for p in model.parameters())
    for layer in report.layers:
        module = model.get_submodule(layer.name)
        assert isinstance(module, LowRankLinear) and module.rank == layer.rank
        assert layer.params_after == sum(p.numel() for p in module.parameters())
        assert layer.plain_error > 0 and (layer.fisher_error is not None) == (method == "fwsvd")
    assert report.target_params_before - report.target_params_after == before - report.model_params_after
    spent, budget = report.target_weight_params_after, 0.5 * report.target_weight_params_before
    assert abs(spent - budget) <= sum(sum(layer.shape) for layer in report.layers)


@pytest.mark.parametrize("arch", ARCHS)
def test_max_rank_factorisation_keeps_the_outputs(arch, tokenizer, data):
    """A factorisation at full rank (forced through the module swap) reproduces the dense model."""
    model = tiny_model(arch)
    reference = logits(model, tokenizer, data)
    from fwsvd_deploy.compression.apply import swap_modules

    replacements = {}
    for t in resolve_targets(model):
        up, down = decompose(t.weight).factors(min(t.shape))
        replacements[t.name] = LowRankLinear.from_factors(up, down, t.module.bias.detach(), t.kind)
    swap_modules(model, replacements)
    torch.testing.assert_close(logits(model, tokenizer, data), reference, atol=TOL["identity"],
                               rtol=TOL["identity_rel"])


def test_conv1d_orientation():
    layer = Conv1D(12, 5)  # nf=12 out, nx=5 in; weight (5, 12)
    torch.nn.init.normal_(layer.bias)
    t = Target("x", layer)
    up, down = decompose(t.weight).factors(5)
    low = LowRankLinear.from_factors(up, down, layer.bias.detach(), "conv1d")
    x = torch.randn(3, 7, 5)
    torch.testing.assert_close(low(x), layer(x), atol=TOL["identity"], rtol=TOL["identity_rel"])


def test_fwsvd_needs_fisher_and_changes_nothing_without_it():
    model = tiny_model("bert")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FisherError, match="collect_fisher"):
        compress(model, CompressionConfig(method="fwsvd"))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_fisher_for_another_model_is_refused_before_any_change(tokenizer, data):
    model = tiny_model("bert")
    fisher = collect_fisher(model, data, tokenizer, max_length=32)
    broken = dict(fisher.fisher)
    last = list(broken)[-1]
    broken[last] = broken[last][:, :-1]
    with pytest.raises(FisherError, match="shape"):
        compress(model, CompressionConfig(method="fwsvd"), broken)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    del broken[last]
    with pytest.raises(FisherError, match="other layers than the targets .missing ..bert.encoder.layer.1.output.dense"):
        compress(model, CompressionConfig(method="fwsvd"), broken)


def test_compressing_twice_is_refused(tokenizer, data):
    model = tiny_model("bert")
    compress(model, CompressionConfig(method="svd", ratio=0.5))
    with pytest.raises(AlreadyCompressedError):
        compress(model, CompressionConfig(method="svd", ratio=0.5))


def test_overrides_and_layers_left_dense():
    model = tiny_model("bert")
    report = compress(model, CompressionConfig(method="svd", rank=4, rank_overrides={"layer.0.attention.self.query": 2,
                                                                                   "layer.1.output.dense": 40}))
    ranks = report.ranks
    assert ranks["bert.encoder.layer.0.attention.self.query"] == 2
    assert ranks["bert.encoder.layer.1.output.dense"] is None  # 40 >= 64*32/96: saves nothing
    assert isinstance(model.get_submodule("bert.encoder.layer.1.output.dense"), torch.nn.Linear)
    assert report.skipped[0].skipped and "saves no parameters" in report.skipped[0].skipped
    with pytest.raises(ConfigError, match="matches no targeted module"):
        compress(tiny_model("bert"), CompressionConfig(method="svd", rank=4, rank_overrides={"nope": 2}))


def test_fisher_allocation_meets_the_budget(tokenizer, data):
    model = tiny_model("bert")
    fisher = collect_fisher(model, data, tokenizer, max_length=32)
    report = compress(model, CompressionConfig(method="fwsvd", ratio=0.4, allocation="fisher"), fisher)
    budget = 0.4 * report.target_weight_params_before
    step = max(sum(layer.shape) for layer in report.layers)
    assert budget - step <= report.target_weight_params_after <= budget
    assert len(set(report.ranks.values())) > 1  # it really allocates


def test_a_global_allocation_buys_exact_weights_at_a_high_ratio(tokenizer, data):
    model = tiny_model("bert")
    fisher = collect_fisher(model, data, tokenizer, max_length=32)
    report = compress(model, CompressionConfig(method="fwsvd", ratio=0.9, allocation="fisher"), fisher)
    dense = [layer for layer in report.layers if layer.rank is None]
    assert dense and len(dense) < len(report.layers)
    for layer in dense:  # every one of these has saving ranks: the allocation chose the exact weight
        assert layer.skipped.startswith("kept dense by the allocation") and layer.plain_error == 0.0
        assert isinstance(model.get_submodule(layer.name), torch.nn.Linear)
    assert report.target_weight_params_after <= 0.9 * report.target_weight_params_before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"rank": 0}, "rank"),
        ({"rank": 4, "ratio": 0.5}, "not both"),
        ({"method": "tucker"}, "method"),
        ({"fisher_axis": "rows"}, "fisher_axis"),
        ({"method": "svd", "allocation": "fisher"}, "needs method='fwsvd'"),
        ({"method": "svd", "allocation": "loss", "ratio": 1.0}, "buys every layer's exact weight"),
        ({"target_modules": []}, "target_modules"),
        ({"rank_overrides": {"q": 0}}, "rank_overrides"),
        ({"rank_multiple": 0}, "rank_multiple"),
        ({"rank": 12, "rank_multiple": 8}, "not a multiple of rank_multiple=8"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CompressionConfig(**kwargs)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown key.*rnak"):
        CompressionConfig.from_dict({"rnak": 3})
    assert CompressionConfig.from_dict({"rank": 3}).rank == 3
    assert CompressionConfig().ratio == 0.5


def test_the_default_allocation_is_the_one_measured_best_for_the_method():
    assert (CompressionConfig().method, CompressionConfig().allocation) == ("fisher-whitened", "loss")
    assert CompressionConfig(rank=8).allocation == "uniform"  # a fixed rank allocates nothing
    assert CompressionConfig(method="svd-llm").allocation == "uniform"
    assert CompressionConfig(method="fwsvd", ratio=0.3).allocation == "uniform"
    assert CompressionConfig(method="svd-llm", allocation="loss").allocation == "loss"


@pytest.mark.parametrize(("section", "allocation"), [
    ({}, "loss"), ({"ratio": 0.6}, "loss"), ({"method": "svd-llm"}, "uniform"), ({"rank": 8}, "uniform"),
    ({"method": "svd-llm", "allocation": "loss"}, "loss"), ({"allocation": "uniform"}, "uniform"),
])
def test_a_pipeline_section_rederives_the_allocation_from_the_keys_it_gives(section, allocation):
    from fwsvd_deploy import PipelineConfig

    for task in ("text-classification", "causal-lm"):
        assert PipelineConfig.from_dict({"task": task, "compression": section}).compression.allocation == allocation


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_joint_qkv_factorises_the_stacked_projections_with_one_down(arch, tokenizer, data):
    model = tiny_model(arch)
    dense = {t.name: (t.weight.detach().clone(), t.module.bias.detach().clone()) for t in resolve_targets(model)}
    fisher = collect_fisher(model, data, tokenizer, max_length=32)
    report = compress(model, CompressionConfig(method="fwsvd", ratio=0.5, qkv="joint"), fisher)
    groups = [layer for layer in report.layers if "{" in layer.name]
    assert len(groups) == 2  # one per block of the tiny models
    assert len(report.layers) == 4 * len(groups)  # q/k/v as one unit, then attention output and the FFN
    for layer in groups:
        parent = layer.name.rpartition(".")[0]
        members = [model.get_submodule(f"{parent}.{c}") for c in layer.name[layer.name.index("{") + 1:-1].split(",")]
        assert all(isinstance(m, LowRankLinear) and m.rank == layer.rank for m in members)
        assert members[0].down is members[1].down is members[2].down
        # the factors are the Fisher-weighted SVD of [Wq; Wk; Wv] with [Fq; Fk; Fv]
        names = [f"{parent}.{c}" for c in layer.name[layer.name.index("{") + 1:-1].split(",")]
        stacked = torch.cat([dense[n][0] for n in names])
        want = decompose(stacked, torch.cat([fisher.fisher[n] for n in names]), "both").reconstruct(layer.rank)
        got = torch.cat([m.up.weight @ m.down.weight for m in members]).double()
        torch.testing.assert_close(got, want, atol=TOL["identity"], rtol=TOL["identity_rel"])
        assert all(torch.equal(m.up.bias, dense[n][1]) for m, n in zip(members, names, strict=True))
        assert layer.params_after == layer.rank * (layer.shape[0] + layer.shape[1]) + layer.shape[0]
    # parameters are counted once (the shared down is one tensor) and the budget is the one asked for
    assert report.model_params_after == sum(p.numel() for p in model.parameters())
    assert abs(report.kept_fraction - 0.5) < 0.05


def test_joint_qkv_with_uniform_fisher_is_joint_svd():
    a, b = tiny_model("bert"), tiny_model("bert")
    uniform = {t.name: torch.ones_like(t.module.weight) for t in resolve_targets(a)}
    compress(a, CompressionConfig(method="svd", ratio=0.4, qkv="joint"))
    compress(b, CompressionConfig(method="fwsvd", ratio=0.4, qkv="joint"), uniform)
    q = "bert.encoder.layer.0.attention.self.query"
    wa = a.get_submodule(q).up.weight @ a.get_submodule(q).down.weight
    wb = b.get_submodule(q).up.weight @ b.get_submodule(q).down.weight
    torch.testing.assert_close(wa, wb, atol=TOL["identity"], rtol=TOL["identity_rel"])


def test_joint_qkv_needs_all_three_projections():
    with pytest.raises(ConfigError, match="qkv='joint' found no attention block"):
        compress(tiny_model("gpt2"), CompressionConfig(method="svd", qkv="joint"))
    with pytest.raises(ConfigError, match="qkv='joint' found no attention block"):
        compress(tiny_model("bert"), CompressionConfig(method="svd", qkv="joint", exclude_modules=("key",)))
    # an override names any member of the group (or the group) and sets the shared rank
    model = tiny_model("bert")
    report = compress(model, CompressionConfig(method="svd", rank=4, qkv="joint",
                                               rank_overrides={"layer.0.attention.self.value": 3}))
    assert report.ranks["bert.encoder.layer.0.attention.self.{query,key,value}"] == 3
    assert model.get_submodule("bert.encoder.layer.0.attention.self.query").rank == 3
