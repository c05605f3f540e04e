"""Target resolution and the module swap: the only place that replaces modules in a model.

Every target is resolved and validated, and every replacement built, before the first module is
swapped, so an error never leaves a half-compressed model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import CompressionConfig
from ..errors import AlreadyCompressedError, ConfigError, FisherError, NoTargetModulesError, UnsupportedModuleError
from ..families import QKV_NAMES
from .layers import LowRankLinear
from .ranks import fixed_ranks, greedy_ranks, uniform_ranks
from .report import CompressionReport, LayerReport
from .svd import Decomposition, decompose, max_saving_rank, relative_error

if TYPE_CHECKING:
    from .fisher import FisherResult

SUPPORTED_TYPES = (nn.Linear, Conv1D)
_SUPPORTED_NAMES = "torch.nn.Linear, transformers Conv1D"
_BLOCK_INDEX = re.compile(r"\.\d+\.")


@dataclass(frozen=True)
class Target:
    """One layer to factorise, with its weight in ``(out, in)`` orientation."""

    name: str
    module: nn.Module

    @property
    def kind(self) -> str:
        return "conv1d" if isinstance(self.module, Conv1D) else "linear"

    @property
    def weight(self) -> torch.Tensor:
        w = self.module.weight
        return w.T if self.kind == "conv1d" else w

    @property
    def shape(self) -> tuple[int, int]:
        out_features, in_features = self.weight.shape
        return int(out_features), int(in_features)

    def orient(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like the module's parameter, in ``(out, in)`` orientation."""
        return tensor.T if self.kind == "conv1d" else tensor


def _matches(name: str, patterns: str | tuple[str, ...]) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _head_names(model: nn.Module) -> set[str]:
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if out_emb is not None and module is out_emb:
            heads.add(name)
    return heads


def resolve_targets(
    model: nn.Module,
    target_modules: str | tuple[str, ...] | list[str] = "all-linear",
    exclude_modules: str | tuple[str, ...] | list[str] | None = None,
) -> list[Target]:
    """Find the layers to factorise.

    Args:
        model: the model.
        target_modules: ``"all-linear"`` (every Linear/Conv1D inside the repeated transformer blocks —
            embeddings, pooler and task head stay dense), a list of name suffixes, or a regex that must
            match the whole module name.
        exclude_modules: suffix list or regex removed from the targets.

    Returns:
        The targets, in model order.

    Raises:
        AlreadyCompressedError: when the model already holds factorised layers.
        NoTargetModulesError: when nothing matches.
        UnsupportedModuleError: when an explicit pattern matches a module that cannot be factorised.
    """
    if isinstance(target_modules, list):
        target_modules = tuple(target_modules)
    if isinstance(exclude_modules, list):
        exclude_modules = tuple(exclude_modules)
    already = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    if already:
        raise AlreadyCompressedError(
            f"the model already has {len(already)} factorised layers (e.g. {already[0]}); compress the "
            "original model instead"
        )
    heads = _head_names(model)
    targets: list[Target] = []
    for name, module in model.named_modules():
        if not name or name in heads:
            continue
        if target_modules == "all-linear":
            chosen = isinstance(module, SUPPORTED_TYPES) and _BLOCK_INDEX.search(f".{name}.") is not None
        else:
            chosen = _matches(name, target_modules)
        if not chosen or (exclude_modules is not None and _matches(name, exclude_modules)):
            continue
        if not isinstance(module, SUPPORTED_TYPES):
            raise UnsupportedModuleError(
                f"target {name} is a {type(module).__name__}; only {_SUPPORTED_NAMES} can be factorised "
                "(narrow target_modules or add it to exclude_modules)"
            )
        targets.append(Target(name, module))
    if not targets:
        raise NoTargetModulesError(
            f"no module matched target_modules={target_modules!r} exclude_modules={exclude_modules!r} "
            f"in {type(model).__name__}"
        )
    return targets


@dataclass(frozen=True)
class Unit:
    """What one rank is chosen for: one target, or an attention block's q/k/v stacked on their outputs."""

    name: str
    members: tuple[Target, ...]

    @property
    def kind(self) -> str:
        return self.members[0].kind

    @property
    def shape(self) -> tuple[int, int]:
        return sum(t.shape[0] for t in self.members), self.members[0].shape[1]

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([t.weight for t in self.members])

    @property
    def bias_params(self) -> int:
        return sum(0 if getattr(t.module, "bias", None) is None else t.module.bias.numel() for t in self.members)

    def covers(self, pattern: str) -> bool:
        return any(n == pattern or n.endswith("." + pattern) for n in (self.name, *(t.name for t in self.members)))


def qkv_groups(targets: list[Target]) -> list[tuple[Target, ...]]:
    """The (query, key, value) targets of each attention block in which all three are targeted Linears."""
    by_name = {t.name: t for t in targets}
    groups = []
    for t in targets:
        parent, _, child = t.name.rpartition(".")
        for names in QKV_NAMES:
            full = [f"{parent}.{n}" if parent else n for n in names]
            if child != names[0] or not all(n in by_name for n in full):
                continue
            members = tuple(by_name[n] for n in full)
            if all(m.kind == "linear" for m in members) and len({m.shape[1] for m in members}) == 1:
                groups.append(members)
    return groups


def plan_units(targets: list[Target], qkv: str = "separate") -> list[Unit]:
    """One unit per target, except that ``qkv='joint'`` makes each attention block's q, k and v one unit."""
    if qkv == "separate":
        return [Unit(t.name, (t,)) for t in targets]
    groups = qkv_groups(targets)
    if not groups:
        raise ConfigError(
            "qkv='joint' found no attention block whose query, key and value projections are all targeted "
            f"Linears (looked for {', '.join('/'.join(n) for n in QKV_NAMES)}); use qkv='separate'"
        )
    group_of = {t.name: g for g in groups for t in g}
    units: list[Unit] = []
    for t in targets:
        group = group_of.get(t.name)
        if group is None:
            units.append(Unit(t.name, (t,)))
        elif group[0] is t:
            parent = t.name.rpartition(".")[0]
            children = ",".join(m.name.rpartition(".")[2] for m in group)
            units.append(Unit(f"{parent}.{{{children}}}" if parent else f"{{{children}}}", group))
    return units


def _fisher_tensor(fisher: Mapping[str, torch.Tensor], target: Target) -> torch.Tensor:
    if target.name not in fisher:
        raise FisherError(
            f"no Fisher statistics for {target.name}; collect Fisher with the same target_modules"
        )
    tensor = fisher[target.name]
    if tuple(tensor.shape) != tuple(target.module.weight.shape):
        raise FisherError(
            f"Fisher for {target.name} has shape {tuple(tensor.shape)}, the weight has "
            f"{tuple(target.module.weight.shape)}; the statistics belong to another model"
        )
    return target.orient(tensor)


def _allocation_gain(decomp: Decomposition, fisher: torch.Tensor, axis: str) -> torch.Tensor:
    """Per-rank-step weighted error, scaled so that layers compare as estimated loss increase."""
    m, n = decomp.shape
    if axis == "both":
        scale = float(fisher.to(torch.float64).sum().clamp_min(torch.finfo(torch.float64).tiny))
    elif axis == "output":
        scale = float(n)
    else:
        scale = float(m)
    return decomp.s.square() / scale


def _fisher_mapping(fisher: FisherResult | Mapping[str, torch.Tensor] | None,
                    targets: list[Target]) -> Mapping[str, torch.Tensor] | None:
    """The statistics by layer name; a typed result must have been collected for (at least) ``targets``."""
    if fisher is None:
        return None
    collected = getattr(fisher, "targets", None)
    if collected:
        missing = [t.name for t in targets if t.name not in set(collected)]
        if missing:
            raise FisherError(f"the Fisher statistics were collected for other layers than the targets (missing "
                              f"{missing[:3]}{' ...' if len(missing) > 3 else ''}); collect them for these targets")
    return getattr(fisher, "fisher", fisher)


def compress(model: nn.Module, cfg: CompressionConfig,
             fisher: FisherResult | Mapping[str, torch.Tensor] | None = None) -> CompressionReport:
    """Factorise the targeted layers of ``model`` in place.

    Args:
        model: a transformers model (or any module) holding Linear/Conv1D layers.
        cfg: what to factorise and how far.
        fisher: a :class:`~fwsvd_deploy.compression.fisher.FisherResult`, which names the layers it was
            collected for (they must cover the targets), or a mapping of module name to per-weight Fisher (shaped
            like the module's weight). Required by ``method='fwsvd'``; when given to ``svd`` it only feeds the
            Fisher-weighted error in the report.

    Returns:
        The per-layer report.

    Raises:
        FisherError: ``fwsvd`` without Fisher, or Fisher that does not fit the model.
        NoTargetModulesError, UnsupportedModuleError, AlreadyCompressedError: see :func:`resolve_targets`.
    """
    if cfg.needs_fisher and fisher is None:
        raise FisherError("method='fwsvd' needs Fisher statistics; run collect_fisher first (or use method='svd')")
    targets = resolve_targets(model, cfg.target_modules, cfg.exclude_modules)
    stats = _fisher_mapping(fisher, targets)
    units = plan_units(targets, cfg.qkv)
    params_before = sum(p.numel() for p in model.parameters())

    fishers: dict[str, torch.Tensor] = {}
    if stats is not None:
        for u in units:
            fishers[u.name] = torch.cat([_fisher_tensor(stats, t) for t in u.members])
    decomps: dict[str, Decomposition] = {}
    for u in units:
        weighted = fishers[u.name] if cfg.method == "fwsvd" else None
        decomps[u.name] = decompose(u.weight, weighted, cfg.fisher_axis, cfg.eps)

    shapes = {u.name: u.shape for u in units}
    if cfg.rank is not None:
        ranks = fixed_ranks(shapes, cfg.rank)
    elif cfg.allocation == "fisher":
        gains = {u.name: _allocation_gain(decomps[u.name], fishers[u.name], cfg.fisher_axis) for u in units}
        ranks = greedy_ranks(shapes, gains, cfg.ratio, cfg.rank_multiple)  # type: ignore[arg-type]
    else:
        ranks = uniform_ranks(shapes, cfg.ratio, cfg.rank_multiple)  # type: ignore[arg-type]
    _apply_overrides(ranks, units, cfg.rank_overrides)

    replacements: dict[str, LowRankLinear] = {}
    layers: list[LayerReport] = []
    for u in units:
        rank = ranks[u.name]
        m, n = u.shape
        params_before_unit = m * n + u.bias_params
        if rank is None:
            layers.append(LayerReport(
                name=u.name, kind=u.kind, shape=(m, n), rank=None, params_before=params_before_unit,
                params_after=params_before_unit, plain_error=0.0,
                fisher_error=0.0 if u.name in fishers else None,
                skipped=f"left dense: a rank >= {m * n / (m + n):.1f} saves no parameters",
            ))
            continue
        decomp = decomps[u.name]
        up, down = decomp.factors(rank, dtype=u.members[0].module.weight.dtype)
        new = _factorised(u, up, down)
        replacements.update(new)
        approx = decomp.reconstruct(rank)
        kept = {id(p): p.numel() for layer in new.values() for p in layer.parameters()}
        layers.append(LayerReport(
            name=u.name, kind=u.kind, shape=(m, n), rank=rank, params_before=params_before_unit,
            params_after=sum(kept.values()),
            plain_error=relative_error(decomp.weight, approx),
            fisher_error=relative_error(decomp.weight, approx, fishers[u.name]) if u.name in fishers else None,
            skipped=None,
        ))

    swap_modules(model, replacements)
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
    )


def _factorised(unit: Unit, up: torch.Tensor, down: torch.Tensor) -> dict[str, LowRankLinear]:
    """The replacement of each member of ``unit``; q/k/v members share the first one's down-projection."""
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


def _apply_overrides(ranks: dict[str, int | None], units: list[Unit], overrides: Mapping[str, int]) -> None:
    for pattern, rank in overrides.items():
        hits = [u for u in units if u.covers(pattern)]
        if not hits:
            raise ConfigError(f"rank_overrides key {pattern!r} matches no targeted module")
        for u in hits:
            ranks[u.name] = rank if rank <= max_saving_rank(u.shape) else None


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
