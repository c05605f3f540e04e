"""Low-rank factorisation math: plain and Fisher-weighted SVD on plain tensors.

All functions take a weight in torch orientation, ``W`` of shape ``(out, in)`` so that ``y = x @ W.T``,
and return factors ``up`` ``(out, r)`` and ``down`` ``(r, in)`` with ``W ~= up @ down``. Nothing here
knows about modules, hooks or data.

Fisher weighting (Hsu et al., ICLR 2022) shares the per-weight importance ``F`` along an axis:
``a_i = sqrt(sum_j F_ij)`` per output row and ``b_j = sqrt(sum_i F_ij)`` per input column.

* ``output``: ``Z = diag(a) W``; ``up = diag(1/a) U_r S_r``, ``down = V_r^T``.
* ``input``:  ``Z = W diag(b)``; ``up = U_r``, ``down = U_r^T W``.
* ``both``:   ``Z = diag(a) W diag(b)``; ``up = diag(1/a) U_r S_r``, ``down = V_r^T diag(1/b)``.

A uniform ``F`` makes every variant exactly plain SVD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FisherError

AXES = ("both", "output", "input")


@dataclass(frozen=True)
class Decomposition:
    """The SVD of the (possibly weighted) matrix ``Z`` of one layer, truncatable at any rank.

    Computed once per layer in float64; ``factors(r)`` and ``reconstruct(r)`` are then cheap.
    """

    weight: torch.Tensor  # (out, in), float64
    u: torch.Tensor  # (out, k)
    s: torch.Tensor  # (k,)
    vh: torch.Tensor  # (k, in)
    row_scale: torch.Tensor | None  # a, (out,)
    col_scale: torch.Tensor | None  # b, (in,)
    axis: str | None  # None for plain SVD

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.weight.shape[0]), int(self.weight.shape[1]))

    @property
    def max_rank(self) -> int:
        return int(self.s.numel())

    def factors(self, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(up, down)`` keeping ``rank`` singular directions."""
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} outside [1, {self.max_rank}]")
        u_r, s_r, vh_r = self.u[:, :rank], self.s[:rank], self.vh[:rank]
        if self.axis == "input":
            up = u_r
            down = u_r.T @ self.weight
        else:
            up = u_r * s_r
            down = vh_r
            if self.row_scale is not None:
                up = up / self.row_scale[:, None]
            if self.col_scale is not None:
                down = down / self.col_scale[None, :]
        return up.to(dtype).contiguous(), down.to(dtype).contiguous()

    def reconstruct(self, rank: int) -> torch.Tensor:
        up, down = self.factors(rank, dtype=torch.float64)
        return up @ down


def _importance(fisher: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    """sqrt of Fisher summed along ``dim``, with tiny or zero entries raised to ``eps * max``."""
    scale = fisher.sum(dim=dim).clamp_min(0).sqrt()
    top = scale.max()
    if not torch.isfinite(top):
        raise FisherError("Fisher statistics contain NaN or inf")
    if top <= 0:
        return torch.ones_like(scale)
    return scale.clamp_min(top * eps)


def decompose(
    weight: torch.Tensor,
    fisher: torch.Tensor | None = None,
    axis: str | None = "both",
    eps: float = 1e-6,
) -> Decomposition:
    """Decompose one weight for plain (``fisher=None``) or Fisher-weighted SVD.

    Args:
        weight: ``(out, in)`` weight.
        fisher: per-weight importance of the same shape, or ``None`` for plain SVD.
        axis: ``both``, ``output`` or ``input``; ignored without ``fisher``.
        eps: importance floor relative to the layer's largest row/column importance.

    Returns:
        A :class:`Decomposition` to truncate at any rank.

    Raises:
        ValueError: on mismatched shapes or an unknown axis.
        FisherError: when ``fisher`` is not finite.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float64)
    if fisher is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return Decomposition(w, u, s, vh, None, None, None)
    if axis not in AXES:
        raise ValueError(f"axis={axis!r}; choose one of {', '.join(AXES)}")
    if fisher.shape != weight.shape:
        raise ValueError(f"Fisher shape {tuple(fisher.shape)} != weight shape {tuple(weight.shape)}")
    f = fisher.detach().to(torch.float64)
    if not torch.isfinite(f).all():
        raise FisherError("Fisher statistics contain NaN or inf")
    a = _importance(f, dim=1, eps=eps) if axis in ("both", "output") else None
    b = _importance(f, dim=0, eps=eps) if axis in ("both", "input") else None
    z = w
    if a is not None:
        z = a[:, None] * z
    if b is not None:
        z = z * b[None, :]
    u, s, vh = torch.linalg.svd(z, full_matrices=False)
    return Decomposition(w, u, s, vh, a, b, axis)


def relative_error(weight: torch.Tensor, approx: torch.Tensor, fisher: torch.Tensor | None = None) -> float:
    """``||W - W'|| / ||W||`` in Frobenius norm, or in the ``F``-weighted norm ``sqrt(sum F * x^2)``."""
    w = weight.detach().to(torch.float64)
    diff = (w - approx.to(torch.float64)).square()
    ref = w.square()
    if fisher is not None:
        f = fisher.detach().to(torch.float64)
        diff, ref = diff * f, ref * f
    denom = ref.sum()
    if denom <= 0:
        return 0.0 if diff.sum() <= 0 else float("inf")
    return float((diff.sum() / denom).sqrt())


def low_rank_params(shape: tuple[int, int], rank: int) -> int:
    """Weight parameters of a rank-``rank`` factorisation of an ``(out, in)`` matrix."""
    out_features, in_features = shape
    return rank * (out_features + in_features)


def max_saving_rank(shape: tuple[int, int]) -> int:
    """Largest rank whose factorisation has fewer weight parameters than the dense matrix (0 if none)."""
    out_features, in_features = shape
    return (out_features * in_features - 1) // (out_features + in_features)
