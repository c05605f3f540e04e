"""What to factorise: target layers resolved from patterns, and the units a rank is chosen for.

A unit is one target, or (``qkv='joint'``) an attention block's query, key and value stacked on their outputs,
factorised with one shared down-projection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import AlreadyCompressedError, ConfigError, NoTargetModulesError, UnsupportedModuleError
from ..families import QKV_NAMES
from .layers import LowRankLinear

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
