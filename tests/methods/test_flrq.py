import math

import pytest
import torch

from lopro.config import QuantConfig
from lopro.linalg import r1svd
from lopro.linalg.flr import flexible_rank, precision_gain, size_growth
from lopro.methods import get_method
from lopro.methods.base import LayerStats
from lopro.methods.flrq import allocate_ranks, quantize_clipped, rank_cap
from lopro.quant.loss import layer_loss


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _blocks():
    """Three exact rank-1 blocks (entries 4.2, -2, 1) and a 6x6 noise block of amax < 0.5 on the diagonal.

    Removing block i leaves amax = the next block's entry, so the amax curve is 4.2, 2, 1, ~0.49, and
    the cumulative gain log2(w0 / w_r) = 1.07, 2.07, 3.07 bits stays just above the cost of r terms at
    32 x 32 with fp16 factors (f (m + n) / (m n) = 1 bit per term) until the noise terms.
    """
    A = torch.zeros(32, 32)
    A[0:12, 0:12] = 4.2
    A[12:20, 12:20] = -2.0
    A[20:26, 20:26] = 1.0
    A[26:32, 26:32] = torch.rand(6, 6, generator=_gen(1)) - 0.5
    return A


def _orthogonal(n, seed=0):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=_gen(seed)))
    return q


def _geometric(n=256, seed=0):
    return (_orthogonal(n, seed) * 2.0 ** -torch.arange(n, dtype=torch.float32)) @ _orthogonal(n, seed + 1).T


def _layer(m=96, n=192, seed=0):
    """A weight with a few outlier columns and a low-rank part, and inputs with uneven channel scales."""
    g = _gen(seed)
    W = 0.02 * torch.randn(m, n, generator=g)
    W[:, :3] *= 8
    W += 0.05 * torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g)
    X = torch.randn(512, n, generator=g) * (1 + 3 * torch.rand(n, generator=g))
    return W, LayerStats(2 * X.T @ X / 512, X.abs().mean(0), 512)


def _run(method, W, stats, **kw):
    kw.setdefault("rank_dtype", "fp16")
    cfg = QuantConfig(method=method, **kw)
    res = get_method(method)(W, stats, cfg)
    return res, layer_loss(W, res.weight, stats.H)


# --------------------------------------------------------------------------- R1-FLR


def test_precision_rule_keeps_the_signal_terms_and_drops_the_trigger():
    A = _blocks()
    lr, info = flexible_rank(A, 3, budget_x=100, iters=4)
    assert (info["rank"], info["stop_rule"]) == (3, "precision")
    assert info["amax"][1:3] == pytest.approx([2.0, 1.0], rel=1e-3)
    assert info["q"] >= info["k"]
    # the dropped 4th term is the one whose size growth exceeds its precision gain
    _, info4 = flexible_rank(A, 3, max_rank=4, iters=4, rules=())
    assert size_growth(4, 32, 32, 3) > precision_gain(info4["amax"][0], info4["amax"][4], 3)
    # the rule compares log2(w0 / w_r) with f r (m + n) / (m n): d cancels
    assert flexible_rank(A, 2, budget_x=100, iters=4)[1]["rank"] == 3
    assert flexible_rank(A, 4, budget_x=100, iters=4)[1]["rank"] == 3


def test_budget_rule():
    A = _geometric()
    for x, expected in ((0.07, 2), (0.2, 6)):  # floor(x d m n / (16 (m + n))) at d = 4, 256 x 256
        lr, info = flexible_rank(A, 4, budget_x=x)
        assert (info["rank"], info["stop_rule"], lr.rank) == (expected, "budget", expected)
        assert info["k"] <= 1 + x < size_growth(expected + 1, 256, 256, 4)


def test_flat_amax_curve_stops():
    # one spike, then a flat spectrum: the spike term pays, then the amax curve stops falling
    n = 256
    spike = torch.zeros(n)
    spike[:4] = 1
    A = _orthogonal(n) @ _orthogonal(n, 1).T + 10 * torch.outer(spike, spike)
    _, info = flexible_rank(A, 4, budget_x=10)
    assert info["stop_rule"] == "flat" and 1 <= info["rank"] <= 1 + 4
    _, info = flexible_rank(A, 4, budget_x=10, flat_window=2, rules=("flat",))
    assert info["stop_rule"] == "flat" and info["rank"] <= 1 + 2


def test_without_rules_it_is_r1svd():
    A = torch.randn(80, 4, generator=_gen(3)) @ torch.randn(4, 64, generator=_gen(4)) \
        + 0.01 * torch.randn(80, 64, generator=_gen(5))
    for storage in ("fp16", "fp8", "fp32"):
        lr, info = flexible_rank(A, 3, max_rank=6, rules=(), storage=storage)
        assert info["stop_rule"] == "max_rank" and lr.storage == storage
        torch.testing.assert_close(lr.dense(), r1svd(A, 6, storage=storage).dense(), atol=1e-4, rtol=1e-3)


def test_degenerate_inputs():
    lr, info = flexible_rank(torch.zeros(8, 6), 3)
    assert (lr.rank, info["stop_rule"], lr.dense().shape) == (0, "zero", (8, 6))
    with pytest.raises(ValueError):
        flexible_rank(torch.randn(8, 6), 3, rules=("nope",))
    with pytest.raises(ValueError):
        flexible_rank(torch.full((4, 4), float("nan")), 3)


# --------------------------------------------------------------------------- residual grid


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_flrq_grid_codes_and_clip_search(bits):
    R = torch.randn(16, 96, generator=_gen(bits))
    R[:, 5] *= 6
    h = torch.rand(96, generator=_gen(9)) + 0.1
    plain = quantize_clipped(R, bits, 32, "flrq", clip=False)
    qmax = 2 ** (bits - 1) - 1
    assert plain.sym and plain.codes.min() >= 1 and plain.codes.max() <= 2 ** bits - 1
    # unclipped: scale = amax / (2^(d-1) - 1) (stored in fp16), so the group's largest entry is exact
    # up to that rounding
    amax = R[:, :32].abs().amax(1)
    torch.testing.assert_close(plain.scale[:, 0], (amax / qmax).half().float())
    assert torch.allclose(plain.dequantize().abs()[:, :32].amax(1), amax, rtol=1e-3)
    clipped = quantize_clipped(R, bits, 32, "flrq", clip=True, weight=h)
    err = lambda q: ((q.dequantize() - R).pow(2) * h).reshape(16, 3, 32).sum(-1)  # noqa: E731
    assert (err(clipped) <= err(plain) + 1e-6).all() and err(clipped).sum() < err(plain).sum()


# --------------------------------------------------------------------------- the method


def test_effective_bits_counted_from_storage():
    W, stats = _layer()
    m, n = W.shape
    for gs, groups in ((-1, 1), (64, 3)):
        res, _ = _run("flrq", W, stats, bits=3, group_size=gs)
        r = res.info["rank"]
        assert r == res.lowrank.rank and r > 0
        total = m * n * 3 + m * groups * 16 + r * (m + n) * 16 + r * 16 + 16 * n  # sym: no zeros stored
        assert res.total_bits == total
        assert res.perm is None and res.rotation is None and res.alpha is not None
        torch.testing.assert_close(res.weight, res.residual.dequantize()
                                   + res.lowrank.dense() / res.alpha[None, :])


@pytest.mark.parametrize("bits", [2, 3])
def test_blc_never_worse_than_its_first_iterate(bits):
    W, stats = _layer(seed=bits)
    off, loss_off = _run("flrq", W, stats, bits=bits, group_size=64, options={"blc": False})
    on, loss_on = _run("flrq", W, stats, bits=bits, group_size=64, options={"blc_epochs": 4})
    losses = on.info["blc_losses"]
    assert len(losses) == 2 + 4 and on.info["blc_epochs"] == 4
    assert losses[0] == pytest.approx(loss_off, rel=1e-4)  # iterate 0 is the blc=False result
    assert loss_on == pytest.approx(min(losses), rel=1e-4) and loss_on <= loss_off
    assert loss_on < 0.8 * loss_off  # clipping and refits do help on this layer
    # default epochs: 20 at 2 bits, 1 above
    dflt, _ = _run("flrq", W, stats, bits=bits, group_size=64)
    assert dflt.info["blc_epochs"] == (20 if bits == 2 else 1)


def test_blc_rank_first_keeps_the_bits_of_blc_off():
    W, stats = _layer(seed=5)
    off, loss_off = _run("flrq", W, stats, bits=2, group_size=64, options={"blc": False})
    first, loss_first = _run("flrq", W, stats, bits=2, group_size=64, options={"blc_epochs": 3, "blc_rank": "first"})
    assert first.info["rank"] == off.info["rank"] and first.total_bits == off.total_bits
    assert loss_first < loss_off
    with pytest.raises(ValueError, match="blc_rank"):
        _run("flrq", W, stats, bits=2, options={"blc_rank": "nope"})


def test_flrq_beats_rtn_at_equal_bits():
    W, stats = _layer(m=256, n=512)
    rtn, loss_rtn = _run("rtn", W, stats, bits=3, group_size=64, mse=True)  # asym g64: 3.30 bits
    flrq, loss = _run("flrq", W, stats, bits=3, group_size=-1, options={"bits_budget": rtn.effective_bits()})
    assert flrq.effective_bits() <= rtn.effective_bits() and flrq.info["rank"] > 0
    assert loss < 0.9 * loss_rtn
    gptq_res, loss_gptq = _run("flrq", W, stats, bits=3, group_size=-1,
                               options={"bits_budget": rtn.effective_bits(), "residual": "gptq"})
    assert loss_gptq < loss and gptq_res.residual.sym and gptq_res.total_bits == flrq.total_bits


def test_deterministic():
    W, stats = _layer()
    a, _ = _run("flrq", W, stats, bits=2, group_size=64, options={"blc_epochs": 3})
    b, _ = _run("flrq", W, stats, bits=2, group_size=64, options={"blc_epochs": 3})
    assert torch.equal(a.weight, b.weight) and a.total_bits == b.total_bits and a.info["rank"] == b.info["rank"]


def test_fixed_rank_mode():
    W, stats = _layer()
    res, _ = _run("flrq", W, stats, bits=3, rank=8, group_size=64, options={"rank_mode": "fixed"})
    assert res.info["rank"] == 8 and res.info["stop_rule"] == "fixed"


# --------------------------------------------------------------------------- budgets and lopro --rank auto


def test_bits_budget_caps_and_fills():
    W, stats = _layer()
    m, n = W.shape
    for method in ("flrq", "lopro"):
        free, _ = _run(method, W, stats, bits=3, group_size=64, options={"rank_mode": "auto", "budget_x": 10})
        budget = free.effective_bits() - 0.1
        capped, _ = _run(method, W, stats, bits=3, group_size=64, options={"rank_mode": "auto",
                                                                            "bits_budget": budget})
        assert capped.effective_bits() <= budget and capped.lowrank.rank < free.lowrank.rank
        filled, _ = _run(method, W, stats, bits=3, group_size=64, options={"rank_mode": "fixed",
                                                                            "bits_budget": budget})
        per_rank = (16 * (m + n) + 16) / (m * n)
        assert budget - per_rank < filled.effective_bits() <= budget
    assert rank_cap(m, n, 1e9, 2.0, "fp16") == 0


def test_lopro_rank_auto():
    W, stats = _layer()
    fixed, _ = _run("lopro", W, stats, bits=3, group_size=64, rank=16, rank_dtype="fp8")
    auto, _ = _run("lopro", W, stats, bits=3, group_size=64, rank_dtype="fp8", options={"rank_mode": "auto"})
    assert fixed.info["rank"] == 16 and 0 < auto.info["rank"] != 16
    m, n = W.shape
    assert auto.total_bits - fixed.total_bits == (auto.info["rank"] - 16) * ((m + n) * 8 + 16)


def test_allocate_ranks_meets_budget():
    shapes = [(576, 576), (576, 1536), (1536, 576), (192, 576)]
    base = [3.2, 3.2, 3.2, 3.2]
    preferred = [10, 40, 20, 0]
    total = sum(m * n for m, n in shapes)
    ranks, achieved = allocate_ranks(shapes, base, 3.5, preferred)
    assert achieved <= 3.5 and ranks[3] == 0
    # one more step of lam would overshoot: the budget is nearly spent
    assert 3.5 - achieved < (16 * (576 + 1536) + 16) / total
    assert ranks[1] > ranks[2] > ranks[0] > 0
    ranks, achieved = allocate_ranks(shapes, base, 100, preferred, caps=[4, 8, 1000, 5])
    assert ranks == [4, 8, 576, 0]
    ranks, achieved = allocate_ranks(shapes, base, 3.0, preferred)
    assert ranks == [0, 0, 0, 0] and achieved == pytest.approx(3.2)
    assert math.isclose(allocate_ranks([(8, 8)], [3.0], 3.0, [4])[1], 3.0)


def test_cli_options():
    from lopro.cli import build_parser, config_from_args

    base = ["quantize", "--model", "m", "--out", "o"]
    cfg = config_from_args(build_parser().parse_args(base + ["--method", "flrq", "--bits-budget", "3.3"]))
    assert cfg.rank_dtype == "fp16" and cfg.options == {"bits_budget": 3.3}
    cfg = config_from_args(build_parser().parse_args(base + ["--method", "lopro", "--rank", "auto"]))
    assert cfg.rank_dtype == "fp8" and cfg.options == {"rank_mode": "auto"}
    cfg = config_from_args(build_parser().parse_args(base + ["--method", "flrq", "--rank-dtype", "fp8"]))
    assert cfg.rank_dtype == "fp8"
