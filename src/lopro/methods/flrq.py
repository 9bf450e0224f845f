"""FLRQ (spec section 3): W ≈ W_r + Ŵq with a flexible per-layer rank (R1-FLR) and BLC.

``W_r = U Σ V diag(alpha)^-1`` is a low rank of the alpha-scaled weight (alpha as in LoPRo), its rank
chosen by :func:`lopro.linalg.flr.flexible_rank`; ``Ŵq`` is the residual on a symmetric FLRQ grid
(``scale = p amax / (2^(d-1) - 1)`` per row and group, codes ``-(2^(d-1)-1) .. 2^(d-1)-1``),
stored as a :class:`ScalarQuant` with the fixed midpoint zero ``2^(d-1)`` of lopro's symmetric
convention, so its codes lie in ``1 .. 2^d - 1`` and no zeros are stored.

BLC (best low rank under clipping), iterates in order:

0. ``W_r = FLR(W)``, ``Ŵq = Quant(W - W_r)`` without clipping (the ``blc=False`` result);
1. the same ``W_r`` with ``Ŵq = Quant(Clip(W - W_r, p))``, ``p`` searched per row and group;
2. ... ``blc_epochs`` times: ``W_r = FLR(W - Ŵq)``, ``Ŵq = Quant(Clip(W - W_r, p))``.

The kept pair has the lowest ``tr(dW H dW^T) = ||W X - (W_r + Ŵq) X||^2 N / 2``, so BLC never does
worse than iterate 0. The clip ratio of a group minimizes ``sum_j H_jj (w_ij - ŵ_ij)^2`` over the
group's columns (``clip_weight="hdiag"``, default) or the plain squared error (``"none"``).

Options (``cfg.options``), with defaults:
``max_rank`` 128, ``budget_x`` 0.2, ``flat_window`` 4, ``flat_threshold`` 1e-3 (R1-FLR rules);
``rank_mode`` "auto" (R1-FLR) or "fixed" (``cfg.rank``, no rule); ``bits_budget`` (see
:func:`select_lowrank`); ``blc`` True; ``blc_epochs`` 1 at >= 3 bits, 20 at 2 bits; ``blc_rank``
"refit" (R1-FLR chooses again on ``W - Ŵq`` each epoch, as the paper writes it; the rank, and so
the bits, may differ from blc=False) or "first" (refits keep the rank chosen on ``W``); ``residual``
"rtn" or "gptq" (GPTQ runs on lopro's grid: symmetric unless ``grid="asym"``, clip search by its
``mse`` option); ``grid`` "flrq", "sym" (lopro's/GPTQ's symmetric grid) or "asym"; ``clip_weight``.
The factors are stored in ``cfg.rank_dtype``; the CLI defaults it to fp16 for ``flrq`` (the paper's
choice); from Python pass ``QuantConfig(method="flrq", rank_dtype="fp16")``.
"""
from __future__ import annotations

import time

import torch

from lopro.formats import scalar as scalar_format
from lopro.linalg import lowrank
from lopro.methods.base import LayerResult
from lopro.methods.options import FLRQOptions, FLRQRankOptions
from lopro.methods.rank import allocate_ranks, input_scaling, rank_cap, select_lowrank  # noqa: F401 (re-exported)
from lopro.methods.registry import register
from lopro.quant.bits import num_groups
from lopro.quant.gptq import gptq_quantize
from lopro.quant.grid import CLIP_GRID, Grid, group_bounds, params_from_range, to_storage
from lopro.quant.loss import layer_loss
from lopro.quant.rtn import ScalarQuant
from lopro import formats


# --------------------------------------------------------------------------- residual quantization

def _group_params(w: torch.Tensor, bits: int, grid: str, p: float):
    """scale, zero, lowest and highest code of each row of ``w`` for clip ratio ``p``."""
    maxq = 2 ** bits - 1
    if grid == "flrq":
        qmax = 2 ** (bits - 1) - 1
        amax = w.abs().amax(dim=1) * p
        scale = to_storage(torch.where(amax > 0, amax / qmax, torch.ones_like(amax)))
        zero = 2.0 ** (bits - 1)
        return scale, torch.full_like(scale, zero), zero - qmax, zero + qmax
    xmin = w.min(dim=1).values.clamp(max=0) * p
    xmax = w.max(dim=1).values.clamp(min=0) * p
    scale, zero = params_from_range(xmin, xmax, Grid(bits, grid == "sym"))
    return scale, zero, 0, maxq


def quantize_clipped(R: torch.Tensor, bits: int, group_size: int, grid: str = "flrq", clip: bool = True,
                     weight: torch.Tensor | None = None) -> ScalarQuant:
    """Round each row-group of ``R`` to its grid, with the clip ratio from ``CLIP_GRID`` that minimizes
    ``sum_j weight_j (r_ij - q_ij)^2`` when ``clip`` (``weight`` defaults to ones)."""
    R = R.detach().float()
    m, n = R.shape
    weight = torch.ones(n, device=R.device) if weight is None else weight.to(R.device, torch.float32)
    bounds = group_bounds(n, group_size)
    codes = torch.empty(m, n, dtype=torch.uint8, device=R.device)
    scale = torch.empty(m, len(bounds), device=R.device)
    zero = torch.empty_like(scale)
    g_idx = torch.empty(n, dtype=torch.long)
    for g, (s, e) in enumerate(bounds):
        w, best = R[:, s:e], None
        for p in (CLIP_GRID if clip else (1.0,)):
            sc, z, lo, hi = _group_params(w, bits, grid, p)
            q = torch.clamp(torch.round(w / sc[:, None]) + z[:, None], lo, hi)
            err = ((sc[:, None] * (q - z[:, None]) - w).pow(2) * weight[s:e]).sum(dim=1)
            if best is None:
                best, codes[:, s:e], scale[:, g], zero[:, g] = err, q.to(torch.uint8), sc, z
                continue
            better = err < best
            best = torch.where(better, err, best)
            codes[:, s:e] = torch.where(better[:, None], q.to(torch.uint8), codes[:, s:e])
            scale[:, g] = torch.where(better, sc, scale[:, g])
            zero[:, g] = torch.where(better, z, zero[:, g])
        g_idx[s:e] = g
    return ScalarQuant(codes, scale, zero, g_idx, bits, grid != "asym")


# --------------------------------------------------------------------------- the method

@register("flrq", lowrank=True, options=(FLRQRankOptions, FLRQOptions), default_rank_dtype="fp16")
def flrq(W, stats, cfg) -> LayerResult:
    """FLRQ: per-layer flexible rank (R1-FLR) and best low rank under clipping (BLC)."""
    o = cfg.options_of(FLRQOptions).resolved(cfg.bits)
    m, n = W.shape
    W = W.detach().float()
    H = stats.H.to(W.device, torch.float32)
    alpha = input_scaling(stats.absmean.to(W.device))
    weight = torch.diag(H) if o.clip_weight == "hdiag" else None
    sym = o.grid != "asym"
    G = num_groups(n, cfg.group_size)
    residual = scalar_format.plan(cfg.bits, G, n if G == 1 else cfg.group_size, sym)
    base_bits = formats.storage_bits(formats.layer_spec(m, n, residual, alpha=True))
    rank_seconds = 0.0

    def fit(target, rank=None):
        nonlocal rank_seconds
        if rank is None:
            lr, info = select_lowrank(target * alpha[None, :], cfg, base_bits)
        else:  # blc_rank="first": refit at the rank chosen on W
            t0 = time.perf_counter()
            lr = lowrank(target * alpha[None, :], rank, solver=cfg.lowrank_solver, iters=cfg.power_iters,
                         seed=cfg.seed, storage=cfg.rank_dtype)
            info = {**first_info, "seconds": time.perf_counter() - t0}
        rank_seconds += info["seconds"]
        return lr, info, lr.dense() / alpha[None, :]

    def quant(R, clip):
        if o.residual == "gptq":
            return gptq_quantize(R, H, cfg.bits, cfg.group_size, sym, clip, act_order=cfg.desc_act,
                                 damp_percent=cfg.damp_percent, blocksize=cfg.blocksize)
        return quantize_clipped(R, cfg.bits, cfg.group_size, o.grid, clip, weight)

    lr, finfo, W_r = fit(W)
    first_info, refit_rank = finfo, (lr.rank if o.blc_rank == "first" else None)
    q = quant(W - W_r, clip=False)
    Wq = q.dequantize()
    best = (layer_loss(W, W_r + Wq, H), lr, finfo, W_r, q, Wq)
    best_iterate, losses, epochs = 0, [best[0]], 0
    if o.blc:
        q = quant(W - W_r, clip=True)
        Wq = q.dequantize()
        for it in range(1, o.blc_epochs + 2):
            if it > 1:
                lr, finfo, W_r = fit(W - Wq, refit_rank)
                q = quant(W - W_r, clip=True)
                Wq = q.dequantize()
                epochs += 1
            loss = layer_loss(W, W_r + Wq, H)
            losses.append(loss)
            if loss < best[0]:
                best, best_iterate = (loss, lr, finfo, W_r, q, Wq), it
    _, lr, finfo, W_r, q, Wq = best
    info = {"rank": lr.rank, "stop_rule": finfo["stop_rule"], "blc_epochs": epochs, "blc_best_iterate": best_iterate,
            "blc_losses": losses, "rank_seconds": rank_seconds}
    return LayerResult(W_r + Wq, residual=q, lowrank=lr, alpha=alpha, info=info)
