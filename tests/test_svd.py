"""The factorisation math on hand-built tensors."""

from __future__ import annotations

import pytest
import torch

from conftest import TOL
from fwsvd_deploy.compression.svd import decompose, low_rank_params, max_saving_rank, relative_error
from fwsvd_deploy.errors import FisherError

AXES = ("both", "output", "input")


def _w(m: int = 24, n: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=torch.float64)


def _axis_fisher(axis: str, m: int = 24, n: int = 16, seed: int = 1) -> torch.Tensor:
    """A Fisher that the axis models exactly: separable, row-constant or column-constant."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(m, generator=g, dtype=torch.float64) ** 4 + 1e-3
    cols = torch.rand(n, generator=g, dtype=torch.float64) ** 4 + 1e-3
    if axis == "output":
        cols = torch.ones(n, dtype=torch.float64)
    if axis == "input":
        rows = torch.ones(m, dtype=torch.float64)
    return rows[:, None] * cols[None, :]


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("rank", [1, 5, 12])
def test_uniform_fisher_is_plain_svd(axis, rank):
    w = _w()
    plain = decompose(w).reconstruct(rank)
    weighted = decompose(w, torch.full_like(w, 3.7), axis).reconstruct(rank)
    torch.testing.assert_close(weighted, plain, atol=TOL["identity"], rtol=0)


@pytest.mark.parametrize("axis", (None, *AXES))
def test_full_rank_rebuilds_weight(axis):
    w = _w()
    fisher = None if axis is None else _axis_fisher(axis) * torch.rand_like(w)
    d = decompose(w, fisher, axis)
    up, down = d.factors(d.max_rank)
    assert up.shape == (24, 16) and down.shape == (16, 16)
    torch.testing.assert_close((up @ down).double(), w, atol=TOL["identity"], rtol=0)


@pytest.mark.parametrize("axis", (None, *AXES))
def test_error_never_grows_with_rank(axis):
    w = _w()
    fisher = None if axis is None else _axis_fisher(axis)
    d = decompose(w, fisher, axis)
    errors = [relative_error(w, d.reconstruct(r), fisher) for r in range(1, d.max_rank + 1)]
    assert all(b <= a + 1e-12 for a, b in zip(errors[:-1], errors[1:], strict=True)), errors
    assert errors[-1] < TOL["identity"]


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("rank", [2, 6])
def test_fwsvd_beats_svd_in_fisher_norm_and_loses_in_plain_norm(axis, rank):
    w = _w()
    fisher = _axis_fisher(axis)
    svd = decompose(w).reconstruct(rank)
    fw = decompose(w, fisher, axis).reconstruct(rank)
    assert relative_error(w, fw, fisher) < relative_error(w, svd, fisher)
    assert relative_error(w, svd) < relative_error(w, fw)


def test_factor_shapes_follow_the_brief():
    w = _w(10, 6)
    f = _axis_fisher("both", 10, 6)
    d = decompose(w, f, "both")
    up, down = d.factors(3, dtype=torch.float64)
    a = f.sum(1).sqrt()
    b = f.sum(0).sqrt()
    u, s, vh = torch.linalg.svd(a[:, None] * w * b[None, :], full_matrices=False)
    torch.testing.assert_close(up, (u[:, :3] * s[:3]) / a[:, None])
    torch.testing.assert_close(down, vh[:3] / b[None, :])
    # input axis: up = U_r, down = U_r^T W
    d = decompose(w, f, "input")
    up, down = d.factors(3, dtype=torch.float64)
    u, _, _ = torch.linalg.svd(w * b[None, :], full_matrices=False)
    torch.testing.assert_close(up.abs(), u[:, :3].abs())
    torch.testing.assert_close(down, up.T @ w)


@pytest.mark.parametrize("axis", AXES)
def test_zero_importance_rows_and_columns_are_guarded(axis):
    w = _w()
    f = _axis_fisher("both")
    f[3] = 0.0
    f[:, 5] = 0.0
    up, down = decompose(w, f, axis).factors(4)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()


def test_all_zero_fisher_falls_back_to_svd():
    w = _w()
    torch.testing.assert_close(decompose(w, torch.zeros_like(w), "both").reconstruct(4), decompose(w).reconstruct(4))


def test_non_finite_fisher_is_rejected():
    w = _w()
    f = _axis_fisher("both")
    f[0, 0] = float("nan")
    with pytest.raises(FisherError, match="NaN or inf"):
        decompose(w, f, "both")


def test_deterministic():
    w, f = _w(), _axis_fisher("both")
    a = decompose(w, f, "both").factors(5)
    b = decompose(w, f, "both").factors(5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_shape_mismatch_and_bad_rank():
    with pytest.raises(ValueError, match="Fisher shape"):
        decompose(_w(), torch.ones(3, 3), "both")
    with pytest.raises(ValueError, match="rank"):
        decompose(_w()).factors(0)


@pytest.mark.parametrize("shape", [(384, 384), (1536, 384), (7, 3), (1, 1)])
def test_break_even_rank(shape):
    r = max_saving_rank(shape)
    m, n = shape
    assert low_rank_params(shape, r) < m * n or r == 0
    assert low_rank_params(shape, r + 1) >= m * n


# --- activation-aware methods -----------------------------------------------------------------------------------

from fwsvd_deploy.compression.svd import activation_scaled, output_error, whitened, whitening  # noqa: E402


def _inputs(tokens: int = 64, n: int = 16, seed: int = 2) -> torch.Tensor:
    """Correlated inputs with features of very different scales, as a layer sees them."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    scale = torch.logspace(-1, 1, n, dtype=torch.float64)
    return (torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix) * scale


def _moment(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize("power", [None, 0.5, 1.0])
@pytest.mark.parametrize("rank", [1, 4, 9])
def test_whitened_truncation_error_is_the_discarded_spectrum(power, rank):
    w, c = _w(), _moment(_inputs())
    fisher = None if power is None else _axis_fisher("both")
    d = whitened(w, c, 1e-4, fisher, power if power is not None else 0.5)
    m, _ = whitening(c, 1e-4)
    diff = w - d.reconstruct(rank)
    weighted = diff if d.row_scale is None else d.row_scale[:, None] * diff
    discarded = float(d.s[rank:].square().sum())
    assert abs(float(m.right(weighted).square().sum()) - discarded) <= TOL["identity"] * max(1.0, discarded)


@pytest.mark.parametrize("method", ["svd-llm", "fisher-whitened", "asvd"])
def test_full_rank_rebuilds_weight_for_every_method(method):
    w, x = _w(), _inputs()
    if method == "asvd":
        d = activation_scaled(w, x.abs().mean(0), 0.5)
    else:
        d = whitened(w, _moment(x), 1e-4, _axis_fisher("both") if method == "fisher-whitened" else None)
    torch.testing.assert_close(d.reconstruct(d.max_rank), w, atol=TOL["identity"], rtol=0)
    assert d.method == method


def test_whitening_minimises_the_output_error_on_its_inputs():
    w, c = _w(), _moment(_inputs())
    for rank in (2, 5, 10):
        plain = output_error(w, decompose(w).reconstruct(rank), c)
        white = output_error(w, whitened(w, c, 1e-9).reconstruct(rank), c)
        assert white <= plain + 1e-12


def test_singular_second_moment_factorises():
    """Fewer tokens than features: X^T X is rank 4 of 16; damping (or the eigen fallback) still inverts it."""
    w, x = _w(), _inputs(tokens=4)
    c = _moment(x)
    assert int(torch.linalg.matrix_rank(c)) == 4
    factor, lam = whitening(c, 1e-4)
    assert factor.kind == "tril" and lam > 0
    d = whitened(w, c, 1e-4)
    torch.testing.assert_close(d.reconstruct(d.max_rank), w, atol=TOL["identity"], rtol=0)
    # an indefinite moment (negative rounding noise beyond the damping) takes the eigen path
    bad = c - 1.0 * torch.eye(16, dtype=torch.float64) * float(c.diagonal().mean())
    factor, _ = whitening(bad, 1e-6)
    assert factor.kind == "eig"
    d = whitened(w, bad, 1e-6)
    up, down = d.factors(d.max_rank, dtype=torch.float64)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    torch.testing.assert_close(up @ down, w, atol=1e-6, rtol=0)


def test_uniform_statistics_reduce_to_plain_svd():
    w = _w()
    plain = decompose(w).reconstruct(5)
    torch.testing.assert_close(activation_scaled(w, torch.full((16,), 0.3), 0.5).reconstruct(5), plain,
                               atol=TOL["identity"], rtol=0)
    eye = torch.eye(16, dtype=torch.float64) * 2.0
    torch.testing.assert_close(whitened(w, eye, 1e-4).reconstruct(5), plain, atol=TOL["identity"], rtol=0)
    same = whitened(w, _moment(_inputs()), 1e-4)
    flat = whitened(w, _moment(_inputs()), 1e-4, torch.full_like(w, 0.7), power=1.0)
    torch.testing.assert_close(flat.reconstruct(5), same.reconstruct(5), atol=TOL["identity"], rtol=0)


def test_activation_statistics_that_do_not_fit_are_refused():
    with pytest.raises(FisherError, match="do not fit"):
        activation_scaled(_w(), torch.ones(5))
    with pytest.raises(FisherError, match="does not fit"):
        whitened(_w(), torch.eye(5, dtype=torch.float64))


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_fisher_whitened_gains_add_up_to_the_loss_estimate(power):
    """Each direction's gain is exact: the discarded gains sum to ||diag(a) (W - W_k) L||^2 / tr(C)."""
    from fwsvd_deploy.compression.factorize import UnitStats, allocation_gains
    from fwsvd_deploy.compression.svd import importance
    from fwsvd_deploy.config import CompressionConfig

    w, c, f = _w(), _moment(_inputs()), _axis_fisher("both") * torch.rand(24, 16, dtype=torch.float64)
    cfg = CompressionConfig(method="fisher-whitened", fisher_power=power, whitening_damp=1e-4)
    d = whitened(w, c, 1e-4, f, power)
    gains = allocation_gains(d, cfg, UnitStats(fisher=f, covariance=c))
    factor, _ = whitening(c, 1e-4)
    a = importance(f, dim=1, eps=cfg.eps)
    for rank in (2, 7):
        loss = float(factor.right(a[:, None] * (w - d.reconstruct(rank))).square().sum()) / float(c.trace())
        assert abs(float(gains[rank:].sum()) - loss) <= 1e-9 * max(loss, 1.0)


# --- the SVD itself ----------------------------------------------------------------------------------------------

from fwsvd_deploy.compression.svd import GRAM_MIN_SIDE, GRAM_RTOL, thin_svd  # noqa: E402


def _spectrum_matrix(m: int, n: int, smallest: float, seed: int = 3) -> torch.Tensor:
    """A random ``(m, n)`` matrix with singular values spread log-uniformly from 1 down to ``smallest``."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return (u * torch.logspace(0, torch.log10(torch.tensor(smallest)).item(), k, dtype=torch.float64)) @ v.T


def _projector(vh: torch.Tensor, k: int) -> torch.Tensor:
    return vh[:k].T @ vh[:k]


@pytest.mark.parametrize("shape", [(320, GRAM_MIN_SIDE), (GRAM_MIN_SIDE, 320), (200, 200)])
@pytest.mark.parametrize("smallest", [1e-2, 1e-6])
def test_gram_svd_matches_lapack(shape, smallest):
    z = _spectrum_matrix(*shape, smallest)
    u, s, vh = thin_svd(z)
    u0, s0, vh0 = torch.linalg.svd(z, full_matrices=False)
    assert u.shape == u0.shape and s.shape == s0.shape and vh.shape == vh0.shape
    # an eigenvalue of the Gram matrix is exact to ~n eps s_max^2, so s_j to ~n eps s_max^2 / s_j
    bound = 10 * max(shape) * torch.finfo(torch.float64).eps * float(s0[0]) ** 2 / s0
    assert bool(((s - s0).abs() <= bound).all())
    assert float((s - s0).abs().max()) <= 1e-9 * float(s0[0])
    torch.testing.assert_close((u * s) @ vh, z, atol=TOL["identity"], rtol=0)
    for k in (1, min(shape) // 4, max_saving_rank(shape)):
        # the subspace a truncation at k keeps (the spectrum has no repeated values, so it is unique)
        torch.testing.assert_close(_projector(vh, k), _projector(vh0, k), atol=1e-8, rtol=0)
        torch.testing.assert_close(u[:, :k] * s[:k] @ vh[:k], u0[:, :k] * s0[:k] @ vh0[:k], atol=1e-8, rtol=0)
    # the side from the eigendecomposition is orthonormal; the side from Z V / s, over the directions kept
    eigen, derived = (vh.T, u) if shape[0] >= shape[1] else (u, vh.T)
    k = max_saving_rank(shape)
    torch.testing.assert_close(eigen.T @ eigen, torch.eye(len(s), dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(derived[:, :k].T @ derived[:, :k], torch.eye(k, dtype=torch.float64), atol=1e-8, rtol=0)


@pytest.mark.parametrize(
    "z", [_spectrum_matrix(GRAM_MIN_SIDE - 1, 300, 1e-2), _spectrum_matrix(300, 200, 1e-2).float()],
    ids=["below-size-floor", "float32"])
def test_small_or_float32_matrices_take_lapack(z):
    u, s, vh = thin_svd(z)
    u0, s0, vh0 = torch.linalg.svd(z, full_matrices=False)
    assert torch.equal(s, s0) and torch.equal(u, u0) and torch.equal(vh, vh0)


@pytest.mark.parametrize("shape", [(300, GRAM_MIN_SIDE), (GRAM_MIN_SIDE, 300)])
@pytest.mark.parametrize("case", ["rank-deficient", "past-gram-rtol"])
def test_singular_and_ill_conditioned_matrices_stay_exact(shape, case):
    """Whichever way it is computed: finite, rebuilds Z, and keeps LAPACK's leading subspace."""
    z = _spectrum_matrix(*shape, GRAM_RTOL / 100)
    if case == "rank-deficient":
        z = _spectrum_matrix(*shape, 1e-2)
        z[:, :3] = 0.0 if shape[0] >= shape[1] else z[:, :3]
        z[:3] = z[:3] if shape[0] >= shape[1] else 0.0
    u, s, vh = thin_svd(z)
    assert all(bool(torch.isfinite(t).all()) for t in (u, s, vh))
    torch.testing.assert_close((u * s) @ vh, z, atol=TOL["identity"], rtol=0)
    _, s0, vh0 = torch.linalg.svd(z, full_matrices=False)
    k = max_saving_rank(shape)
    torch.testing.assert_close(s[:k], s0[:k], atol=1e-9, rtol=0)
    torch.testing.assert_close(_projector(vh, k), _projector(vh0, k), atol=1e-8, rtol=0)


@pytest.mark.parametrize("power", [None, 0.5])
def test_whitened_truncation_identity_holds_on_the_gram_path(power):
    """The discarded-spectrum identity on a weight large enough for the Gram eigendecomposition."""
    m, n = 256, GRAM_MIN_SIDE + 32
    w = _w(m, n, seed=4)
    c = _moment(_inputs(tokens=4 * n, n=n, seed=5))
    fisher = None if power is None else _axis_fisher("both", m, n)
    d = whitened(w, c, 1e-4, fisher, power if power is not None else 0.5)
    m_factor, _ = whitening(c, 1e-4)
    for rank in (1, 40, max_saving_rank((m, n))):
        diff = w - d.reconstruct(rank)
        weighted = diff if d.row_scale is None else d.row_scale[:, None] * diff
        discarded = float(d.s[rank:].square().sum())
        assert abs(float(m_factor.right(weighted).square().sum()) - discarded) <= TOL["identity"] * max(1.0, discarded)
    torch.testing.assert_close(d.reconstruct(d.max_rank), w, atol=TOL["identity"], rtol=0)
