"""Per-unit factorisation: a method's statistics for one unit, its decomposition, and its allocation gains.

The only module that reads :class:`~.statistics.CalibrationStats` for the math; :mod:`.svd` stays on plain
tensors and :mod:`.apply` only swaps modules.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..config import CompressionConfig
from ..errors import FisherError
from .statistics import CalibrationStats
from .svd import Decomposition, RightFactor, activation_scaled, decompose, importance, whitened, whitening
from .targets import Target, Unit


@dataclass(frozen=True)
class UnitStats:
    """What one unit's method reads: its stacked Fisher, its input's second moment and mean ``|x|``."""

    fisher: torch.Tensor | None = None  # (out, in), the members' Fisher stacked on the output axis
    covariance: torch.Tensor | None = None  # (in, in) X^T X / N of the shared input
    abs_mean: torch.Tensor | None = None  # (in,)
    group: str | None = None  # the input group, which units reading one input share


def as_statistics(statistics: Any) -> CalibrationStats | None:
    """Accept :class:`CalibrationStats`, a bare ``{name: fisher}`` mapping (Fisher only), or ``None``."""
    if statistics is None or isinstance(statistics, CalibrationStats):
        return statistics
    if isinstance(statistics, Mapping):
        return CalibrationStats(targets=tuple(statistics), fisher=dict(statistics))
    fisher = getattr(statistics, "fisher", None)
    if isinstance(fisher, Mapping):
        return CalibrationStats(targets=tuple(fisher), fisher=dict(fisher))
    raise TypeError(f"statistics must be CalibrationStats or a mapping of Fisher tensors, got {type(statistics)}")


def _fisher_of(stats: CalibrationStats, target: Target) -> torch.Tensor:
    assert stats.fisher is not None
    if target.name not in stats.fisher:
        raise FisherError(f"no Fisher statistics for {target.name}; collect them with the same target_modules")
    tensor = stats.fisher[target.name]
    if tuple(tensor.shape) != tuple(target.module.weight.shape):
        raise FisherError(
            f"Fisher for {target.name} has shape {tuple(tensor.shape)}, the weight has "
            f"{tuple(target.module.weight.shape)}; the statistics belong to another model"
        )
    return target.orient(tensor)


def _input_group(stats: CalibrationStats, unit: Unit) -> str:
    groups = {stats.group(t.name) for t in unit.members}
    if len(groups) > 1:
        raise FisherError(f"the members of {unit.name} read different inputs; they cannot share a down-projection")
    group = groups.pop()
    size = unit.shape[1]
    assert stats.second_moment is not None
    if tuple(stats.second_moment[group].shape) != (size, size):
        raise FisherError(f"input statistics of {unit.name} have shape {tuple(stats.second_moment[group].shape)}, "
                          f"the layer reads {size} features; the statistics belong to another model")
    return group


def unit_statistics(unit: Unit, stats: CalibrationStats | None) -> UnitStats:
    """The statistics of ``unit`` that were collected (validated against its shape)."""
    if stats is None:
        return UnitStats()
    fisher = None
    if stats.fisher is not None:
        fisher = torch.cat([_fisher_of(stats, t) for t in unit.members])
    covariance = abs_mean = group = None
    if stats.second_moment is not None:
        group = _input_group(stats, unit)
        covariance = stats.covariance(unit.members[0].name)
        if stats.abs_sum is not None:
            abs_mean = stats.abs_mean(unit.members[0].name)
    return UnitStats(fisher, covariance, abs_mean, group)


def require(cfg: CompressionConfig, stats: CalibrationStats | None, model: torch.nn.Module,
            kinds: tuple[str, ...] | None = None) -> None:
    """Fail before any change when the method's statistics (or ``kinds`` of them) are missing or were collected on
    another model."""
    if stats is not None and stats.model_hash is not None:
        from ..manifest import model_fingerprint

        if model_fingerprint(model) != stats.model_hash:
            raise FisherError("the calibration statistics were collected on another model (or other weights); "
                              "collect them on the model being compressed")
    have = {"fisher": stats is not None and stats.fisher is not None,
            "inputs": stats is not None and stats.second_moment is not None}
    missing = [k for k in (cfg.statistics if kinds is None else kinds) if not have[k]]
    if missing:
        what = " and ".join({"fisher": "Fisher statistics", "inputs": "input statistics"}[k] for k in missing)
        raise FisherError(f"method={cfg.method!r} needs {what}; run the calibration pass first "
                          "(collect_statistics, or collect_fisher for Fisher alone) or use method='svd'")


def warn_rank_deficient(cfg: CompressionConfig, stats: CalibrationStats | None) -> None:
    """Whitening needs more calibration tokens than input features for a full-rank second moment: say when not."""
    if cfg.method not in ("svd-llm", "fisher-whitened") or stats is None or stats.second_moment is None:
        return
    short = {g: (stats.tokens[g], m.shape[0]) for g, m in stats.second_moment.items() if stats.tokens[g] < m.shape[0]}
    if short:
        group, (tokens, features) = next(iter(short.items()))
        logging.getLogger("fwsvd_deploy").warning(
            "%d input(s) have fewer calibration tokens than features (e.g. %s: %d tokens, %d features), so their "
            "second moment is rank-deficient; it is damped by whitening_damp=%g x its mean diagonal. More "
            "calibration examples (--fisher-samples) give a better whitening.",
            len(short), group, tokens, features, cfg.whitening_damp)


def decompose_unit(unit: Unit, cfg: CompressionConfig, stats: UnitStats,
                   whitenings: dict[str, RightFactor] | None = None) -> Decomposition:
    """The method's decomposition of the unit's (stacked) weight.

    ``whitenings`` caches the whitening factor of each input group across the units that read it.
    """
    weight = unit.weight
    if cfg.method == "svd":
        return decompose(weight)
    if cfg.method == "fwsvd":
        return decompose(weight, stats.fisher, cfg.fisher_axis, cfg.eps)
    if cfg.method == "asvd":
        assert stats.abs_mean is not None
        return activation_scaled(weight, stats.abs_mean, cfg.asvd_alpha, cfg.eps)
    assert stats.covariance is not None
    fisher = stats.fisher if cfg.method == "fisher-whitened" else None
    right = None
    if whitenings is not None and stats.group is not None:
        if stats.group not in whitenings:
            whitenings[stats.group] = whitening(stats.covariance, cfg.whitening_damp)[0]
        right = whitenings[stats.group]
    return whitened(weight, stats.covariance, cfg.whitening_damp, fisher, cfg.fisher_power, cfg.eps, right)


def allocation_gains(decomp: Decomposition, cfg: CompressionConfig, stats: UnitStats) -> torch.Tensor:
    """The error each singular direction removes, in units that compare across layers for a global allocation.

    ``fwsvd``: the Fisher-weighted error, scaled to estimate ``sum F * dW^2`` (the loss increase under the
    diagonal Fisher). ``fisher-whitened``: ``s_j^2 ||diag(a / r) u_j||^2 / tr(C)``, the loss increase that a
    row-diagonal Fisher of the outputs, ``a_i^2 / tr(C)``, gives the output error ``dW L`` (exact per direction,
    because the ``V`` rows are orthonormal). The other methods: ``s_j^2``, their own metric (the weight error for
    ``svd``, the scaled error for ``asvd``, the mean squared output error per token for ``svd-llm``).
    """
    s2 = decomp.s.square()
    if cfg.method == "fwsvd":
        assert stats.fisher is not None
        m, n = decomp.shape
        if cfg.fisher_axis == "both":
            scale = float(stats.fisher.to(torch.float64).sum().clamp_min(torch.finfo(torch.float64).tiny))
        else:
            scale = float(n if cfg.fisher_axis == "output" else m)
        return s2 / scale
    if cfg.method == "fisher-whitened":
        assert stats.fisher is not None and stats.covariance is not None and decomp.row_scale is not None
        a = importance(stats.fisher.to(torch.float64), dim=1, eps=cfg.eps)
        weights = (a / decomp.row_scale)[:, None] * decomp.u
        trace = float(stats.covariance.diagonal().sum().clamp_min(torch.finfo(torch.float64).tiny))
        return s2 * weights.square().sum(0) / trace
    return s2
