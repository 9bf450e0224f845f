import pytest
import torch

from conftest import random_hessian
from lopro.quant.gptq import gptq_quantize
from lopro.quant.grid import Grid, find_params, quantize
from lopro.quant.hessian import HessianError, inverse_cholesky, upper_inverse_factor_
from lopro.quant.rtn import rtn_quantize


def obs_reference(W, H, bits, group_size, damp=0.01):
    """Slow, obviously correct GPTQ: per-column OBS updates with the explicit inverse Hessian (fp64)."""
    W, H = W.double().clone(), H.double().clone()
    n = W.shape[1]
    H += damp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    grid = Grid(bits)
    Q = torch.zeros_like(W)
    for j in range(n):
        if j % group_size == 0:
            s, z = find_params(W[:, j:j + group_size], grid)
            s, z = s.double(), z.double()
        q = s * (quantize(W[:, j], s, z, grid.maxq) - z)
        Q[:, j] = q
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]  # optimal update of the remaining weights
        Hinv -= Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]  # eliminate column j
    return Q


@pytest.mark.parametrize("group_size", [16, 48])
def test_gptq_matches_obs_reference(group_size):
    torch.manual_seed(0)
    W = torch.randn(12, 48)
    H = random_hessian(48)
    ref = obs_reference(W, H, 3, group_size)
    got = gptq_quantize(W.double().float(), H, 3, group_size, blocksize=16).dequantize()
    close = (got.double() - ref).abs() < 1e-3
    assert close.float().mean() > 0.98  # a rounding tie may flip a few codes, then errors propagate
    assert torch.allclose(got.double()[:, :8], ref[:, :8], atol=1e-4)


def loss(W, W_hat, H):
    d = W_hat - W
    return torch.sum((d @ H) * d).item()


@pytest.mark.parametrize("bits,gs", [(2, 32), (3, 32), (4, -1)])
def test_gptq_beats_rtn_on_proxy_loss(bits, gs):
    torch.manual_seed(1)
    W = torch.randn(32, 96)
    H = random_hessian(96, seed=1)
    g = gptq_quantize(W, H, bits, gs).dequantize()
    r = rtn_quantize(W, bits, gs).dequantize()
    assert loss(W, g, H) < 0.9 * loss(W, r, H)


def test_act_order_and_odd_group_sizes_round_trip():
    torch.manual_seed(2)
    W = torch.randn(8, 50)
    H = random_hessian(50, seed=2)
    q = gptq_quantize(W, H, 4, 16, act_order=True, blocksize=7)
    assert q.num_groups == 4 and q.g_idx.shape == (50,)
    assert torch.bincount(q.g_idx).tolist() == [16, 16, 16, 2]
    assert loss(W, q.dequantize(), H) < loss(W, rtn_quantize(W, 4, 16).dequantize(), H)


def test_dead_columns_are_zeroed():
    torch.manual_seed(3)
    W = torch.randn(4, 20)
    H = random_hessian(20)
    H[5, :] = 0
    H[:, 5] = 0
    q = gptq_quantize(W, H, 4, -1)
    assert torch.isfinite(q.dequantize()).all()
    assert q.dequantize()[:, 5].abs().max() <= q.scale.max()  # zero lands on the grid point nearest 0


def test_cholesky_retries_with_more_damping(caplog):
    n = 16
    v = torch.randn(n, 1, generator=torch.Generator().manual_seed(0))
    H = v @ v.T
    H -= 0.05 * torch.diag(H).mean() * torch.eye(n)  # eigenvalues at -5% of the mean diagonal: 1% fails, 10% works
    with caplog.at_level("WARNING"):
        U = inverse_cholesky(H, 0.01)
    assert torch.isfinite(U).all()
    assert any("damp" in r.message for r in caplog.records)


def test_non_finite_hessian_is_refused():
    H = random_hessian(8)
    H[0, 0] = float("nan")
    with pytest.raises(HessianError, match="NaN"):
        gptq_quantize(torch.randn(4, 8), H, 4, -1)


def _plain_inverse_cholesky(H, damp, dtype=torch.float64):
    """GPTQ's reference route: cholesky, cholesky_inverse, cholesky again (LAPACK's, in `dtype`)."""
    A = H.to(dtype, copy=True)
    A.diagonal().add_(damp * torch.diag(A).mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(A)), upper=True)


@pytest.mark.parametrize("n", [1, 255, 300, 700])  # blocks of 256 that do not divide n; 700: transpose tiles too
def test_inverse_cholesky_is_the_factor_of_the_inverse_in_one_buffer(n):
    """Blocked factor == the reference route as closely as LAPACK's own fp32 route is, in the caller's scratch
    copy, any layout."""
    H = random_hessian(n, tokens=2 * n + 8, seed=n)
    want, lapack = _plain_inverse_cholesky(H, 0.01), _plain_inverse_cholesky(H, 0.01, torch.float32)
    got = inverse_cholesky(H, 0.01)
    assert got.dtype == torch.float32 and torch.equal(got, got.triu())
    assert (got.double() - want).norm() <= 2 * (lapack.double() - want).norm() + 1e-7 * want.norm()
    for scratch in (H.clone(), H.clone().T.contiguous().T):  # row- or column-major copies
        again = inverse_cholesky(scratch, 0.01, refill=H.clone)
        assert torch.equal(again, got) and again.is_contiguous() and again.data_ptr() == scratch.data_ptr()


@pytest.mark.parametrize("n", [300, 700])
def test_inverse_cholesky_bits_do_not_depend_on_the_thread_count(n):
    H = random_hessian(n, tokens=2 * n + 8, seed=n)
    before = torch.get_num_threads()
    try:
        got = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            got.append(inverse_cholesky(H, 0.01))
            assert torch.get_num_threads() == threads  # the one-thread LAPACK calls gave the count back
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])


def test_upper_inverse_factor_reads_only_the_upper_triangle():
    H = random_hessian(600, tokens=1300, seed=4)
    a = H.clone()
    b = torch.triu(H) + torch.tril(torch.full_like(H, float("nan")), -1)
    assert upper_inverse_factor_(a) and upper_inverse_factor_(b)
    assert torch.equal(a, b)


def test_upper_inverse_factor_refuses_an_indefinite_matrix():
    A = torch.eye(300)
    A[290, 290] = -1.0  # in the last block, the first one factored
    assert not upper_inverse_factor_(A.clone())
    A = torch.eye(300)
    A[3, 3] = -1.0  # in the first block, reached last
    assert not upper_inverse_factor_(A.clone())


def test_scratch_hessian_is_refilled_for_a_retry(caplog):
    n = 16
    v = torch.randn(n, 1, generator=torch.Generator().manual_seed(0))
    H = v @ v.T
    H -= 0.05 * torch.diag(H).mean() * torch.eye(n)  # 1% damping fails, 10% works
    calls = []

    def refill():
        calls.append(1)
        return H.clone()

    with caplog.at_level("WARNING"):
        got = inverse_cholesky(H.clone(), 0.01, refill=refill)
    assert calls and torch.equal(got, inverse_cholesky(H, 0.01))
    W = torch.randn(8, n, generator=torch.Generator().manual_seed(1))
    a, b = gptq_quantize(W, H, 3, 8), gptq_quantize(W, H.clone(), 3, 8, refill=H.clone)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


def test_dequantize_in_column_slabs_has_the_whole_bits():
    W = torch.randn(40, 300, generator=torch.Generator().manual_seed(2))
    q = gptq_quantize(W, random_hessian(300, seed=3), 3, 64, act_order=True)  # g_idx not in column order
    idx = q.g_idx
    whole = q.scale[:, idx] * (q.codes.float() - q.zero[:, idx])
    assert torch.equal(q.dequantize(cols=7), whole) and torch.equal(q.dequantize(), whole)
