"""The low rank every low-rank method shares: the input scaling alpha, the rank (fixed, R1-FLR, or the
largest that fits a bits budget) and what a layer costs besides its factors, priced by lopro.formats."""
from __future__ import annotations

import logging
import math
import time

import torch

from lopro import formats
from lopro.formats import scalar as scalar_format, vq as vq_format
from lopro.linalg import LowRank, lowrank
from lopro.linalg.flr import flexible_rank
from lopro.methods.options import FLRQOptions, RankOptions, VQOptions
from lopro.methods.registry import get_method
from lopro.quant.bits import num_groups
from lopro.quant.grid import to_storage

log = logging.getLogger(__name__)

ALPHA_FLOOR = 1e-4


def input_scaling(absmean: torch.Tensor) -> torch.Tensor:
    """alpha_j = s_j / sqrt(min s * max s), s_j = mean_t |x_tj| clamped at 1e-4 (spec default)."""
    s = absmean.float().clamp_min(ALPHA_FLOOR)
    return to_storage(s / torch.sqrt(s.min() * s.max()))


def vq_config(cfg, width: int):
    """GPTVQ's settings for this config: the paper's for cfg.bits, with the vq_* options over them."""
    from lopro.quant.gptvq import VQConfig

    vq_opts = cfg.options_of(VQOptions)
    return VQConfig.for_bits(cfg.bits, width=width, seed=cfg.seed, damp_percent=cfg.damp_percent,
                             **vq_opts.overrides())


def planned_residual(cfg, m: int, n: int) -> dict:
    """The residual spec a layer of this shape will have under `cfg` (for pricing before solving)."""
    spec = get_method(cfg.method)
    if spec.residual == "vq":
        from lopro.quant.gptvq import VQLayout

        vc = vq_config(cfg, n)
        return vq_format.plan(cfg.bits, vc.codebook_bits, VQLayout.make(m, n, vc))
    G = num_groups(n, cfg.group_size)
    gs = n if cfg.group_size == -1 else cfg.group_size
    sym = cfg.sym
    flrq = cfg.options_of(FLRQOptions, required=False)
    if flrq is not None:  # FLRQ's grids are symmetric unless "asym"
        sym = flrq.grid != "asym"
    return scalar_format.plan(cfg.bits, G, gs if G > 1 else n, sym)


def base_bits(m: int, n: int, cfg) -> int:
    """Bits a layer stores besides its low-rank factors: residual codes and grids, alpha, permutation."""
    spec = get_method(cfg.method)
    return formats.storage_bits(formats.layer_spec(m, n, planned_residual(cfg, m, n), alpha=spec.lowrank,
                                                   perm=spec.stores_permutation))


def rank_cap(m: int, n: int, base: float, bits_budget: float, storage: str) -> int:
    """Largest rank whose factors fit in ``bits_budget`` bits per weight on top of ``base`` (total bits)."""
    per_rank = formats.lowrank_bits(m, n, 1, storage)
    return max(0, min(m, n, math.floor((bits_budget * m * n - base) / per_rank)))


def select_lowrank(A: torch.Tensor, cfg, base: float | None = None) -> tuple[LowRank, dict]:
    """The low rank of the scaled weight ``A`` under ``cfg``: ``cfg.rank`` (rank_mode "fixed") or R1-FLR ("auto").

    With option ``bits_budget = B`` the layer may spend at most ``B`` bits per weight in all:
    ``cap = floor((B m n - base) / bits of one rank)``, priced by lopro.formats like the checkpoint. In
    "auto" mode the cap replaces the ``budget_x`` rule (R1-FLR keeps ``min(flexible, cap)`` terms, stop
    rule "bits_budget" when the cap binds); in "fixed" mode the rank *is* the cap, so every layer
    spends the budget. The decision needs only the layer's shape, so a block-by-block pipeline can make it.
    """
    o = cfg.options_of(RankOptions)
    m, n = A.shape
    cap = None
    if o.bits_budget is not None:
        base = base_bits(m, n, cfg) if base is None else base
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


def scaled_lowrank(W: torch.Tensor, alpha: torch.Tensor, cfg) -> tuple[LowRank, torch.Tensor, dict]:
    """(LowRank of W diag(alpha), W_r = its dense form times diag(alpha)^-1, rank info)."""
    lr, info = select_lowrank(W * alpha[None, :], cfg)
    return lr, lr.dense() / alpha[None, :], info


def allocate_ranks(shapes: list[tuple[int, int]], base: list[float], budget: float, preferred: list[int],
                   storage: str = "fp16", caps: list[int] | None = None) -> tuple[list[int], float]:
    """Model-level allocation: ranks ``min(cap_l, floor(lam * preferred_l))`` with one factor ``lam``.

    ``base`` are the layers' bits per weight without low rank. ``lam`` is the largest (found by
    bisection) whose parameter-weighted mean effective bits stays within ``budget``; the bits left
    over (layers step up together) go one rank at a time to the layer with the lowest
    ``(rank + 1) / preferred`` that still fits. Layers that prefer rank 0 keep it. Returns the
    ranks and the achieved mean bits (above ``budget`` only when even rank 0 everywhere exceeds it).
    Needs every layer's preferred rank first (e.g. an R1-FLR pass), so it is for two-pass drivers.
    """
    if not len(shapes) == len(base) == len(preferred):
        raise ValueError("shapes, base and preferred must have one entry per layer")
    caps = [min(m, n) for m, n in shapes] if caps is None else [min(c, m, n) for c, (m, n) in zip(caps, shapes)]
    total = sum(m * n for m, n in shapes)

    def ranks_at(lam):
        return [min(c, math.floor(lam * p)) for c, p in zip(caps, preferred)]

    def mean_bits(ranks):
        return sum(b * m * n + formats.lowrank_bits(m, n, r, storage)
                   for b, (m, n), r in zip(base, shapes, ranks)) / total

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
