"""Uniform integer grids: per-row scale/zero for a group of columns, quantize, dequantize.

Asymmetric: q = clamp(round(w / s) + z, 0, 2^b - 1), w ≈ s (q - z).
Symmetric: the same with z fixed at the grid's midpoint (GPTQ's convention).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 ... 0.5
MSE_NORM = 2.4  # the exponent GPTQ's MSE grid search uses


@dataclass(frozen=True)
class Grid:
    bits: int
    sym: bool = False
    mse: bool = False

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1


def to_storage(scale: torch.Tensor) -> torch.Tensor:
    """Scales (and alpha) are stored in fp16: compute with the stored value so packed == fake-quantized."""
    return scale.to(torch.float16).float()


def params_from_range(xmin: torch.Tensor, xmax: torch.Tensor, grid: Grid):
    """Scale and zero (both [rows]) covering [xmin, xmax], which must bracket 0."""
    if grid.sym:
        amax = torch.maximum(xmin.abs(), xmax)
        xmin, xmax = -amax, amax
    span = xmax - xmin
    flat = span <= 0
    scale = torch.where(flat, torch.ones_like(span), span / grid.maxq)
    scale = to_storage(scale)
    if grid.sym:
        zero = torch.full_like(scale, (grid.maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def find_params(w: torch.Tensor, grid: Grid):
    """Per-row scale and zero for the columns of `w` ([rows, cols]); optional clip search."""
    w = w.float()
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    scale, zero = params_from_range(xmin, xmax, grid)
    if not grid.mse:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for p in CLIP_GRID:
        s, z = params_from_range(p * xmin, p * xmax, grid)
        err = (dequantize(quantize(w, s[:, None], z[:, None], grid.maxq), s[:, None], z[:, None]) - w)
        err = err.abs().pow(MSE_NORM).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (float tensor holding integers) for `w`, broadcasting scale/zero."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def group_bounds(n: int, group_size: int):
    """(start, end) column ranges; the last group is shorter when group_size does not divide n."""
    g = n if group_size == -1 else group_size
    return [(s, min(s + g, n)) for s in range(0, n, g)]
