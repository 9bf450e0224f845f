import pytest
import torch

from lopro.quant.grid import Grid, dequantize, find_params, group_bounds, quantize
from lopro.quant.rtn import rtn_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_grid_round_trip_is_idempotent(bits, sym):
    torch.manual_seed(bits)
    w = torch.randn(8, 40)
    grid = Grid(bits, sym)
    s, z = find_params(w, grid)
    q = quantize(w, s[:, None], z[:, None], grid.maxq)
    assert q.min() >= 0 and q.max() <= grid.maxq and torch.equal(q, q.round())
    w_hat = dequantize(q, s[:, None], z[:, None])
    # values already on the grid map back to themselves
    assert torch.equal(quantize(w_hat, s[:, None], z[:, None], grid.maxq), q)
    # error is at most half a step (asymmetric min-max never clips)
    if not sym:
        assert ((w_hat - w).abs() <= s[:, None] / 2 + 1e-6).all()


def test_mse_clip_search_never_worse():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    w[:, 0] *= 10  # outliers make clipping worthwhile
    errs = []
    for mse in (False, True):
        s, z = find_params(w, Grid(3, False, mse))
        q = quantize(w, s[:, None], z[:, None], 7)
        errs.append((dequantize(q, s[:, None], z[:, None]) - w).abs().pow(2.4).sum(1))
    assert (errs[1] <= errs[0] + 1e-5).all() and errs[1].sum() < errs[0].sum()


def test_group_bounds_with_width_not_divisible():
    assert group_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert group_bounds(10, -1) == [(0, 10)]


def test_rtn_groups_and_bits():
    torch.manual_seed(0)
    W = torch.randn(6, 70)
    q = rtn_quantize(W, 3, 32)
    assert q.num_groups == 3 and q.g_idx.tolist() == [0] * 32 + [1] * 32 + [2] * 6
    per_channel = rtn_quantize(W, 3, -1)
    err_g = (q.dequantize() - W).pow(2).sum()
    err_c = (per_channel.dequantize() - W).pow(2).sum()
    assert err_g < err_c
    from lopro.methods.base import LayerResult

    # codes (70 x 3 bits = 27 bytes a row), fp16 scales, 3-bit zeros of 3 groups (2 bytes a row)
    assert LayerResult(q.dequantize(), residual=q).total_bits == 6 * 27 * 8 + 6 * 3 * 16 + 6 * 2 * 8
