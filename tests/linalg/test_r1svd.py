import pytest
import torch

from lopro.linalg import LowRank, lowrank, r1svd, svd_lowrank_exact


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _decaying(m=160, n=120, decay=None, seed=0):
    """``Q1 diag(s) Q2^T`` with a power-law spectrum ``s_i = 1 / (i + 1)``."""
    g = _gen(seed)
    q1, _ = torch.linalg.qr(torch.randn(m, n, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    s = decay if decay is not None else 1.0 / (torch.arange(n, dtype=torch.float32) + 1)
    return (q1 * s) @ q2.T


def _err(a, lr):
    return torch.linalg.norm(a - lr.dense()).item()


def test_error_decreases_toward_truncated_svd():
    a = _decaying()
    r = 12
    ref = _err(a, svd_lowrank_exact(a, r))
    s = torch.linalg.svdvals(a)
    assert ref == pytest.approx(s[r:].norm().item(), rel=1e-4)
    ratios = [_err(a, r1svd(a, r, iters=it)) / ref for it in (0, 1, 2, 4, 8)]
    assert all(later <= earlier * 1.002 for earlier, later in zip(ratios, ratios[1:])), ratios
    assert ratios[0] > 1.1  # a bare sketch is far from optimal ...
    assert ratios[2] < 1.03  # ... two power iterations are within 3% of the truncated SVD
    assert ratios[-1] < 1.005


@pytest.mark.parametrize("storage", ["fp32", "fp16", "fp8"])
def test_residual_matches_stored_factors(storage):
    a = _decaying(seed=1)
    lr, res = r1svd(a, 10, storage=storage, return_residual=True)
    assert res.dtype == torch.float32 and res.shape == a.shape
    torch.testing.assert_close(a - lr.dense(), res, atol=1e-6, rtol=0)


def test_deflation_uses_rounded_factors():
    # A has rank 3. Deflating by the exact (unrounded) terms would leave nothing for the later
    # terms; deflating by the fp8-rounded terms lets them absorb the rounding error.
    g = _gen(2)
    a = torch.randn(96, 3, generator=g) @ torch.randn(3, 80, generator=g)
    lr3 = r1svd(a, 3, iters=6, storage="fp8")
    lr9 = r1svd(a, 9, iters=6, storage="fp8")
    assert _err(a, lr9) < 0.1 * _err(a, lr3)
    # the first terms do not depend on the requested rank ...
    assert torch.equal(lr9.U[:, :3].float(), lr3.U.float())
    assert torch.equal(lr9.S[:3], lr3.S)
    # ... and term 4 is the top singular triple of the residual left by the *stored* terms
    top = torch.linalg.svdvals(a - lr3.dense())[0].item()
    term4 = (lr9.U[:, 3].float().norm() * lr9.S[3].float() * lr9.V[3].float().norm()).item()
    assert term4 == pytest.approx(top, rel=0.05)


def test_storage_dtypes():
    a = _decaying(seed=3)
    expected = {"fp32": (torch.float32, torch.float32), "fp16": (torch.float16, torch.float16),
                "fp8": (torch.float8_e4m3fn, torch.float16)}
    for storage, (vec, sig) in expected.items():
        for lr in (r1svd(a, 4, storage=storage), svd_lowrank_exact(a, 4, storage=storage)):
            assert (lr.U.dtype, lr.V.dtype, lr.S.dtype) == (vec, vec, sig)
            assert lr.storage == storage and lr.rank == 4
            assert lr.U.shape == (160, 4) and lr.V.shape == (4, 120) and lr.S.shape == (4,)


@pytest.mark.parametrize("sigma", [1e-4, 1e-2, 1.0, 50.0, 1e5])
def test_fp8_unit_vectors_of_length_4096(sigma):
    g = _gen(4)
    u = torch.randn(4096, generator=g)
    v = torch.randn(48, generator=g)
    a = sigma * torch.outer(u / u.norm(), v / v.norm())
    for lr in (r1svd(a, 1, storage="fp8"), svd_lowrank_exact(a, 1, storage="fp8")):
        assert torch.isfinite(lr.S.float()).all() and lr.S.float().abs().min() > 0
        if sigma >= 1e-2:  # the folded scale keeps S a normal fp16 number
            assert lr.S.float().abs().min() >= 2**-14
        stored = lr.U.float().abs()
        assert (stored >= 2**-6).float().mean() > 0.85  # not collapsed into fp8 subnormals
        assert stored.max() <= 448
        assert _err(a, lr) / a.norm().item() < 0.06  # e4m3: 3 mantissa bits


def test_fp8_and_fp16_errors_bounded():
    a = _decaying(seed=5, decay=0.7 ** torch.arange(120, dtype=torch.float32))
    for solver in ("svd", "r1svd"):
        exact = lowrank(a, 8, solver=solver).dense()
        for storage, tol in (("fp16", 2e-3), ("fp8", 0.06)):
            rel = (lowrank(a, 8, solver=solver, storage=storage).dense() - exact).norm()
            assert rel / exact.norm() < tol, (solver, storage, rel)


def test_deterministic_seed():
    a = _decaying(seed=6)
    x, y = r1svd(a, 5, seed=3, storage="fp8"), r1svd(a, 5, seed=3, storage="fp8")
    assert all(torch.equal(p.float(), q.float()) for p, q in ((x.U, y.U), (x.S, y.S), (x.V, y.V)))
    z = r1svd(a, 5, seed=4, iters=0)
    assert not torch.equal(z.U, r1svd(a, 5, seed=3, iters=0).U)


def test_rank_zero():
    a = _decaying(seed=7)
    for storage in ("fp32", "fp8"):
        lr, res = r1svd(a, 0, storage=storage, return_residual=True)
        assert lr.rank == 0 and lr.U.shape == (160, 0) and lr.V.shape == (0, 120)
        assert torch.equal(lr.dense(), torch.zeros_like(a))
        assert torch.equal(res, a)
        assert svd_lowrank_exact(a, 0, storage=storage).rank == 0


def test_batched_and_dtypes():
    g = _gen(8)
    a = torch.randn(2, 3, 24, 20, generator=g)
    lr, res = r1svd(a, 4, iters=4, return_residual=True)
    assert lr.U.shape == (2, 3, 24, 4) and lr.S.shape == (2, 3, 4) and lr.V.shape == (2, 3, 4, 20)
    assert lr.shape == (2, 3, 24, 20)
    torch.testing.assert_close(a - lr.dense(), res, atol=1e-6, rtol=0)
    exact = svd_lowrank_exact(a, 4)
    for i, j in ((0, 0), (1, 2)):
        ref = svd_lowrank_exact(a[i, j], 4)
        torch.testing.assert_close(exact.dense()[i, j], ref.dense(), atol=1e-5, rtol=0)
        assert _err(a[i, j], LowRank(lr.U[i, j], lr.S[i, j], lr.V[i, j])) < 1.05 * _err(a[i, j], ref)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        out = r1svd(a[0, 0].to(dtype), 3)
        assert out.U.dtype == torch.float32
        assert out.dense(dtype).dtype == dtype


def test_zero_matrix_has_no_nans():
    for storage in ("fp32", "fp8"):
        lr = r1svd(torch.zeros(10, 8), 3, storage=storage)
        assert torch.equal(lr.dense(), torch.zeros(10, 8))


def test_lowrank_dispatch():
    a = _decaying(seed=9)
    torch.testing.assert_close(lowrank(a, 5, solver="svd").dense(), svd_lowrank_exact(a, 5).dense())
    torch.testing.assert_close(lowrank(a, 5, iters=3, seed=2, storage="fp16").dense(),
                               r1svd(a, 5, iters=3, seed=2, storage="fp16").dense())
    with pytest.raises(ValueError, match="solver"):
        lowrank(a, 5, solver="qr")


@pytest.mark.parametrize(
    "kwargs",
    [dict(rank=121), dict(rank=-1), dict(rank=2.0), dict(rank=2, storage="int4"),
     dict(rank=2, iters=-1)],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        r1svd(_decaying(seed=10), **kwargs)


def test_invalid_inputs():
    with pytest.raises(ValueError):
        r1svd(torch.ones(5), 1)
    with pytest.raises(ValueError):
        r1svd(torch.ones(4, 4, dtype=torch.int32), 1)
    bad = torch.ones(6, 5)
    bad[2, 3] = float("nan")
    for fn in (r1svd, svd_lowrank_exact):
        with pytest.raises(ValueError, match="NaN"):
            fn(bad, 2)
    with pytest.raises(ValueError, match="shapes"):
        LowRank(torch.zeros(4, 2), torch.zeros(3), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="storage"):
        LowRank(torch.zeros(4, 2), torch.zeros(2), torch.zeros(2, 5), storage="bf16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    a = _decaying(seed=11)
    for storage in ("fp32", "fp8"):
        cpu = r1svd(a, 6, storage=storage)
        gpu = r1svd(a.cuda(), 6, storage=storage)
        assert gpu.U.device.type == "cuda"
        torch.testing.assert_close(gpu.dense().cpu(), cpu.dense(), atol=1e-3, rtol=1e-2)
