"""Round-to-nearest and the common result of the scalar solvers."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lopro.quant.grid import Grid, dequantize, find_params, group_bounds, quantize


@dataclass
class ScalarQuant:
    """Integer codes with per-(row, group) scale and zero; column j uses group g_idx[j]."""

    codes: torch.Tensor   # [m, n] integer-valued (uint8)
    scale: torch.Tensor   # [m, G] fp32
    zero: torch.Tensor    # [m, G] fp32
    g_idx: torch.Tensor   # [n] int64
    bits: int
    sym: bool

    def dequantize(self, cols: int = 1024) -> torch.Tensor:
        """The fp32 weight, `cols` columns at a time (whole, the broadcast scale and zero are 4 temporaries
        of the weight's size: 720 MB for a 7B down_proj)."""
        idx = self.g_idx.to(self.codes.device)
        m, n = self.codes.shape
        out = torch.empty(m, n, dtype=torch.float32, device=self.codes.device)
        for c in range(0, n, cols):
            j = idx[c:c + cols]
            out[:, c:c + cols] = dequantize(self.codes[:, c:c + cols].float(), self.scale[:, j], self.zero[:, j])
        return out

    @property
    def num_groups(self) -> int:
        return self.scale.shape[1]


def rtn_quantize(W: torch.Tensor, bits: int, group_size: int = -1, sym: bool = False,
                 mse: bool = False) -> ScalarQuant:
    """Round each group of columns to its own min-max (or clip-searched) grid."""
    grid = Grid(bits, sym, mse)
    W = W.detach().float()
    m, n = W.shape
    bounds = group_bounds(n, group_size)
    codes = torch.empty(m, n, dtype=torch.uint8, device=W.device)
    scale = torch.empty(m, len(bounds), device=W.device)
    zero = torch.empty_like(scale)
    g_idx = torch.empty(n, dtype=torch.long)
    for g, (s, e) in enumerate(bounds):
        sc, z = find_params(W[:, s:e], grid)
        codes[:, s:e] = quantize(W[:, s:e], sc[:, None], z[:, None], grid.maxq).to(torch.uint8)
        scale[:, g], zero[:, g], g_idx[s:e] = sc, z, g
    return ScalarQuant(codes, scale, zero, g_idx, bits, sym)
