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
