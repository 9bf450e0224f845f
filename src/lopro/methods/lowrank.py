"""Low-rank + quantized-residual recipes: LoPRo, its ablation ladder, and LQER.

Every recipe computes W ≈ W_r + Ŵq Q^T P^T, with W_r = U Σ V diag(alpha)^-1 a scaled low rank of W
(LQER instead takes the low rank of the quantization error), P a column permutation and Q a
(block) Walsh-Hadamard rotation; the residual is quantized against H' = Q^T P^T H P Q.
"""
from __future__ import annotations

import torch

from lopro.linalg import BlockRotation
from lopro.methods.base import LayerResult
from lopro.methods.options import RankOptions, VQOptions
from lopro.methods.rank import input_scaling, scaled_lowrank, vq_config
from lopro.methods.registry import register
from lopro.quant.gptq import gptq_quantize
from lopro.quant.hessian import solve_dtype
from lopro.quant.rtn import rtn_quantize


def salience_permutation(H: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Columns by H_jj / mean_i |R_ij|, most important first (replaces GPTQ's act-order)."""
    importance = torch.diag(H) / R.abs().mean(dim=0).clamp_min(1e-12)
    return torch.argsort(importance, descending=True)


def rotate_hessian(H: torch.Tensor, rot: BlockRotation, rows: int = 1024, inplace: bool = False) -> torch.Tensor:
    """Q^T H Q for symmetric H, ``rot.apply(rot.apply(H).T)`` computed `rows` rows at a time.

    The transform works on each row alone, so slices give the same bits as the whole matrix, and
    with `inplace` (H is the caller's own copy) the result lives in H's buffer (returned as a
    transposed view): no n x n temporary, where the whole-matrix butterfly needs several (a 7B
    down_proj's are 485 MB each)."""
    A = H if inplace else H.clone()
    n = A.shape[0]
    for r in range(0, n, rows):  # A = H Q, row by row
        A[r:r + rows] = rot.apply(A[r:r + rows])
    for c in range(0, n, rows):  # row i of Q^T H Q is rot.apply of column i of A: stored as column i
        A[:, c:c + rows] = rot.apply(A[:, c:c + rows].T).T
    return A.T


def permute_hessian(H: torch.Tensor, perm: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """``H[perm][:, perm]`` (the same bits) in one new n x n buffer, where chained indexing holds two:
    the columns are gathered whole, then the rows a slab of columns at a time."""
    A = H.index_select(1, perm)
    for c in range(0, A.shape[0], rows):  # column c of the result is column c of A gathered by perm
        A[:, c:c + rows] = A[:, c:c + rows].index_select(0, perm)
    return A


def quantize_residual(R: torch.Tensor, H: torch.Tensor, cfg, solver: str, refill=None):
    """Scalar RTN or GPTQ, or GPTVQ (`solver="gptvq"`); all results expose dequantize/storage_bits.
    `refill`: H is the caller's scratch copy, see gptq_quantize."""
    if solver == "rtn":
        return rtn_quantize(R, cfg.bits, cfg.group_size, cfg.sym, cfg.mse)
    if solver == "gptvq":
        from lopro.quant.gptvq import gptvq_quantize

        return gptvq_quantize(R, H, vq_config(cfg, R.shape[1]))
    return gptq_quantize(R, H, cfg.bits, cfg.group_size, cfg.sym, cfg.mse, act_order=False,
                         damp_percent=cfg.damp_percent, blocksize=cfg.blocksize, refill=refill)


def lowrank_residual(W, stats, cfg, solver: str = "gptq", rotation: str = "none", permute: bool = False):
    """The shared recipe; `rotation` is "none", "full" or "block" (b_I identity + b_H Hadamard blocks)."""
    n = W.shape[1]
    H = stats.H.to(W.device, solve_dtype(stats.H))
    alpha = input_scaling(stats.absmean.to(W.device))
    lr, W_r, _ = scaled_lowrank(W, alpha, cfg)
    R = W - W_r
    perm = salience_permutation(H, R) if permute else None
    rot = None
    if rotation == "full":
        rot = BlockRotation.full(n)
    elif rotation == "block":
        rot = BlockRotation(n, cfg.block_identity, cfg.block_hadamard)
    if perm is not None:
        R = R[:, perm]
    if rot is not None:
        R = rot.apply(R)
    refill = None
    if perm is not None or rot is not None:  # H' = Q^T P^T H P Q in one n x n buffer of its own, which GPTQ
        source = H                             # factors in place (refilled from the statistics for a retry)

        def rotated() -> torch.Tensor:
            A = permute_hessian(source, perm) if perm is not None else source.clone()
            return rotate_hessian(A, rot, inplace=True) if rot is not None else A

        H, refill = rotated(), rotated
    q = quantize_residual(R, H, cfg, solver, refill)
    del R, H
    residual = q.dequantize()
    if rot is not None:
        residual = rot.apply_transpose(residual)
    if perm is not None:
        residual = residual[:, torch.argsort(perm)]
    return LayerResult(W_r.add_(residual), residual=q, lowrank=lr, alpha=alpha, perm=perm, rotation=rot,
                       info={"rank": lr.rank})


@register("lowrank-rtn", lowrank=True, options=(RankOptions,))
def lowrank_rtn(W, stats, cfg) -> LayerResult:
    """Ablation: scaled low rank, then the residual rounded to nearest."""
    return lowrank_residual(W, stats, cfg, solver="rtn")


@register("lowrank-gptq", lowrank=True, options=(RankOptions,))
def lowrank_gptq(W, stats, cfg) -> LayerResult:
    """Ablation: scaled low rank, then the residual quantized by GPTQ."""
    return lowrank_residual(W, stats, cfg)


@register("lowrank-gptq-hadamard", lowrank=True, options=(RankOptions,))
def lowrank_gptq_hadamard(W, stats, cfg) -> LayerResult:
    """Ablation: scaled low rank, then GPTQ on the residual after a full Walsh-Hadamard rotation."""
    return lowrank_residual(W, stats, cfg, rotation="full")


@register("lopro", lowrank=True, options=(RankOptions,), stores_permutation=True)
def lopro(W, stats, cfg) -> LayerResult:
    """LoPRo: scaled low rank (R1SVD), then GPTQ on the permuted, block-Hadamard-rotated residual."""
    return lowrank_residual(W, stats, cfg, rotation="block", permute=True)


@register("lopro-v", lowrank=True, options=(RankOptions, VQOptions), residual="vq",
          stores_permutation=True)
def lopro_v(W, stats, cfg) -> LayerResult:
    """LoPRo with GPTVQ (2-D vectors, 8-bit codebooks) on the permuted, rotated residual."""
    return lowrank_residual(W, stats, cfg, solver="gptvq", rotation="block", permute=True)


@register("gptvq", options=(VQOptions,), residual="vq")
def gptvq(W, stats, cfg) -> LayerResult:
    """Plain GPTVQ (no low rank, no rotation); cfg.group_size is not used (codebook groups are)."""
    q = quantize_residual(W, stats.H, cfg, "gptvq")
    return LayerResult(q.dequantize(), residual=q)


@register("lqer", lowrank=True, options=(RankOptions,))
def lqer(W, stats, cfg) -> LayerResult:
    """GPTQ first, then a scaled low rank of the quantization error (the form LoPRo argues against)."""
    q = gptq_quantize(W, stats.H, cfg.bits, cfg.group_size, cfg.sym, cfg.mse, cfg.desc_act, cfg.damp_percent,
                      cfg.blocksize)
    Wq = q.dequantize()
    alpha = input_scaling(stats.absmean.to(W.device))
    lr, E_r, _ = scaled_lowrank(W - Wq, alpha, cfg)
    return LayerResult(Wq + E_r, residual=q, lowrank=lr, alpha=alpha, info={"rank": lr.rank})
