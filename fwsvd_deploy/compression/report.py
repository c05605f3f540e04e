"""What a compression did, layer by layer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LayerReport:
    """One targeted layer.

    Attributes:
        name: module name.
        kind: ``linear`` or ``conv1d``.
        shape: ``(out_features, in_features)``.
        rank: kept rank, or ``None`` when the layer was left dense.
        params_before / params_after: parameters of the module (weights and bias).
        plain_error: ``||W - W'||_F / ||W||_F``.
        fisher_error: the same in the Fisher-weighted norm, when Fisher was available.
        skipped: why the layer was left dense, or ``None``.
        output_error: ``||(W - W') L|| / ||W L||`` over the calibration inputs (``L L^T`` their second moment),
            when input statistics were available.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    rank: int | None
    params_before: int
    params_after: int
    plain_error: float
    fisher_error: float | None
    skipped: str | None
    output_error: float | None = None


@dataclass(frozen=True)
class CompressionReport:
    """Per-layer ranks, parameter counts and reconstruction errors, with totals."""

    method: str
    fisher_axis: str | None
    allocation: str
    ratio: float | None
    rank: int | None
    layers: tuple[LayerReport, ...]
    model_params_before: int
    model_params_after: int
    rank_multiple: int = 1
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def target_params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def target_params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def target_weight_params_before(self) -> int:
        return sum(layer.shape[0] * layer.shape[1] for layer in self.layers)

    @property
    def target_weight_params_after(self) -> int:
        return sum(
            layer.shape[0] * layer.shape[1] if layer.rank is None else layer.rank * sum(layer.shape)
            for layer in self.layers
        )

    @property
    def kept_fraction(self) -> float:
        """Fraction of the targeted weight parameters kept (the quantity ``ratio`` budgets)."""
        return self.target_weight_params_after / self.target_weight_params_before

    @property
    def skipped(self) -> tuple[LayerReport, ...]:
        return tuple(layer for layer in self.layers if layer.rank is None)

    @property
    def ranks(self) -> dict[str, int | None]:
        return {layer.name: layer.rank for layer in self.layers}

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layers"] = [dict(dataclasses.asdict(layer), shape=list(layer.shape)) for layer in self.layers]
        out["totals"] = {
            "target_params_before": self.target_params_before,
            "target_params_after": self.target_params_after,
            "target_weight_params_before": self.target_weight_params_before,
            "target_weight_params_after": self.target_weight_params_after,
            "kept_fraction": self.kept_fraction,
            "layers_factorised": len(self.layers) - len(self.skipped),
            "layers_left_dense": len(self.skipped),
        }
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionReport:
        fields = {f.name for f in dataclasses.fields(cls)}
        layers = tuple(
            LayerReport(**dict(layer, shape=tuple(layer["shape"]))) for layer in data["layers"]
        )
        return cls(**{k: v for k, v in data.items() if k in fields and k != "layers"}, layers=layers)

    def to_markdown(self, max_rows: int | None = None) -> str:
        """A table a person reads: one row per layer, then totals."""
        setting = f"ratio {self.ratio}" if self.rank is None else f"rank {self.rank}"
        if self.rank_multiple > 1:
            setting += f", ranks multiples of {self.rank_multiple}"
        axis = f", Fisher axis {self.fisher_axis}" if self.fisher_axis else ""
        extra = {k: v for k, v in self.settings.items() if not (k == "qkv" and v == "separate")}
        if extra:
            axis += ", " + ", ".join(f"{k} {v}" for k, v in extra.items())
        lines = [
            f"**{self.method}**{axis}, {self.allocation} allocation, {setting}: "
            f"{self.target_weight_params_after:,} of {self.target_weight_params_before:,} targeted weight "
            f"parameters kept ({self.kept_fraction:.3f}); model {self.model_params_before:,} -> "
            f"{self.model_params_after:,} parameters; {len(self.skipped)} layer(s) left dense.",
            "",
            "| layer | shape | rank | params before | params after | rel. error | Fisher-weighted error | "
            "output error |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        rows = self.layers if max_rows is None else self.layers[:max_rows]
        for layer in rows:
            rank = "dense" if layer.rank is None else str(layer.rank)
            fisher = "-" if layer.fisher_error is None else f"{layer.fisher_error:.4f}"
            output = "-" if layer.output_error is None else f"{layer.output_error:.4f}"
            lines.append(
                f"| {layer.name} | {layer.shape[0]}x{layer.shape[1]} | {rank} | {layer.params_before:,} | "
                f"{layer.params_after:,} | {layer.plain_error:.4f} | {fisher} | {output} |"
            )
        if max_rows is not None and len(self.layers) > max_rows:
            lines.append(f"| ... {len(self.layers) - max_rows} more | | | | | | | |")
        return "\n".join(lines)
