"""Low-rank + quantized-residual recipes: LoPRo, its ablation ladder, and LQER.

Every recipe computes W ≈ W_r + Ŵq Q^T P^T, with W_r = U Σ V diag(alpha)^-1 a scaled low rank of W
(LQER instead takes the low rank of the quantization error), P a column permutation and Q a
(block) Walsh-Hadamard rotation; the residual is quantized against H' = Q^T P^T H P Q.
"""
from __future__ import annotations

import torch

from lopro.linalg import BlockRotation, lowrank
from lopro.quant.bits import SCALE_BITS, index_bits, lowrank_bits
from lopro.quant.gptq import gptq_quantize
from lopro.quant.grid import to_storage
from lopro.quant.rtn import rtn_quantize
from lopro.methods import register
from lopro.methods.base import LayerResult

FACTOR_BITS = {"fp8": 8, "fp16": 16, "fp32": 32}
ALPHA_FLOOR = 1e-4


def input_scaling(absmean: torch.Tensor) -> torch.Tensor:
    """alpha_j = s_j / sqrt(min s * max s), s_j = mean_t |x_tj| clamped at 1e-4 (spec default)."""
    s = absmean.float().clamp_min(ALPHA_FLOOR)
    return to_storage(s / torch.sqrt(s.min() * s.max()))


def scaled_lowrank(W: torch.Tensor, alpha: torch.Tensor, cfg):
    """(LowRank of W diag(alpha), W_r = its dense form times diag(alpha)^-1), from the stored factors.

    options["rank_mode"]="auto" (R1-FLR) or options["bits_budget"]: the rank comes from flrq.select_lowrank."""
    if cfg.options.get("rank_mode") == "auto" or cfg.options.get("bits_budget") is not None:
        from lopro.methods.flrq import select_lowrank  # late import: flrq imports this module
        lr, _ = select_lowrank(W * alpha[None, :], cfg, rank_mode="fixed")
    else:
        lr = lowrank(W * alpha[None, :], cfg.rank, solver=cfg.lowrank_solver, iters=cfg.power_iters, seed=cfg.seed,
                     storage=cfg.rank_dtype)
    return lr, lr.dense() / alpha[None, :]


def salience_permutation(H: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Columns by H_jj / mean_i |R_ij|, most important first (replaces GPTQ's act-order)."""
    importance = torch.diag(H) / R.abs().mean(dim=0).clamp_min(1e-12)
    return torch.argsort(importance, descending=True)


def rotate_hessian(H: torch.Tensor, rot: BlockRotation) -> torch.Tensor:
    """Q^T H Q for symmetric H."""
    return rot.apply(rot.apply(H).T)


def vq_config(cfg, width: int):
    from lopro.quant.gptvq import VQConfig

    overrides = {k[3:]: v for k, v in cfg.options.items() if k.startswith("vq_")}  # e.g. vq_kmeans_iters=10
    return VQConfig.for_bits(cfg.bits, width=width, seed=cfg.seed, damp_percent=cfg.damp_percent, **overrides)


def quantize_residual(R: torch.Tensor, H: torch.Tensor, cfg, solver: str):
    """Scalar RTN or GPTQ, or GPTVQ (`solver="gptvq"`); all results expose dequantize/storage_bits."""
    if solver == "rtn":
        return rtn_quantize(R, cfg.bits, cfg.group_size, cfg.sym, cfg.mse)
    if solver == "gptvq":
        from lopro.quant.gptvq import gptvq_quantize

        return gptvq_quantize(R, H, vq_config(cfg, R.shape[1]))
    return gptq_quantize(R, H, cfg.bits, cfg.group_size, cfg.sym, cfg.mse, act_order=False,
                         damp_percent=cfg.damp_percent, blocksize=cfg.blocksize)


def lowrank_residual(W, stats, cfg, solver: str = "gptq", rotation: str = "none", permute: bool = False):
    """The shared recipe; `rotation` is "none", "full" or "block" (b_I identity + b_H Hadamard blocks)."""
    m, n = W.shape
    H = stats.H.to(W.device, torch.float32)
    alpha = input_scaling(stats.absmean.to(W.device))
    lr, W_r = scaled_lowrank(W, alpha, cfg)
    R = W - W_r
    perm = salience_permutation(H, R) if permute else None
    if perm is not None:
        R, H = R[:, perm], H[perm][:, perm]
    rot = None
    if rotation == "full":
        rot = BlockRotation.full(n)
    elif rotation == "block":
        rot = BlockRotation(n, cfg.block_identity, cfg.block_hadamard)
    if rot is not None:
        R, H = rot.apply(R), rotate_hessian(H, rot)
    q = quantize_residual(R, H, cfg, solver)
    residual = q.dequantize()
    if rot is not None:
        residual = rot.apply_transpose(residual)
    if perm is not None:
        residual = residual[:, torch.argsort(perm)]
    bits = q.storage_bits() + lowrank_bits(m, n, lr.rank, FACTOR_BITS[cfg.rank_dtype]) + SCALE_BITS * n
    parts = {"vq" if solver == "gptvq" else "quant": q, "lowrank": lr, "alpha": alpha}
    if perm is not None:
        bits += index_bits(n) * n
        parts["perm"] = perm
    if rot is not None:
        parts["rotation"] = rot
    return LayerResult(W_r + residual, bits, parts, info={"rank": lr.rank})


@register("lowrank-rtn")
def lowrank_rtn(W, stats, cfg) -> LayerResult:
    return lowrank_residual(W, stats, cfg, solver="rtn")


@register("lowrank-gptq")
def lowrank_gptq(W, stats, cfg) -> LayerResult:
    return lowrank_residual(W, stats, cfg)


@register("lowrank-gptq-hadamard")
def lowrank_gptq_hadamard(W, stats, cfg) -> LayerResult:
    return lowrank_residual(W, stats, cfg, rotation="full")


@register("lopro")
def lopro(W, stats, cfg) -> LayerResult:
    return lowrank_residual(W, stats, cfg, rotation="block", permute=True)


@register("lopro-v")
def lopro_v(W, stats, cfg) -> LayerResult:
    """LoPRo with GPTVQ (2-D vectors, 8-bit codebooks) on the permuted, rotated residual."""
    return lowrank_residual(W, stats, cfg, solver="gptvq", rotation="block", permute=True)


@register("gptvq")
def gptvq(W, stats, cfg) -> LayerResult:
    """Plain GPTVQ (no low rank, no rotation); cfg.group_size is not used (codebook groups are)."""
    q = quantize_residual(W, stats.H, cfg, "gptvq")
    return LayerResult(q.dequantize(), q.storage_bits(), {"vq": q})


@register("lqer")
def lqer(W, stats, cfg) -> LayerResult:
    """GPTQ first, then a scaled low rank of the quantization error (the form LoPRo argues against)."""
    m, n = W.shape
    q = gptq_quantize(W, stats.H, cfg.bits, cfg.group_size, cfg.sym, cfg.mse, cfg.desc_act, cfg.damp_percent,
                      cfg.blocksize)
    Wq = q.dequantize()
    alpha = input_scaling(stats.absmean.to(W.device))
    lr, E_r = scaled_lowrank(W - Wq, alpha, cfg)
    bits = q.storage_bits() + lowrank_bits(m, n, lr.rank, FACTOR_BITS[cfg.rank_dtype]) + SCALE_BITS * n
    return LayerResult(Wq + E_r, bits, {"quant": q, "lowrank": lr, "alpha": alpha}, info={"rank": lr.rank})
