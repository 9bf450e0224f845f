"""GPTVQ solver: k-means, layout / bit accounting, decoding, error feedback, baselines."""
import itertools

import pytest
import torch

from lopro.quant.loss import layer_loss
from lopro.quant.gptvq import (VQConfig, VQLayout, gptvq_quantize, kmeans, kmeans_objective,
                               quantize_codebooks, rtn_vq, vq_decode)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The solver runs many small ops; on 2 shared cores, thread hand-offs dominate them."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _correlated_hessian(n, tokens=1024, seed=0, dead=()):
    g = _gen(seed)
    mix = torch.eye(n) + 2 * torch.randn(n, n, generator=g) / n ** 0.5
    X = (torch.randn(tokens, n, generator=g) @ mix) * (0.2 + 3 * torch.rand(n, generator=g))
    X[:, list(dead)] = 0.0
    return 2 * X.T @ X / tokens


def _brute_dist(X, C, w):
    """[N, k] weighted squared distances in float64."""
    return (w.double()[:, None, :] * (X.double()[:, None, :] - C.double()[None]) ** 2).sum(-1)


# ----------------------------------------------------------------------------------- k-means

@pytest.mark.parametrize("d", [1, 2, 3])
def test_kmeans_assignment_is_weighted_nearest_centroid(d):
    g = _gen(1)
    X = torch.randn(300, d, generator=g)
    w = torch.rand(300, d, generator=g) + 0.1
    C, a = kmeans(X, 8, weights=w, iters=7, seed=3)
    dist = _brute_dist(X, C, w)
    picked = dist.gather(1, a[:, None])[:, 0]
    assert torch.allclose(picked, dist.min(1).values, rtol=1e-5, atol=1e-6)
    assert (a == dist.argmin(1)).float().mean() > 0.99  # differ only at float near-ties


def test_kmeans_batched_matches_unbatched():
    g = _gen(2)
    X = torch.randn(3, 200, 2, generator=g)
    w = torch.rand(3, 200, 2, generator=g)
    C, a = kmeans(X, 4, weights=w, iters=5, seed=0)
    assert C.shape == (3, 4, 2) and a.shape == (3, 200)
    dist = torch.stack([_brute_dist(X[b], C[b], w[b]) for b in range(3)])
    assert torch.allclose(dist.gather(2, a[..., None])[..., 0], dist.min(2).values, rtol=1e-5, atol=1e-6)


def test_kmeans_objective_monotone_and_beats_random_centroids():
    g = _gen(3)
    X = torch.cat([torch.randn(100, 2, generator=g) * 0.3 + c for c in (-3.0, 0.0, 3.0)])
    X[:, 1] *= 2
    w = torch.rand(300, 2, generator=g) + 0.5
    hist = []
    C, a = kmeans(X, 16, weights=w, iters=30, seed=0, history=hist)
    objs = torch.stack(hist)
    assert (objs[1:] <= objs[:-1] * (1 + 1e-6)).all()
    best = kmeans_objective(X, C, a, w)
    for s in range(5):
        Cr = X[torch.randperm(300, generator=_gen(s))[:16]]
        ar = _brute_dist(X, Cr, w).argmin(1)
        assert best < kmeans_objective(X, Cr, ar, w)
        Cg = torch.randn(16, 2, generator=_gen(s))
        assert best < kmeans_objective(X, Cg, _brute_dist(X, Cg, w).argmin(1), w)


def test_kmeans_reaches_bruteforce_optimum_in_1d():
    # In 1-D an optimal weighted clustering is a partition of the sorted points into runs,
    # so the global optimum of 16 points into 4 clusters is found by trying all C(15, 3) cuts.
    g = _gen(4)
    x = torch.sort(torch.randn(16, generator=g, dtype=torch.float64) * torch.tensor(2.0)).values
    w = torch.rand(16, generator=g, dtype=torch.float64) + 0.2
    best = float("inf")
    for cuts in itertools.combinations(range(1, 16), 3):
        b = (0,) + cuts + (16,)
        obj = 0.0
        for lo, hi in zip(b[:-1], b[1:]):
            c = (w[lo:hi] * x[lo:hi]).sum() / w[lo:hi].sum()
            obj += float((w[lo:hi] * (x[lo:hi] - c) ** 2).sum())
        best = min(best, obj)
    X = x[:, None].float()
    found = []
    for seed in range(10):
        C, a = kmeans(X, 4, weights=w.float(), iters=50, seed=seed)
        found.append(float(kmeans_objective(X, C, a, w.float())))
    assert min(found) == pytest.approx(best, rel=1e-4)
    assert max(found) < 2 * best


def test_kmeans_zero_weight_points_are_ignored_and_seeded():
    g = _gen(5)
    X = torch.randn(200, 2, generator=g)
    w = torch.ones(200, 2)
    w[100:] = 0.0
    C1, a1 = kmeans(X, 4, weights=w, iters=10, seed=7)
    X2 = X.clone()
    X2[100:] = 1e6  # far outliers with zero weight must change nothing
    C2, a2 = kmeans(X2, 4, weights=w, iters=10, seed=7)
    assert torch.equal(C1, C2) and torch.equal(a1[:100], a2[:100])
    C3, _ = kmeans(X, 4, weights=w, iters=10, seed=7)
    assert torch.equal(C1, C3)


def test_quantize_codebooks_roundtrip_is_exact():
    C = torch.randn(5, 16, 2, generator=_gen(6))
    C[2] = 0.0
    Cq, s, Cf = quantize_codebooks(C)
    assert Cq.dtype == torch.int8 and s.dtype == torch.float16
    assert torch.equal(Cq.float() * s.float()[:, None, None], Cf)
    assert (Cf - C).abs().max() <= s.float().max() / 2 + 1e-6


# ------------------------------------------------------------------------- layout and bits

def test_for_bits_paper_defaults():
    assert VQConfig.for_bits(2).group_size == 2048 and VQConfig.for_bits(2).k == 16
    assert VQConfig.for_bits(3).group_size == 8192 and VQConfig.for_bits(3).k == 64
    assert VQConfig.for_bits(2, width=576).columns_per_group == 256
    assert VQConfig.for_bits(2, width=128).columns_per_group == 128
    assert VQConfig().group_size == 2048 and VQConfig().dim == 2


@pytest.mark.parametrize("bits,expected", [(2, 2.125), (3, 3.125)])
def test_effective_bits_paper_defaults_on_4096(bits, expected):
    cfg = VQConfig.for_bits(bits, width=4096)
    lay = VQLayout.make(4096, 4096, cfg)
    assert lay.num_col_groups == 16
    assert lay.effective_bits(bits) == pytest.approx(expected)
    assert lay.effective_bits(bits, include_scales=True) == pytest.approx(expected + 16 / cfg.group_size)


@pytest.mark.parametrize("m", [576, 192, 1536])
def test_layout_adapts_to_width_576(m):
    cfg = VQConfig.for_bits(2, width=576)
    lay = VQLayout.make(m, 576, cfg)
    assert lay.col_bounds == (0, 288, 576)  # two even groups, not 256 + 256 + 64
    sizes = [(c1 - c0) * (r1 - r0) for c0, c1 in zip(lay.col_bounds[:-1], lay.col_bounds[1:])
             for r0, r1 in zip(lay.row_bounds[:-1], lay.row_bounds[1:])]
    assert min(sizes) >= 0.8 * 2048 and max(sizes) <= 1.25 * 2048
    assert lay.effective_bits(2) == pytest.approx(2.125, abs=0.005)
    ids = lay.codebook_map()
    assert ids.shape == (m, 288) and ids.unique().numel() == lay.num_codebooks


def test_effective_bits_reported_from_stored_tensors_on_576():
    W = torch.randn(192, 576, generator=_gen(7))
    cfg = VQConfig.for_bits(2, width=576, kmeans_iters=3, refine_iters=0)
    res = rtn_vq(W, cfg)
    ncb = res.codebooks.shape[0]
    counted = (res.indices.numel() * 2 * 2 + res.codebooks.numel() * 8) / W.numel()
    assert res.effective_bits() == pytest.approx(counted)
    assert res.effective_bits() == pytest.approx(res.layout.effective_bits(2))
    assert res.effective_bits(include_scales=True) == pytest.approx(counted + 16 * ncb / W.numel())
    assert res.effective_bits() == pytest.approx(2.125)


# ----------------------------------------------------------------------------------- solver

SMALL = dict(group_size=512, columns_per_group=64, kmeans_iters=10)


@pytest.mark.parametrize("bits", [2, 3])
def test_gptvq_beats_rtn_vq_on_correlated_hessian(bits):
    W = torch.randn(64, 256, generator=_gen(8))
    H = _correlated_hessian(256)
    cfg = VQConfig(bits=bits, **SMALL)
    res = gptvq_quantize(W, H, cfg)
    base = rtn_vq(W, cfg)
    loss, base_loss = layer_loss(W, res.weight, H), layer_loss(W, base.weight, H)
    assert loss == pytest.approx(res.stats["loss"], rel=1e-4)
    assert loss < 0.8 * base_loss
    assert res.stats["loss"] <= res.stats["loss_before_refine"]


def test_error_feedback_matches_damped_loss():
    # GPTQ identity: W0 - Q = E U, U H_damped U^T = I  =>  tr(dW H_d dW^T) = sum ||err||^2.
    W = torch.randn(24, 97, generator=_gen(9))  # odd width: the last vector is padded
    H = _correlated_hessian(97, seed=1)
    cfg = VQConfig(bits=2, refine_iters=0, damp_percent=0.05, **SMALL)
    res = gptvq_quantize(W, H, cfg)
    Hd = H + 0.05 * torch.diag(H).mean() * torch.eye(97)
    assert layer_loss(W, res.weight, Hd) == pytest.approx(res.stats["feedback_loss"], rel=1e-3)


def test_diag_metric_also_works():
    # "block" (exact d x d GPTQ loss) and "diag" (weighted Euclidean) assignment: on small
    # problems either can win by a few percent; at the paper's group sizes "block" is ~1% better.
    W = torch.randn(32, 128, generator=_gen(10))
    H = _correlated_hessian(128, seed=2)
    cfg = VQConfig(refine_iters=0, assign_metric="diag", **SMALL)
    diag = gptvq_quantize(W, H, cfg)
    assert torch.equal(diag.decode(), diag.weight)
    assert diag.stats["loss"] < 0.8 * layer_loss(W, rtn_vq(W, cfg).weight, H)


@pytest.mark.parametrize("solver", ["gptvq", "rtn"])
def test_decode_reproduces_weight_exactly(solver):
    W = torch.randn(40, 150, generator=_gen(11))
    cfg = VQConfig(bits=3, **SMALL)
    res = gptvq_quantize(W, _correlated_hessian(150), cfg) if solver == "gptvq" else rtn_vq(W, cfg)
    assert res.indices.dtype == torch.uint8 and res.codebooks.dtype == torch.int8
    assert res.codebook_scale.dtype == torch.float16
    assert res.indices.shape == (40, 75) and res.codebooks.shape[1:] == (64, 2)
    out = vq_decode(res.indices, res.codebooks, res.codebook_scale, res.layout)
    assert torch.equal(out, res.weight) and torch.equal(res.decode(), res.weight)


def test_deterministic_with_seed():
    W = torch.randn(32, 128, generator=_gen(12))
    H = _correlated_hessian(128)
    a = gptvq_quantize(W, H, VQConfig(seed=5, **SMALL))
    b = gptvq_quantize(W, H, VQConfig(seed=5, **SMALL))
    c = gptvq_quantize(W, H, VQConfig(seed=6, **SMALL))
    assert a.seed == 5 and c.seed == 6
    assert torch.equal(a.weight, b.weight) and torch.equal(a.indices, b.indices)
    assert torch.equal(a.codebooks, b.codebooks)
    assert not torch.equal(a.codebooks, c.codebooks)


@pytest.mark.parametrize("n,dim", [(101, 2), (70, 3), (33, 1)])
def test_dead_columns_and_ragged_widths(n, dim):
    dead = (0, 5, n - 1)
    W = torch.randn(20, n, generator=_gen(13))
    H = _correlated_hessian(n, dead=dead)
    cfg = VQConfig(bits=2, dim=dim, group_size=256, columns_per_group=48, kmeans_iters=5)
    res = gptvq_quantize(W, H, cfg)
    assert res.weight.shape == (20, n) and torch.isfinite(res.weight).all()
    assert res.layout.n_pad % dim == 0 and res.layout.n_pad - n < dim
    assert torch.equal(res.decode(), res.weight)
    live = [j for j in range(n) if j not in dead]
    loss = layer_loss(W[:, live], res.weight[:, live], H[live][:, live])
    assert loss == pytest.approx(layer_loss(W, res.weight, H), rel=1e-5)  # dead columns cost nothing
    assert loss < layer_loss(W, rtn_vq(W, cfg).weight, H)


def test_config_validation():
    with pytest.raises(ValueError, match="bits must be one of"):
        VQConfig(bits=5)
    with pytest.raises(ValueError, match="assign_metric"):
        VQConfig(assign_metric="nope")
    with pytest.raises(ValueError, match="too big"):
        VQConfig(bits=4, dim=4)
