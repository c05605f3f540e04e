"""Rank allocation over a global parameter budget (pure arithmetic on shapes and spectra)."""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping

import torch

from .svd import low_rank_params, max_saving_rank

Shape = tuple[int, int]


def fixed_ranks(shapes: Mapping[str, Shape], rank: int) -> dict[str, int | None]:
    """The same rank everywhere; ``None`` where that rank would not save parameters."""
    return {name: rank if rank <= max_saving_rank(shape) else None for name, shape in shapes.items()}


def uniform_ranks(shapes: Mapping[str, Shape], ratio: float) -> dict[str, int | None]:
    """Keep ``ratio`` of each layer's weight parameters: ``r = floor(ratio * m * n / (m + n))``, at least 1.

    A layer whose rank would not save parameters is left dense (``None``).
    """
    out: dict[str, int | None] = {}
    for name, (m, n) in shapes.items():
        rank = max(1, math.floor(ratio * m * n / (m + n)))
        out[name] = rank if rank <= max_saving_rank((m, n)) else None
    return out


def greedy_ranks(
    shapes: Mapping[str, Shape],
    gains: Mapping[str, torch.Tensor],
    ratio: float,
) -> dict[str, int | None]:
    """Spend ``ratio * sum(m * n)`` parameters where error falls most per parameter.

    Every layer starts at rank 1. ``gains[name][k]`` is the error removed by going from rank ``k`` to
    ``k + 1`` (non-increasing in ``k``); each step costs ``m + n`` parameters. Steps are taken in order of
    gain per parameter while they fit the budget, up to the largest rank that still saves parameters.
    Layers where no rank saves parameters stay dense (``None``) and are charged in full.
    """
    ranks: dict[str, int | None] = {}
    budget = ratio * sum(m * n for m, n in shapes.values())
    spent = 0
    for name, shape in shapes.items():
        if max_saving_rank(shape) < 1:
            ranks[name] = None
            spent += shape[0] * shape[1]
        else:
            ranks[name] = 1
            spent += low_rank_params(shape, 1)
    heap: list[tuple[float, int, str]] = []
    order = {name: i for i, name in enumerate(shapes)}
    for name, rank in ranks.items():
        if rank is not None:
            _push(heap, name, rank, shapes[name], gains[name], order[name])
    while heap:
        _, _, name = heapq.heappop(heap)
        shape = shapes[name]
        cost = shape[0] + shape[1]
        if spent + cost > budget:
            continue  # this layer's next step does not fit; later steps of it cost the same
        rank = ranks[name]
        assert rank is not None
        ranks[name] = rank + 1
        spent += cost
        _push(heap, name, rank + 1, shape, gains[name], order[name])
    return ranks


def _push(heap: list[tuple[float, int, str]], name: str, rank: int, shape: Shape, gain: torch.Tensor, tie: int) -> None:
    if rank >= max_saving_rank(shape) or rank >= gain.numel():
        return
    per_param = float(gain[rank]) / (shape[0] + shape[1])
    heapq.heappush(heap, (-per_param, tie, name))
