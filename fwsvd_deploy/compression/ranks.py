"""Rank allocation over a global parameter budget (pure arithmetic on shapes and spectra)."""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping

import torch

from ..errors import ConfigError
from .svd import low_rank_params, max_saving_rank

Shape = tuple[int, int]


def fixed_ranks(shapes: Mapping[str, Shape], rank: int) -> dict[str, int | None]:
    """The same rank everywhere; ``None`` where that rank would not save parameters."""
    return {name: rank if rank <= max_saving_rank(shape) else None for name, shape in shapes.items()}


def uniform_ranks(shapes: Mapping[str, Shape], ratio: float, multiple: int = 1) -> dict[str, int | None]:
    """Keep ``ratio`` of each layer's weight parameters: ``r = floor(ratio * m * n / (m + n))``, at least 1.

    With ``multiple > 1`` every rank is a multiple of it (GEMM kernels tile by the SIMD width or the
    tensor-core tile): each rank is rounded down, at least one ``multiple``, and the parameters that rounding
    freed go back one ``multiple`` at a time to the layers that were rounded down, those that lost most first,
    while the total stays within ``ratio`` of the factorised layers' parameters. No layer ends a whole
    ``multiple`` away from its own share.

    A layer with no (aligned) rank that saves parameters is left dense (``None``).
    """
    out: dict[str, int | None] = {}
    share = uniform_shares(shapes, ratio)
    for name, (m, n) in shapes.items():
        rank = max(multiple, math.floor(share[name] / multiple) * multiple)
        out[name] = rank if rank <= saving_cap(m, n, multiple) else None
    if multiple == 1:
        return out
    factorised = {name: rank for name, rank in out.items() if rank is not None}
    left = sum(ratio * m * n - factorised[k] * (m + n) for k, (m, n) in shapes.items() if k in factorised)
    rounded_down = [k for k, rank in factorised.items() if rank < share[k]]
    for name in sorted(rounded_down, key=lambda k: factorised[k] - share[k]):
        m, n = shapes[name]
        step = multiple * (m + n)
        if factorised[name] + multiple <= saving_cap(m, n, multiple) and step <= left:
            out[name] = factorised[name] + multiple
            left -= step
    return out


def saving_cap(m: int, n: int, multiple: int = 1) -> int:
    """The largest rank that is a multiple of ``multiple`` and still saves parameters (0 if none)."""
    return max_saving_rank((m, n)) // multiple * multiple


def loss_floors(shapes: Mapping[str, Shape], ratio: float, fraction: float) -> dict[str, int]:
    """``loss`` allocation's floor per layer: ``fraction`` of its uniform rank, at least 1."""
    return {name: max(1, int(fraction * share)) for name, share in uniform_shares(shapes, ratio).items()}


def starting_ranks(shapes: Mapping[str, Shape], ratio: float, multiple: int = 1,
                   floors: Mapping[str, int] | None = None) -> dict[str, int | None]:
    """Where the greedy allocation starts: each layer at its floor rounded up to ``multiple`` (``None``: dense).

    Raises:
        ConfigError: when the start alone (the floors, or rank ``multiple`` everywhere) exceeds the budget of
            ``ratio * sum(m * n)`` parameters.
    """
    ranks: dict[str, int | None] = {}
    budget = ratio * sum(m * n for m, n in shapes.values())
    spent = 0
    for name, (m, n) in shapes.items():
        cap = saving_cap(m, n, multiple)
        if cap < multiple:
            ranks[name] = None
            spent += m * n
            continue
        floor = multiple if floors is None else max(multiple, math.ceil(floors[name] / multiple) * multiple)
        ranks[name] = min(floor, cap)
        spent += low_rank_params((m, n), ranks[name])  # type: ignore[arg-type]
    if spent > budget:
        if floors is not None:
            raise ConfigError(
                f"the floor ranks alone keep {spent:,} parameters, more than the budget of {budget:,.0f} "
                f"(ratio {ratio}); lower min_rank_fraction or raise the ratio"
            )
        raise ConfigError(
            f"rank {multiple} in every layer already keeps {spent:,} parameters, more than the budget of "
            f"{budget:,.0f} (ratio {ratio}); raise the ratio" + (" or lower rank_multiple" if multiple > 1 else "")
        )
    return ranks


def greedy_ranks(
    shapes: Mapping[str, Shape],
    gains: Mapping[str, torch.Tensor],
    ratio: float,
    multiple: int = 1,
    floors: Mapping[str, int] | None = None,
) -> dict[str, int | None]:
    """Spend ``ratio * sum(m * n)`` parameters where error falls most per parameter.

    Every layer starts at its floor (``floors[name]`` rounded up to a multiple of ``multiple``; ``multiple`` without
    floors). ``gains[name][k]`` is the error removed by going from rank ``k`` to ``k + 1``; a step adds ``multiple``
    to the rank, removes the sum of those gains and costs ``multiple * (m + n)`` parameters. Steps are taken in
    order of gain per parameter while they fit the budget, up to the largest rank that still saves parameters.
    From there one more step is offered: the exact dense weight (``None``), which removes the error left in the
    remaining directions for the parameters between the factors and the matrix (less than one step of ``multiple``
    directions), priced like any step by error removed per parameter. A layer that fills its
    largest saving rank keeps almost all its parameters as two thin factors, two products and some error; dense it
    is exact and one product (at decode time, one read of about the same bytes instead of two operators).
    Layers where no saving rank exists stay dense (``None``) and are charged in full.

    Raises:
        ConfigError: when the start alone (the floors, or rank ``multiple`` everywhere) exceeds the budget.
    """
    ranks = starting_ranks(shapes, ratio, multiple, floors)
    budget = ratio * sum(m * n for m, n in shapes.values())
    spent = sum(m * n if ranks[name] is None else low_rank_params((m, n), ranks[name])  # type: ignore[arg-type]
                for name, (m, n) in shapes.items())
    heap: list[tuple[float, int, str]] = []
    order = {name: i for i, name in enumerate(shapes)}
    for name, rank in ranks.items():
        if rank is not None:
            _push(heap, name, rank, shapes[name], gains[name], order[name], multiple)
    while heap:
        _, _, name = heapq.heappop(heap)
        shape = shapes[name]
        rank = ranks[name]
        assert rank is not None
        densify = rank + multiple > saving_cap(*shape, multiple)
        cost = _step_cost(shape, rank, multiple)
        if spent + cost > budget:
            continue  # this layer's next step does not fit; later steps of it cost at least as much
        spent += cost
        if densify:
            ranks[name] = None
            continue
        ranks[name] = rank + multiple
        _push(heap, name, rank + multiple, shape, gains[name], order[name], multiple)
    return ranks


def allocated_dense(shapes: Mapping[str, Shape], ranks: Mapping[str, int | None], multiple: int = 1) -> set[str]:
    """The layers that :func:`greedy_ranks` made dense by choice (a saving rank existed)."""
    return {name for name, rank in ranks.items() if rank is None and saving_cap(*shapes[name], multiple) >= multiple}


def _step_cost(shape: Shape, rank: int, multiple: int) -> int:
    """Parameters of the next step from ``rank``: ``multiple`` more directions, or at the cap the dense weight."""
    m, n = shape
    if rank + multiple > saving_cap(m, n, multiple):
        return m * n - low_rank_params(shape, rank)
    return multiple * (m + n)


def uniform_shares(shapes: Mapping[str, Shape], ratio: float) -> dict[str, float]:
    """Each layer's rank under a uniform kept fraction, unrounded: ``ratio * m * n / (m + n)``."""
    return {name: ratio * m * n / (m + n) for name, (m, n) in shapes.items()}


def _push(
    heap: list[tuple[float, int, str]], name: str, rank: int, shape: Shape, gain: torch.Tensor, tie: int, multiple: int
) -> None:
    if rank + multiple > saving_cap(*shape, multiple):
        removed = float(gain[rank:].sum())  # the exact weight: every direction left
    elif rank + multiple > gain.numel():
        return
    else:
        removed = float(gain[rank : rank + multiple].sum())
    heapq.heappush(heap, (-removed / _step_cost(shape, rank, multiple), tie, name))
