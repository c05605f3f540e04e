"""Compression: plan the ranks, factorise, and swap the modules — the only place that replaces modules.

Every target is resolved and validated, every decomposition computed and every replacement built before the first
module is swapped, so an error never leaves a half-compressed model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..config import CompressionConfig
from ..errors import ConfigError, FisherError, NumericalError
from .factorize import (
    UnitStats,
    allocation_gains,
    as_statistics,
    decompose_unit,
    require,
    unit_statistics,
    warn_rank_deficient,
)
from .layers import LowRankLinear
from .ranks import allocated_dense, fixed_ranks, greedy_ranks, loss_floors, saving_cap, uniform_ranks
from .report import CompressionReport, LayerReport
from .svd import low_rank_params, max_saving_rank, output_error, refit_down, refit_up, relative_error
from .targets import SUPPORTED_TYPES, Target, Unit, plan_units, resolve_targets

__all__ = ["allocate", "apply_plan", "compress", "compressed_layers", "factorised", "resolve_targets", "swap_modules"]


def _check_coverage(stats: Any, targets: list[Target]) -> None:
    """Statistics that name their layers must have been collected for (at least) ``targets``."""
    collected = set(getattr(stats, "targets", None) or ())
    if stats is None or not collected:
        return
    missing = [t.name for t in targets if t.name not in collected]
    if missing:
        raise FisherError(f"the calibration statistics were collected for other layers than the targets (missing "
                          f"{missing[:3]}{' ...' if len(missing) > 3 else ''}); collect them for these targets")


def compress(model: nn.Module, cfg: CompressionConfig, statistics: Any = None) -> CompressionReport:
    """Factorise the targeted layers of ``model`` in place.

    Args:
        model: a transformers model (or any module) holding Linear/Conv1D layers.
        cfg: what to factorise and how far.
        statistics: the calibration statistics the method needs (:class:`~.statistics.CalibrationStats`), or a
            mapping of module name to per-weight Fisher for ``fwsvd``; ``None`` for ``svd``. Statistics a method
            does not need only feed the report (Fisher-weighted and output errors).

    Returns:
        The per-layer report.

    Raises:
        FisherError: missing statistics, or statistics that do not fit the model.
        ConfigError: an allocation whose floor ranks exceed the budget, an override matching nothing.
        NoTargetModulesError, UnsupportedModuleError, AlreadyCompressedError: see :func:`resolve_targets`.
    """
    stats = as_statistics(statistics)
    require(cfg, stats, model)
    warn_rank_deficient(cfg, stats)
    targets = resolve_targets(model, cfg.target_modules, cfg.exclude_modules)
    _check_coverage(stats, targets)
    units = plan_units(targets, cfg.qkv)
    params_before = sum(p.numel() for p in model.parameters())
    # One unit's decomposition at a time: what is kept is its factors up to the largest rank any allocation can give
    # it (each direction is one column of up and one row of down, so a lower rank is a slice), in the weight's dtype.
    kept: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    gains: dict[str, torch.Tensor] = {}
    whitenings: dict[str, Any] = {}
    for u in units:
        ustats = unit_statistics(u, stats)
        if ustats.group not in whitenings:  # units reading one input are consecutive: keep only its whitening
            whitenings.clear()
        decomp = decompose_unit(u, cfg, ustats, whitenings)
        if greedy(cfg):
            gains[u.name] = allocation_gains(decomp, cfg, ustats)
        cap = min(decomp.max_rank, max_saving_rank(u.shape))
        if cap >= 1:
            up, down = decomp.factors(cap, dtype=u.members[0].module.weight.dtype)
            kept[u.name] = (up, down, decomp.row_scale)
        del decomp, ustats
    whitenings.clear()
    ranks, chosen_dense = allocate(units, cfg, gains if greedy(cfg) else None)
    replacements: dict[str, LowRankLinear] = {}
    layers: list[LayerReport] = []
    damped: list[str] = []
    for u in units:
        rank = ranks[u.name]
        ustats = unit_statistics(u, stats)
        if rank is None:
            kept.pop(u.name, None)
            layers.append(dense_layer_report(u, ustats, u.name in chosen_dense, cfg))
            continue
        full_up, full_down, row_scale = kept.pop(u.name)
        up, down = full_up[:, :rank].to(torch.float64), full_down[:rank].to(torch.float64)
        weight = u.weight.detach().to(torch.float64)
        if cfg.refit != "none" and ustats.covariance is not None:
            up, down, singular = refit(u.name, weight, up, down, ustats.covariance, ustats.covariance, cfg, row_scale)
            if singular:
                damped.append(u.name)
        replacements.update(factorised(u, up, down))
        layers.append(layer_report(u, rank, weight, up, down, ustats))
    warn_damped(damped, cfg)
    swap_modules(model, replacements)
    return build_report(model, cfg, layers, params_before)


def greedy(cfg: CompressionConfig) -> bool:
    """The allocation reads every unit's spectrum (``fisher``, ``loss``), not just the shapes."""
    return cfg.rank is None and cfg.allocation != "uniform"


def build_report(model: nn.Module, cfg: CompressionConfig, layers: list[LayerReport], params_before: int,
                 **settings: Any) -> CompressionReport:
    """The report of a finished compression of ``model``."""
    return CompressionReport(
        method=cfg.method,
        fisher_axis=cfg.fisher_axis if cfg.method == "fwsvd" else None,
        allocation=cfg.allocation if cfg.rank is None else "fixed",
        ratio=cfg.ratio,
        rank=cfg.rank,
        layers=tuple(layers),
        model_params_before=params_before,
        model_params_after=sum(p.numel() for p in model.parameters()),
        rank_multiple=cfg.rank_multiple,
        settings={**_method_settings(cfg), **settings},
    )


def refit(name: str, weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, cross: torch.Tensor,
          covariance: torch.Tensor, cfg: CompressionConfig, row_scale: torch.Tensor | None = None,
          ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``cfg.refit`` of one unit's factors (float64), and whether a singular system had to be damped.

    Raises:
        NumericalError: naming the layer, when a factor is not finite.
    """
    up, lam = refit_up(weight, down, cross, covariance, cfg.whitening_damp)
    damped = lam > 0
    if cfg.refit == "alternate":
        rows = None if row_scale is None else row_scale.square()
        down, lam = refit_down(weight, up, cross, covariance, rows, cfg.whitening_damp)
        damped |= lam > 0
        up, lam = refit_up(weight, down, cross, covariance, cfg.whitening_damp)
        damped |= lam > 0
    for label, tensor in (("up", up), ("down", down)):
        if not torch.isfinite(tensor).all():
            raise NumericalError(f"the refit {label} factor of {name} is not finite; rerun with refit none")
    return up, down, damped


def warn_damped(names: list[str], cfg: CompressionConfig) -> None:
    """Say which refits solved a singular system (damped by ``whitening_damp`` x its mean diagonal)."""
    if names:
        logging.getLogger("fwsvd_deploy").warning(
            "the refit of %d layer(s) (e.g. %s) solved a singular system; it was damped by %g x its mean diagonal",
            len(names), names[0], cfg.whitening_damp)


def dense_layer_report(u: Unit, stats: UnitStats, chosen: bool, cfg: CompressionConfig) -> LayerReport:
    """The report of a unit left dense."""
    m, n = u.shape
    params = m * n + u.bias_params
    return LayerReport(
        name=u.name, kind=u.kind, shape=(m, n), rank=None, params_before=params, params_after=params,
        plain_error=0.0, fisher_error=None if stats.fisher is None else 0.0,
        skipped=_dense_reason((m, n), chosen, cfg.rank_multiple),
        output_error=None if stats.covariance is None else 0.0,
    )


def layer_report(u: Unit, rank: int, weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 stats: UnitStats) -> LayerReport:
    """The report of a factorised unit: its parameters and its errors against the weight ``(out, in)``."""
    m, n = u.shape
    approx = up.to(torch.float64) @ down.to(torch.float64)
    w = weight.to(torch.float64)
    bias = u.bias_params
    return LayerReport(
        name=u.name, kind=u.kind, shape=(m, n), rank=rank, params_before=m * n + bias,
        params_after=rank * (m + n) + bias,  # each member's up and bias, one down shared by the members
        plain_error=relative_error(w, approx),
        fisher_error=None if stats.fisher is None else relative_error(w, approx, stats.fisher),
        skipped=None,
        output_error=None if stats.covariance is None else output_error(w, approx, stats.covariance),
    )


def _method_settings(cfg: CompressionConfig) -> dict[str, Any]:
    """The settings of the method and allocation that were used (what the report's header names)."""
    out: dict[str, Any] = {"qkv": cfg.qkv}
    if cfg.method == "asvd":
        out["asvd_alpha"] = cfg.asvd_alpha
    if cfg.method in ("svd-llm", "fisher-whitened"):
        out["whitening_damp"] = cfg.whitening_damp
    if cfg.method == "fisher-whitened":
        out["fisher_power"] = cfg.fisher_power
    if cfg.allocation == "loss" and cfg.rank is None:
        out["min_rank_fraction"] = cfg.min_rank_fraction
    return out


def _dense_reason(shape: tuple[int, int], chosen: bool, multiple: int) -> str:
    m, n = shape
    if not chosen:
        return f"left dense: a rank >= {m * n / (m + n):.1f} saves no parameters"
    cap = saving_cap(m, n, multiple)
    aligned = f" that is a multiple of {multiple}" if multiple > 1 else ""
    return (f"kept dense by the allocation: its largest saving rank{aligned} ({cap}) would keep "
            f"{low_rank_params(shape, cap) / (m * n):.1%} of its parameters")


def allocate(units: list[Unit], cfg: CompressionConfig,
             gains: Mapping[str, torch.Tensor] | None) -> tuple[dict[str, int | None], set[str]]:
    """Each unit's rank (``None``: dense), and the units the greedy allocation chose to keep dense.

    ``gains`` (per unit, the error each singular direction removes) is needed by the greedy allocations only.
    """
    shapes = {u.name: u.shape for u in units}
    chosen_dense: set[str] = set()
    if cfg.rank is not None:
        ranks = fixed_ranks(shapes, cfg.rank)
    elif cfg.allocation == "uniform":
        ranks = uniform_ranks(shapes, cfg.ratio, cfg.rank_multiple)  # type: ignore[arg-type]
    else:
        assert gains is not None
        floors = None
        if cfg.allocation == "loss":
            floors = loss_floors(shapes, cfg.ratio, cfg.min_rank_fraction)  # type: ignore[arg-type]
        ranks = greedy_ranks(shapes, gains, cfg.ratio, cfg.rank_multiple, floors)  # type: ignore[arg-type]
        chosen_dense = allocated_dense(shapes, ranks, cfg.rank_multiple)
    overridden = _apply_overrides(ranks, units, cfg.rank_overrides)
    return ranks, chosen_dense - overridden


def factorised(unit: Unit, up: torch.Tensor, down: torch.Tensor) -> dict[str, LowRankLinear]:
    """The replacement of each member of ``unit``, in its weight's dtype; q/k/v members share the first one's
    down-projection."""
    dtype = unit.members[0].module.weight.dtype
    up, down = up.to(dtype), down.to(dtype)
    out: dict[str, LowRankLinear] = {}
    shared = None
    start = 0
    for t in unit.members:
        rows = t.shape[0]
        bias = getattr(t.module, "bias", None)
        device = t.module.weight.device
        layer = LowRankLinear.from_factors(up[start:start + rows].to(device), down.to(device),
                                           None if bias is None else bias.detach(), source_kind=t.kind,
                                           shared_down=shared)
        if shared is None:
            shared = layer.down
        out[t.name] = layer
        start += rows
    return out


def _apply_overrides(ranks: dict[str, int | None], units: list[Unit], overrides: Mapping[str, int]) -> set[str]:
    """Set the overridden ranks in place; returns the names of the units overridden."""
    done: set[str] = set()
    for pattern, rank in overrides.items():
        hits = [u for u in units if u.covers(pattern)]
        if not hits:
            raise ConfigError(f"rank_overrides key {pattern!r} matches no targeted module")
        for u in hits:
            ranks[u.name] = rank if rank <= max_saving_rank(u.shape) else None
            done.add(u.name)
    return done


def swap_modules(model: nn.Module, replacements: Mapping[str, nn.Module]) -> None:
    """Replace each named submodule; every name is checked before anything changes."""
    parents: list[tuple[nn.Module, str, nn.Module]] = []
    for name, new in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not hasattr(parent, child):
            raise KeyError(f"{type(model).__name__} has no submodule {name}")
        parents.append((parent, child, new))
    for parent, child, new in parents:
        setattr(parent, child, new)


def apply_plan(model: nn.Module, layers: Mapping[str, Mapping[str, Any]]) -> None:
    """Give ``model`` the factorised structure recorded in a saved plan (weights are loaded afterwards).

    Raises:
        ValueError: when a planned layer is missing or of another shape or kind.
    """
    replacements: dict[str, LowRankLinear] = {}
    for name, spec in layers.items():
        shared = spec.get("shared_down")
        if shared is not None and shared not in replacements:
            raise ValueError(f"planned layer {name} shares the down-projection of {shared}, which is not planned "
                             "before it")
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"planned layer {name} does not exist in {type(model).__name__}") from exc
        if not isinstance(module, SUPPORTED_TYPES):
            raise ValueError(f"planned layer {name} is a {type(module).__name__}, expected Linear/Conv1D")
        target = Target(name, module)
        if target.kind != spec["kind"] or list(target.shape) != [spec["out_features"], spec["in_features"]]:
            raise ValueError(
                f"planned layer {name} is {target.kind} {target.shape}, plan says {spec['kind']} "
                f"({spec['out_features']}, {spec['in_features']})"
            )
        replacements[name] = LowRankLinear(
            spec["in_features"], spec["out_features"], int(spec["rank"]), bias=bool(spec["bias"]),
            source_kind=spec["kind"], dtype=module.weight.dtype, device=module.weight.device,
            down=None if shared is None else replacements[shared].down,
        )
    swap_modules(model, replacements)


def compressed_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The factorised layers of a model, as a plan that :func:`apply_plan` rebuilds.

    A layer that uses another's down-projection (joint q/k/v) names it under ``shared_down``.
    """
    owner: dict[int, str] = {}
    plan: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if not isinstance(m, LowRankLinear):
            continue
        spec: dict[str, Any] = {"kind": m.source_kind, "rank": m.rank, "in_features": m.in_features,
                                "out_features": m.out_features, "bias": m.up.bias is not None}
        if id(m.down) in owner:
            spec["shared_down"] = owner[id(m.down)]
        else:
            owner[id(m.down)] = name
        plan[name] = spec
    return plan
