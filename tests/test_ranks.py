"""Rank allocation over a global budget."""

from __future__ import annotations

import pytest
import torch

from fwsvd_deploy.compression.ranks import allocated_dense, fixed_ranks, greedy_ranks, uniform_ranks
from fwsvd_deploy.compression.svd import max_saving_rank

SHAPES = {"q": (384, 384), "ffn_in": (1536, 384), "ffn_out": (384, 1536), "tiny": (2, 1)}


def _spent(shapes, ranks):
    return sum(m * n if ranks[k] is None else ranks[k] * (m + n) for k, (m, n) in shapes.items())


def _rank(shapes, ranks, k):
    """The rank a layer keeps; a dense one keeps all of it."""
    return min(shapes[k]) if ranks[k] is None else ranks[k]


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75, 0.95])
def test_uniform_meets_budget_within_one_step_per_layer(ratio):
    shapes = {k: v for k, v in SHAPES.items() if k != "tiny"}
    ranks = uniform_ranks(shapes, ratio)
    budget = ratio * sum(m * n for m, n in shapes.values())
    assert abs(_spent(shapes, ranks) - budget) <= sum(m + n for m, n in shapes.values())
    for k, (m, n) in shapes.items():
        assert ranks[k] * (m + n) <= ratio * m * n + (m + n)


def test_uniform_leaves_layers_that_cannot_save_dense():
    ranks = uniform_ranks(SHAPES, 0.5)
    assert ranks["tiny"] is None  # 2x1: no rank saves parameters
    assert uniform_ranks({"q": (384, 384)}, 1.0) == {"q": None}


def test_fixed_rank_skips_where_no_saving():
    ranks = fixed_ranks(SHAPES, 200)
    assert ranks["q"] is None  # 200 >= 384*384/768 = 192
    assert ranks["ffn_in"] == 200


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
def test_greedy_meets_budget_and_follows_gains(ratio):
    shapes = {"a": (64, 64), "b": (64, 64), "c": (128, 64)}
    g = torch.Generator().manual_seed(0)
    gains = {
        "a": torch.sort(torch.rand(64, generator=g) * 10, descending=True).values,  # important layer
        "b": torch.sort(torch.rand(64, generator=g) * 0.1, descending=True).values,  # unimportant
        "c": torch.sort(torch.rand(64, generator=g), descending=True).values,
    }
    ranks = greedy_ranks(shapes, gains, ratio)
    budget = ratio * sum(m * n for m, n in shapes.values())
    spent = _spent(shapes, ranks)
    assert spent <= budget + max(m + n for m, n in shapes.values())
    assert budget - spent <= max(m + n for m, n in shapes.values()) or all(
        ranks[k] is None for k in shapes
    )
    assert _rank(shapes, ranks, "a") >= _rank(shapes, ranks, "b")
    assert all(r is None or 1 <= r <= max_saving_rank(shapes[k]) for k, r in ranks.items())


MINILM = {f"{i}.{k}": s for i in range(6) for k, s in
          {"qkv": (1152, 384), "o": (384, 384), "ffn_in": (1536, 384), "ffn_out": (384, 1536)}.items()}


@pytest.mark.parametrize("multiple", [8, 16, 32])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_uniform_multiple_keeps_the_budget_with_aligned_ranks(ratio, multiple):
    ranks = uniform_ranks(MINILM, ratio, multiple)
    budget = ratio * sum(m * n for m, n in MINILM.values())
    spent = _spent(MINILM, ranks)
    assert all(r is not None and r % multiple == 0 for r in ranks.values())
    assert spent <= budget
    assert budget - spent < max(multiple * (m + n) for m, n in MINILM.values())  # nothing left that fits
    for k, (m, n) in MINILM.items():  # no layer moves more than one step from its own share
        assert abs(ranks[k] - ratio * m * n / (m + n)) < multiple


def test_uniform_multiple_on_minilm_at_half():
    # shares: q/k/v stacked 144, attention output 96 (already aligned), FFN 153.6 -> 144 or 160
    ranks = uniform_ranks(MINILM, 0.5, 16)
    assert {ranks[f"{i}.qkv"] for i in range(6)} == {144} and {ranks[f"{i}.o"] for i in range(6)} == {96}
    ffn = [ranks[f"{i}.{k}"] for i in range(6) for k in ("ffn_in", "ffn_out")]
    assert sorted(set(ffn)) == [144, 160] and ffn.count(160) == 7  # 12 x 9.6 x 1920 freed, 30720 a step
    assert uniform_ranks(MINILM, 0.5, 1) == uniform_ranks(MINILM, 0.5)


def test_uniform_multiple_leaves_layers_dense_when_no_aligned_rank_saves():
    # 32x32 saves parameters up to rank 15: no multiple of 16 does
    assert uniform_ranks({"q": (32, 32), "ffn": (64, 64)}, 0.5, 16) == {"q": None, "ffn": 16}


@pytest.mark.parametrize("multiple", [4, 8])
def test_greedy_multiple_takes_aligned_steps_within_budget(multiple):
    shapes = {"a": (64, 64), "b": (64, 64), "c": (128, 64)}
    g = torch.Generator().manual_seed(0)
    gains = {k: torch.sort(torch.rand(64, generator=g) * s, descending=True).values
             for k, s in (("a", 10.0), ("b", 0.1), ("c", 1.0))}
    ranks = greedy_ranks(shapes, gains, 0.5, multiple)
    budget = 0.5 * sum(m * n for m, n in shapes.values())
    assert all(r is None or r % multiple == 0 and r <= max_saving_rank(shapes[k]) for k, r in ranks.items())
    assert _spent(shapes, ranks) <= budget
    assert budget - _spent(shapes, ranks) < multiple * max(m + n for m, n in shapes.values())
    assert _rank(shapes, ranks, "a") >= _rank(shapes, ranks, "b")
    assert greedy_ranks(shapes, gains, 0.5, 1) == greedy_ranks(shapes, gains, 0.5)


def test_floors_hold_and_the_budget_is_met():
    shapes = {"a": (64, 64), "b": (64, 64), "c": (128, 64)}
    gains = {"a": torch.linspace(10, 1, 64), "b": torch.linspace(1e-3, 1e-4, 64), "c": torch.linspace(5, 1, 64)}
    floors = {"a": 4, "b": 6, "c": 5}
    ranks = greedy_ranks(shapes, gains, 0.5, floors=floors)
    assert all(_rank(shapes, ranks, k) >= floors[k] for k in shapes)
    assert ranks["b"] == 6  # its gains never win a step: it stays at its floor, not at 1
    budget = 0.5 * sum(m * n for m, n in shapes.values())
    assert budget - max(m + n for m, n in shapes.values()) <= _spent(shapes, ranks) <= budget
    aligned = greedy_ranks(shapes, gains, 0.5, multiple=4, floors=floors)
    assert all(r is None or r % 4 == 0 and r >= floors[k] for k, r in aligned.items())  # floors rounded up


def test_floors_beyond_the_budget_are_refused():
    from fwsvd_deploy.errors import ConfigError

    shapes = {"a": (64, 64)}
    with pytest.raises(ConfigError, match="floor ranks alone"):
        greedy_ranks(shapes, {"a": torch.ones(64)}, 0.1, floors={"a": 20})


def test_a_layer_that_fills_its_saving_ranks_is_bought_dense():
    # 64x64 saves parameters up to rank 31 (31 x 128 = 3968 of 4096): the last 128 parameters buy the exact weight
    shapes = {"a": (64, 64), "b": (64, 64)}
    gains = {"a": torch.linspace(10, 5, 64), "b": torch.linspace(1e-2, 1e-3, 64)}
    short = greedy_ranks(shapes, gains, (3968 + 128 + 127) / 8192)  # b keeps its starting rank 1 (128)
    assert short == {"a": 31, "b": 1}  # the dense step (128 parameters) does not fit: a stops at its cap
    bought = greedy_ranks(shapes, gains, (4096 + 128 + 127) / 8192)
    assert bought == {"a": None, "b": 1}  # a's last 128 parameters remove more error than any step of b
    assert _spent(shapes, bought) == 4096 + 128
    assert allocated_dense(shapes, bought) == {"a"}


def test_the_dense_step_is_priced_by_the_error_it_removes():
    # a: few large directions then nothing; its dense step removes no error, so b's steps come first
    shapes = {"a": (64, 64), "b": (64, 64)}
    gains = {"a": torch.cat([torch.full((31,), 10.0), torch.zeros(33)]), "b": torch.linspace(1.0, 0.5, 64)}
    ranks = greedy_ranks(shapes, gains, (31 * 128 + 21 * 128) / 8192)  # room for a's dense step or b's 21st
    assert ranks == {"a": 31, "b": 21}
    aligned = greedy_ranks({"c": (64, 32)}, {"c": torch.linspace(5, 1, 32)}, 1.0, multiple=8)
    assert aligned == {"c": None}  # cap 16 (21 saves, 16 is the last multiple of 8): 1536 -> 2048
    assert allocated_dense({"c": (64, 32)}, aligned, 8) == {"c"}
    assert allocated_dense({"t": (2, 1)}, {"t": None}) == set()  # no saving rank: dense by shape, not by choice


def test_a_start_beyond_the_budget_is_refused_without_floors_too():
    from fwsvd_deploy.errors import ConfigError

    shapes = {"a": (64, 64), "b": (128, 64)}  # rank 1 everywhere keeps 128 + 192 = 320 parameters
    gains = {"a": torch.ones(64), "b": torch.ones(64)}
    with pytest.raises(ConfigError, match="rank 1 in every layer already keeps 320 parameters"):
        greedy_ranks(shapes, gains, 300 / 12288)
    with pytest.raises(ConfigError, match="rank 8 in every layer .* or lower rank_multiple"):
        greedy_ranks(shapes, gains, 2000 / 12288, multiple=8)
    assert greedy_ranks(shapes, gains, 320 / 12288) == {"a": 1, "b": 1}
