"""Rank allocation over a global budget."""

from __future__ import annotations

import pytest
import torch

from fwsvd_deploy.compression.ranks import fixed_ranks, greedy_ranks, uniform_ranks
from fwsvd_deploy.compression.svd import max_saving_rank

SHAPES = {"q": (384, 384), "ffn_in": (1536, 384), "ffn_out": (384, 1536), "tiny": (2, 1)}


def _spent(shapes, ranks):
    return sum(m * n if ranks[k] is None else ranks[k] * (m + n) for k, (m, n) in shapes.items())


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
        ranks[k] == max_saving_rank(shapes[k]) for k in shapes
    )
    assert ranks["a"] >= ranks["b"]
    assert all(r is not None and 1 <= r <= max_saving_rank(shapes[k]) for k, r in ranks.items())
