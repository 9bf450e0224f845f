"""GPTQ (Frantar et al. 2023): column-by-column rounding with inverse-Hessian error feedback.

A pure solver: `gptq_quantize(W, H, ...)` returns the codes; no hooks, no model, no device logic.
"""
from __future__ import annotations

import torch

from lopro.quant import hessian
from lopro.quant.grid import Grid, find_params, quantize
from lopro.quant.rtn import ScalarQuant


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = -1, sym: bool = False,
                  mse: bool = False, act_order: bool = False, damp_percent: float = 0.01,
                  blocksize: int = 128, refill=None) -> ScalarQuant:
    """Quantize W ([m, n]) against the proxy Hessian H ([n, n]) of its inputs.

    Groups are contiguous in processing order (act-order permutes first, as the reference code does),
    and the result is returned in the original column order with `g_idx` naming each column's group.
    `refill` (a function returning H anew): H is the caller's scratch copy, factored in its own buffer
    (hessian.inverse_cholesky), so that a rotated Hessian costs no second n x n matrix.
    """
    grid = Grid(bits, sym, mse)
    W, H, dead, _ = hessian.prepare(W, H, damp_percent, with_inverse=False)
    m, n = W.shape
    perm = torch.arange(n, device=W.device)
    if act_order:  # (indexing with the identity would copy H twice for nothing)
        perm = torch.argsort(torch.where(dead, 1.0, torch.diag(H)), descending=True)  # dead columns count as H_jj = 1
        W, H, dead = W[:, perm], H[perm][:, perm], dead[perm]
    Hinv = hessian.inverse_cholesky(H, damp_percent, dead, None if act_order else refill)
    del H
    g = n if group_size == -1 else group_size

    codes = torch.zeros(m, n, dtype=torch.uint8, device=W.device)
    scales, zeros = [], []
    scale = zero = None
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # a new group starts: fit its grid on the error-updated weights
                seg = W1[:, i:i + g]
                if seg.shape[1] < g and i2 < n:  # the group runs past this lazy block
                    seg = torch.cat([seg, W[:, i2:i2 + g - seg.shape[1]]], dim=1)
                scale, zero = find_params(seg, grid)
                scales.append(scale)
                zeros.append(zero)
            w, d = W1[:, i], Hinv1[i, i]
            q = quantize(w, scale, zero, grid.maxq)
            codes[:, col] = q.to(torch.uint8)
            err = (w - scale * (q - zero)) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    g_idx = (torch.arange(n, device=W.device) // g)[inv].cpu()
    return ScalarQuant(codes[:, inv], torch.stack(scales, 1), torch.stack(zeros, 1), g_idx, bits, sym)
