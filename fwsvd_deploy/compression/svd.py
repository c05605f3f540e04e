"""Low-rank factorisation math on plain tensors: every method is an SVD of a reweighted weight.

All functions take a weight in torch orientation, ``W`` of shape ``(out, in)`` so that ``y = x @ W.T``,
and give factors ``up`` ``(out, r)`` and ``down`` ``(r, in)`` with ``W ~= up @ down``. Nothing here
knows about modules, hooks or data.

Each method takes the SVD of ``Z = diag(r) W M`` for a positive row weight ``r`` and an invertible right factor
``M``, keeps the top ``k`` singular directions and undoes the weighting: ``up = diag(1/r) U_k S_k``,
``down = V_k^T M^-1``. The discarded ``sum_{j>k} s_j^2`` is then exactly ``||diag(r) (W - up down) M||_F^2``, the
error in the method's own metric.

* ``svd``: ``r = 1``, ``M = I``.
* ``fwsvd`` (Hsu et al., ICLR 2022), Fisher ``F`` shared along an axis, ``a_i = sqrt(sum_j F_ij)`` per output
  row and ``b_j = sqrt(sum_i F_ij)`` per input column: ``output`` ``r = a``; ``both`` ``r = a, M = diag(b)``;
  ``input`` (the paper's literal axis) ``M = diag(b)`` with ``up = U_k``, ``down = U_k^T W``.
* ``asvd`` (Yuan et al.): ``M = diag(mean|x|^alpha)``.
* ``svd-llm`` (Wang et al., ICLR 2025): ``M = L`` with ``L L^T = X^T X / N`` (Cholesky of the damped input second
  moment; an eigen-decomposition ``Q sqrt(Lambda)`` when Cholesky fails), so ``s_j^2`` is the mean squared output
  error per token that direction ``j`` adds. ``M^-1`` is applied by triangular solves, never formed.
* ``fisher-whitened``: ``r = (a / mean(a)) ** p`` on top of ``svd-llm``'s ``L``.

A uniform ``F`` makes every Fisher variant exactly plain SVD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FisherError

AXES = ("both", "output", "input")


@dataclass(frozen=True)
class RightFactor:
    """An invertible ``M`` (in x in) applied on the right: a diagonal, a lower-triangular ``L``, or ``Q sqrt(L)``."""

    kind: str  # "diag" | "tril" | "eig"
    diag: torch.Tensor | None = None  # (in,) for diag; sqrt eigenvalues for eig
    matrix: torch.Tensor | None = None  # L (tril) or Q (eig)

    def right(self, z: torch.Tensor) -> torch.Tensor:
        """``z @ M``."""
        if self.kind == "diag":
            return z * self.diag[None, :]
        if self.kind == "tril":
            return z @ self.matrix
        return (z @ self.matrix) * self.diag[None, :]

    def right_inverse(self, z: torch.Tensor) -> torch.Tensor:
        """``z @ M^-1`` without forming the inverse."""
        if self.kind == "diag":
            return z / self.diag[None, :]
        if self.kind == "tril":
            return torch.linalg.solve_triangular(self.matrix, z, upper=False, left=False)
        return (z / self.diag[None, :]) @ self.matrix.T


@dataclass(frozen=True)
class Decomposition:
    """The SVD of the weighted matrix ``Z = diag(r) W M`` of one layer, truncatable at any rank.

    Computed once per layer in float64; ``factors(k)`` and ``reconstruct(k)`` are then cheap.
    """

    weight: torch.Tensor  # (out, in), float64
    u: torch.Tensor  # (out, p)
    s: torch.Tensor  # (p,)
    vh: torch.Tensor  # (p, in)
    row_scale: torch.Tensor | None  # r, (out,)
    right: RightFactor | None  # M
    method: str = "svd"
    literal_input: bool = False  # fwsvd's input axis: up = U_k, down = U_k^T W

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
        if self.literal_input:
            up, down = u_r, u_r.T @ self.weight
        else:
            up = u_r * s_r
            down = vh_r if self.right is None else self.right.right_inverse(vh_r)
            if self.row_scale is not None:
                up = up / self.row_scale[:, None]
        return up.to(dtype).contiguous(), down.to(dtype).contiguous()

    def reconstruct(self, rank: int) -> torch.Tensor:
        up, down = self.factors(rank, dtype=torch.float64)
        return up @ down

    def weighted(self, matrix: torch.Tensor) -> torch.Tensor:
        """``diag(r) matrix M``: a weight-shaped matrix in the method's own metric."""
        z = matrix.to(torch.float64)
        if self.row_scale is not None:
            z = self.row_scale[:, None] * z
        return z if self.right is None else self.right.right(z)


def importance(fisher: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    """sqrt of Fisher summed along ``dim``, with tiny or zero entries raised to ``eps * max``."""
    scale = fisher.sum(dim=dim).clamp_min(0).sqrt()
    top = scale.max()
    if not torch.isfinite(top):
        raise FisherError("Fisher statistics contain NaN or inf")
    if top <= 0:
        return torch.ones_like(scale)
    return scale.clamp_min(top * eps)


def _check_weight(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    return weight.detach().to(torch.float64)


def _check_fisher(fisher: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if fisher.shape != weight.shape:
        raise ValueError(f"Fisher shape {tuple(fisher.shape)} != weight shape {tuple(weight.shape)}")
    f = fisher.detach().to(torch.float64)
    if not torch.isfinite(f).all():
        raise FisherError("Fisher statistics contain NaN or inf")
    return f


# thin_svd: matrices whose smaller side is at least this use the Gram eigendecomposition ...
GRAM_MIN_SIDE = 128
# ... unless s_min / s_max is below this (then LAPACK's SVD)
GRAM_RTOL = 1e-7


def thin_svd(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(z, full_matrices=False)`` of a float64 matrix, about twice as fast on a large one.

    The singular values and the smaller side's vectors come from the symmetric eigendecomposition of the smaller
    Gram matrix (``Z^T Z`` or ``Z Z^T``), the other side's vectors from one product (``U = Z V / s``). Squaring
    costs the small singular values accuracy (an eigenvalue is exact to about ``n * eps * s_max^2``, so ``s_j`` to
    about ``n * eps * s_max^2 / s_j``), not the large ones a truncation keeps; the vectors from ``eigh`` are
    orthonormal whatever the conditioning, so ``U diag(s) V^T`` rebuilds ``Z`` and a truncation projects exactly.
    On SmolLM2-135M's 210 whitened weights (up to 1536 x 576) against LAPACK: singular values within 7e-12 of
    ``s_max``, every kept one within 9e-12 relative, the kept subspaces within 1.1e-9 (projector norm), in 129 s
    against 242 s (the two timed side by side on a busy machine). Small matrices, and those with
    ``s_min / s_max < GRAM_RTOL`` (where ``Z V / s`` would divide by rounding noise), go to LAPACK's SVD.
    """
    m, n = z.shape
    if min(m, n) < GRAM_MIN_SIDE or z.dtype != torch.float64:
        return torch.linalg.svd(z, full_matrices=False)
    tall = m >= n
    values, vectors = torch.linalg.eigh(z.T @ z if tall else z @ z.T)
    values, vectors = values.flip(0), vectors.flip(1)  # descending
    s = values.clamp_min(0).sqrt()
    if not bool(s[-1] > s[0] * GRAM_RTOL):
        return torch.linalg.svd(z, full_matrices=False)
    if tall:
        return (z @ vectors) / s[None, :], s, vectors.T.contiguous()
    return vectors, s, (vectors.T @ z) / s[:, None]


def _svd(w: torch.Tensor, row: torch.Tensor | None, right: RightFactor | None, method: str,
         literal_input: bool = False) -> Decomposition:
    z = w if row is None else row[:, None] * w
    if right is not None:
        z = right.right(z)
    # fwsvd's input axis keeps U_k itself as a factor, so its columns must be orthonormal to the last one: LAPACK
    u, s, vh = torch.linalg.svd(z, full_matrices=False) if literal_input else thin_svd(z)
    return Decomposition(w, u, s, vh, row, right, method, literal_input)


def decompose(
    weight: torch.Tensor,
    fisher: torch.Tensor | None = None,
    axis: str | None = "both",
    eps: float = 1e-6,
) -> Decomposition:
    """Plain SVD (``fisher=None``) or Fisher-weighted SVD on ``axis`` (``both``, ``output`` or ``input``).

    Raises:
        ValueError: on mismatched shapes or an unknown axis.
        FisherError: when ``fisher`` is not finite.
    """
    w = _check_weight(weight)
    if fisher is None:
        return _svd(w, None, None, "svd")
    if axis not in AXES:
        raise ValueError(f"axis={axis!r}; choose one of {', '.join(AXES)}")
    f = _check_fisher(fisher, weight)
    a = importance(f, dim=1, eps=eps) if axis in ("both", "output") else None
    b = importance(f, dim=0, eps=eps) if axis in ("both", "input") else None
    right = None if b is None else RightFactor("diag", diag=b)
    return _svd(w, a, right, "fwsvd", literal_input=axis == "input")


def activation_scaled(weight: torch.Tensor, abs_mean: torch.Tensor, alpha: float = 0.5,
                      eps: float = 1e-6) -> Decomposition:
    """ASVD: the SVD of ``W diag(s)``, ``s_j = mean|x_j| ** alpha`` (tiny entries floored at ``eps * max``)."""
    w = _check_weight(weight)
    scale = abs_mean.detach().to(torch.float64)
    if scale.shape != (w.shape[1],) or not torch.isfinite(scale).all():
        raise FisherError(f"activation statistics of shape {tuple(scale.shape)} do not fit a weight {tuple(w.shape)}")
    scale = scale.clamp_min(0) ** alpha
    top = scale.max()
    scale = torch.ones_like(scale) if top <= 0 else scale.clamp_min(top * eps)
    return _svd(w, None, RightFactor("diag", diag=scale), "asvd")


def whitening(second_moment: torch.Tensor, damp: float = 1e-4) -> tuple[RightFactor, float]:
    """``M`` with ``M M^T = C + lambda I``, ``lambda = damp * mean(diag C)``: Cholesky, or eigen when it fails.

    Returns:
        The factor and ``lambda``.
    """
    c = second_moment.detach().to(torch.float64)
    c = (c + c.T) / 2
    if not torch.isfinite(c).all():
        raise FisherError("input second moment contains NaN or inf")
    mean_diag = float(c.diagonal().mean())
    lam = damp * mean_diag if mean_diag > 0 else damp
    eye = torch.eye(c.shape[0], dtype=torch.float64)
    factor, info = torch.linalg.cholesky_ex(c + lam * eye)
    if int(info) == 0:
        return RightFactor("tril", matrix=factor), lam
    values, vectors = torch.linalg.eigh(c)
    floor = max(lam, float(values.max()) * 1e-12, torch.finfo(torch.float64).tiny)
    return RightFactor("eig", diag=values.clamp_min(floor).sqrt(), matrix=vectors), lam


def whitened(weight: torch.Tensor, second_moment: torch.Tensor, damp: float = 1e-4,
             fisher: torch.Tensor | None = None, power: float = 0.5, eps: float = 1e-6,
             right: RightFactor | None = None) -> Decomposition:
    """SVD-LLM's truncation-aware whitening, optionally with Fisher output-row weights (``fisher-whitened``).

    Args:
        weight: ``(out, in)``.
        second_moment: ``X^T X / N`` of the layer's inputs, ``(in, in)``.
        damp: diagonal damping, relative to the mean diagonal.
        fisher: per-weight Fisher for ``fisher-whitened``; its row importance ``a`` becomes ``(a/mean a)**power``.
        power: the tempering exponent.
        eps: importance floor relative to the largest row importance.
        right: ``whitening(second_moment, damp)``'s factor when already computed (layers sharing an input).
    """
    w = _check_weight(weight)
    if tuple(second_moment.shape) != (w.shape[1], w.shape[1]):
        raise FisherError(f"input second moment of shape {tuple(second_moment.shape)} does not fit a weight "
                          f"{tuple(w.shape)}")
    if right is None:
        right, _ = whitening(second_moment, damp)
    row = None
    method = "svd-llm"
    if fisher is not None:
        a = importance(_check_fisher(fisher, weight), dim=1, eps=eps)
        row = (a / a.mean()) ** power
        method = "fisher-whitened"
    return _svd(w, row, right, method)


def _damped_solve(system: torch.Tensor, rhs: torch.Tensor, damp: float,
                  always: bool = False) -> tuple[torch.Tensor, float]:
    """``system^-1 rhs`` for a symmetric positive semi-definite ``system``, and the damping ``lambda`` it took.

    ``lambda = damp * mean(diag)`` is added to the diagonal always (``always``, as the whitening damps a second
    moment), or only when the system is singular or nearly (smallest eigenvalue at most ``1e-10`` of the largest);
    ``0.0`` means it was solved as it is.
    """
    a = (system + system.T) / 2
    mean_diag = float(a.diagonal().mean())
    step = damp * mean_diag if mean_diag > 0 else damp
    lam = step if always else 0.0
    if not always:
        values = torch.linalg.eigvalsh(a)
        top = float(values.max()) if values.numel() else 0.0
        if top <= 0 or float(values.min()) <= top * 1e-10:
            lam = step
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    factor, info = torch.linalg.cholesky_ex(a + lam * eye)
    while int(info) != 0:  # rounding left it indefinite: damp ten times more until it is not
        lam = max(lam, step) * 10
        factor, info = torch.linalg.cholesky_ex(a + lam * eye)
    return torch.cholesky_solve(rhs, factor), lam


def refit_up(weight: torch.Tensor, down: torch.Tensor, cross: torch.Tensor, second_moment: torch.Tensor,
             damp: float = 1e-4) -> tuple[torch.Tensor, float]:
    """The least-squares ``up`` for a fixed ``down``: ``up = W X down^T (down C down^T)^-1``.

    It minimises ``E || W x_t - up down x ||^2`` over calibration tokens, where ``x`` is what the layer reads
    (``C = E[x x^T]``) and ``x_t`` what the dense model's layer read (``X = E[x_t x^T]``; ``X = C`` when the two are
    the same). Output rows decouple, so any row weighting gives the same ``up``.

    Args:
        weight: ``(out, in)``; down: ``(r, in)``; cross: ``X``, ``(in, in)``; second_moment: ``C``, ``(in, in)``.
        damp: the damping of a singular ``down C down^T``, relative to its mean diagonal.

    Returns:
        ``up`` ``(out, r)`` in float64, and the damping used (``0.0``: the system was regular).
    """
    w, d = weight.to(torch.float64), down.to(torch.float64)
    system = d @ second_moment.to(torch.float64) @ d.T
    rhs = d @ cross.to(torch.float64).T @ w.T  # (r, out) = (W X d^T)^T
    solution, lam = _damped_solve(system, rhs, damp)
    return solution.T.contiguous(), lam


def refit_down(weight: torch.Tensor, up: torch.Tensor, cross: torch.Tensor, second_moment: torch.Tensor,
               row_weight: torch.Tensor | None = None, damp: float = 1e-4) -> tuple[torch.Tensor, float]:
    """The least-squares ``down`` for a fixed ``up``: ``down = (up^T D up)^-1 up^T D W X C^-1``.

    The same objective as :func:`refit_up`, with output row ``i`` weighted by ``D_ii`` (``row_weight``; ``None``:
    equal weights), the weighting the method chose its subspace under.

    Returns:
        ``down`` ``(r, in)`` in float64, and the damping of the ``r x r`` system (``0.0``: it was regular); ``C`` is
        always damped by ``damp`` x its mean diagonal, as the whitening damps it.
    """
    w, u = weight.to(torch.float64), up.to(torch.float64)
    weighted = u if row_weight is None else u * row_weight.to(torch.float64)[:, None]
    left, lam = _damped_solve(weighted.T @ u, weighted.T @ w @ cross.to(torch.float64), damp)  # (r, in)
    # C^-1 left^T, C damped as the whitening damps it (its near-null directions carry no signal to fit)
    down_t, _ = _damped_solve(second_moment.to(torch.float64), left.T, damp, always=True)
    return down_t.T.contiguous(), lam


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


def output_error(weight: torch.Tensor, approx: torch.Tensor, second_moment: torch.Tensor) -> float:
    """``||(W - W') L|| / ||W L||`` with ``L L^T = C``: the relative output error over the calibration inputs."""
    c = second_moment.to(torch.float64)
    w = weight.detach().to(torch.float64)
    diff = w - approx.to(torch.float64)
    num = float(((diff @ c) * diff).sum())
    den = float(((w @ c) * w).sum())
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return max(num, 0.0) ** 0.5 / den ** 0.5


def low_rank_params(shape: tuple[int, int], rank: int) -> int:
    """Weight parameters of a rank-``rank`` factorisation of an ``(out, in)`` matrix."""
    out_features, in_features = shape
    return rank * (out_features + in_features)


def max_saving_rank(shape: tuple[int, int]) -> int:
    """Largest rank whose factorisation has fewer weight parameters than the dense matrix (0 if none)."""
    out_features, in_features = shape
    return (out_features * in_features - 1) // (out_features + in_features)
