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

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch

from lopro.linalg import LowRank, lowrank
from lopro.linalg.flr import factor_bits, flexible_rank
from lopro.quant.bits import SCALE_BITS, index_bits, lowrank_bits, num_groups, scalar_bits
from lopro.quant.gptq import gptq_quantize
from lopro.quant.grid import CLIP_GRID, Grid, group_bounds, params_from_range, to_storage
from lopro.quant.rtn import ScalarQuant
from lopro.methods import register
from lopro.methods.base import LayerResult
from lopro.methods.lowrank import input_scaling

log = logging.getLogger(__name__)

DEFAULT_RANK_DTYPE = "fp16"  # the CLI's --rank-dtype default for flrq
RANK_MODES = ("auto", "fixed")
RESIDUALS = ("rtn", "gptq")
GRIDS = ("flrq", "sym", "asym")
CLIP_WEIGHTS = ("hdiag", "none")
BLC_RANKS = ("refit", "first")
PERMUTED_METHODS = ("lopro",)  # methods that also store a column permutation (counted in the budget)


@dataclass(frozen=True)
class FLROptions:
    """How the rank of a low-rank method is chosen (read from ``cfg.options``)."""

    rank_mode: str = "auto"
    max_rank: int = 128
    budget_x: float = 0.2
    flat_window: int = 4
    flat_threshold: float = 1e-3
    bits_budget: float | None = None

    @classmethod
    def from_options(cls, options: dict, rank_mode: str = "auto") -> "FLROptions":
        o = cls(rank_mode=options.get("rank_mode", rank_mode), max_rank=int(options.get("max_rank", 128)),
                budget_x=float(options.get("budget_x", 0.2)), flat_window=int(options.get("flat_window", 4)),
                flat_threshold=float(options.get("flat_threshold", 1e-3)),
                bits_budget=None if options.get("bits_budget") is None else float(options["bits_budget"]))
        if o.rank_mode not in RANK_MODES:
            raise ValueError(f"rank_mode must be one of {RANK_MODES}, got {o.rank_mode!r}")
        if o.max_rank < 0 or o.budget_x < 0 or o.flat_window < 1 or o.flat_threshold < 0:
            raise ValueError("need max_rank >= 0, budget_x >= 0, flat_window >= 1, flat_threshold >= 0")
        if o.bits_budget is not None and o.bits_budget <= 0:
            raise ValueError(f"bits_budget must be positive, got {o.bits_budget}")
        return o


@dataclass(frozen=True)
class FLRQOptions:
    blc: bool = True
    blc_epochs: int = 1
    residual: str = "rtn"
    grid: str = "flrq"
    clip_weight: str = "hdiag"
    blc_rank: str = "refit"

    @classmethod
    def from_config(cls, cfg) -> "FLRQOptions":
        opt = cfg.options
        o = cls(blc=bool(opt.get("blc", True)), blc_epochs=int(opt.get("blc_epochs", 20 if cfg.bits <= 2 else 1)),
                residual=opt.get("residual", "rtn"), grid=opt.get("grid", "flrq"),
                clip_weight=opt.get("clip_weight", "hdiag"), blc_rank=opt.get("blc_rank", "refit"))
        for name, value, allowed in (("residual", o.residual, RESIDUALS), ("grid", o.grid, GRIDS),
                                     ("clip_weight", o.clip_weight, CLIP_WEIGHTS),
                                     ("blc_rank", o.blc_rank, BLC_RANKS)):
            if value not in allowed:
                raise ValueError(f"flrq option {name} must be one of {allowed}, got {value!r}")
        if o.blc_epochs < 0:
            raise ValueError(f"blc_epochs must be >= 0, got {o.blc_epochs}")
        if o.residual == "gptq" and o.grid == "flrq":
            o = dataclasses.replace(o, grid="sym")  # GPTQ runs on lopro's grids
        return o


# --------------------------------------------------------------------------- rank selection and budget

def rank_cap(m: int, n: int, base_bits: float, bits_budget: float, storage: str) -> int:
    """Largest rank whose factors fit in ``bits_budget`` bits per weight on top of ``base_bits`` (total bits)."""
    per_rank = lowrank_bits(m, n, 1, factor_bits(storage))
    return max(0, min(m, n, math.floor((bits_budget * m * n - base_bits) / per_rank)))


def default_base_bits(m: int, n: int, cfg) -> float:
    """Bits a low-rank recipe stores besides the factors: residual codes and grids, alpha, permutation."""
    bits = scalar_bits(m, n, cfg.bits, num_groups(n, cfg.group_size), cfg.sym) + SCALE_BITS * n
    return bits + (index_bits(n) * n if cfg.method in PERMUTED_METHODS else 0)


def select_lowrank(A: torch.Tensor, cfg, base_bits: float | None = None,
                   rank_mode: str = "auto") -> tuple[LowRank, dict]:
    """The low rank of the scaled weight ``A`` under ``cfg``: R1-FLR ("auto") or ``cfg.rank`` ("fixed").

    With ``options["bits_budget"] = B`` the layer may spend at most ``B`` bits per weight in all:
    ``cap = floor((B m n - base_bits) / (f (m + n) + 16))``. In "auto" mode the cap replaces the
    ``budget_x`` rule (R1-FLR keeps ``min(flexible, cap)`` terms, stop rule "bits_budget" when the cap
    binds); in "fixed" mode the rank *is* the cap, so every layer spends the budget. The decision
    needs only the layer's shape, so a block-by-block pipeline can make it.
    """
    o = FLROptions.from_options(cfg.options, rank_mode)
    m, n = A.shape
    cap = None
    if o.bits_budget is not None:
        base = default_base_bits(m, n, cfg) if base_bits is None else base_bits
        cap = rank_cap(m, n, base, o.bits_budget, cfg.rank_dtype)
        if cap == 0 and o.bits_budget * m * n < base:
            log.warning("bits_budget %.3f is below the %.3f bits per weight that a %dx%d layer stores without low "
                        "rank; using rank 0", o.bits_budget, base / (m * n), m, n)
    t0 = time.perf_counter()
    if o.rank_mode == "fixed":
        rank = min(cfg.rank, m, n) if cap is None else cap
        lr = lowrank(A, rank, solver=cfg.lowrank_solver, iters=cfg.power_iters, seed=cfg.seed, storage=cfg.rank_dtype)
        return lr, {"rank": rank, "stop_rule": "fixed" if cap is None else "bits_budget",
                    "seconds": time.perf_counter() - t0}
    max_rank = o.max_rank if cap is None else min(o.max_rank, cap)
    budget_x = o.budget_x if cap is None else math.inf
    lr, info = flexible_rank(A, cfg.bits, max_rank=max_rank, budget_x=budget_x, flat_window=o.flat_window,
                             flat_threshold=o.flat_threshold, iters=cfg.power_iters, seed=cfg.seed,
                             storage=cfg.rank_dtype)
    if cap is not None and info["stop_rule"] == "max_rank" and cap < o.max_rank:
        info["stop_rule"] = "bits_budget"
    return lr, info


def allocate_ranks(shapes: list[tuple[int, int]], base_bits: list[float], budget: float, preferred: list[int],
                   storage: str = "fp16", caps: list[int] | None = None) -> tuple[list[int], float]:
    """Model-level allocation: ranks ``min(cap_l, floor(lam * preferred_l))`` with one factor ``lam``.

    ``base_bits`` are the layers' bits per weight without low rank. ``lam`` is the largest (found by
    bisection) whose parameter-weighted mean effective bits stays within ``budget``; the bits left
    over (layers step up together) go one rank at a time to the layer with the lowest
    ``(rank + 1) / preferred`` that still fits. Layers that prefer rank 0 keep it. Returns the
    ranks and the achieved mean bits (above ``budget`` only when even rank 0 everywhere exceeds it).
    Needs every layer's preferred rank first (e.g. an R1-FLR pass), so it is for two-pass drivers.
    """
    if not len(shapes) == len(base_bits) == len(preferred):
        raise ValueError("shapes, base_bits and preferred must have one entry per layer")
    fb = factor_bits(storage)
    caps = [min(m, n) for m, n in shapes] if caps is None else [min(c, m, n) for c, (m, n) in zip(caps, shapes)]
    total = sum(m * n for m, n in shapes)

    def ranks_at(lam):
        return [min(c, math.floor(lam * p)) for c, p in zip(caps, preferred)]

    def mean_bits(ranks):
        return sum(b * m * n + lowrank_bits(m, n, r, fb) for b, (m, n), r in zip(base_bits, shapes, ranks)) / total

    hi = max((c / p for c, p in zip(caps, preferred) if p > 0), default=0.0) + 1.0
    if mean_bits(ranks_at(hi)) <= budget:
        best = ranks_at(hi)
        return best, mean_bits(best)
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_bits(ranks_at(mid)) <= budget else (lo, mid)
    best = ranks_at(lo)
    # several layers step up at the same lam: spend what is left one rank at a time, least served first
    open_ = {i for i, (r, c, p) in enumerate(zip(best, caps, preferred)) if p > 0 and r < c}
    while open_:
        i = min(open_, key=lambda j: ((best[j] + 1) / preferred[j], j))
        trial = best[:i] + [best[i] + 1] + best[i + 1:]
        if mean_bits(trial) <= budget:
            best = trial
            if best[i] >= caps[i]:
                open_.discard(i)
        else:
            open_.discard(i)
    return best, mean_bits(best)


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


def _layer_loss(dW: torch.Tensor, H: torch.Tensor) -> float:
    """tr(dW H dW^T)."""
    return torch.sum((dW @ H) * dW).item()


# --------------------------------------------------------------------------- the method

@register("flrq")
def flrq(W, stats, cfg) -> LayerResult:
    o = FLRQOptions.from_config(cfg)
    m, n = W.shape
    W = W.detach().float()
    H = stats.H.to(W.device, torch.float32)
    alpha = input_scaling(stats.absmean.to(W.device))
    weight = torch.diag(H) if o.clip_weight == "hdiag" else None
    sym = o.grid != "asym"
    base_bits = scalar_bits(m, n, cfg.bits, num_groups(n, cfg.group_size), sym) + SCALE_BITS * n
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
    best = (_layer_loss(W_r + Wq - W, H), lr, finfo, W_r, q, Wq)
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
            loss = _layer_loss(W_r + Wq - W, H)
            losses.append(loss)
            if loss < best[0]:
                best, best_iterate = (loss, lr, finfo, W_r, q, Wq), it
    _, lr, finfo, W_r, q, Wq = best
    bits = q.storage_bits() + lowrank_bits(m, n, lr.rank, factor_bits(cfg.rank_dtype)) + SCALE_BITS * n
    info = {"rank": lr.rank, "stop_rule": finfo["stop_rule"], "blc_epochs": epochs, "blc_best_iterate": best_iterate,
            "blc_losses": losses, "rank_seconds": rank_seconds}
    return LayerResult(W_r + Wq, bits, {"quant": q, "lowrank": lr, "alpha": alpha}, info=info)
