"""The plain form every exporter writes: an integer residual, and the error a refusal raises."""
from __future__ import annotations

from dataclasses import dataclass

import torch


class ExportError(ValueError):
    """A checkpoint (or one of its layers) cannot be written exactly in the asked format."""


@dataclass
class ScalarLayer:
    """An integer residual: ``W[i, j] = scales[i, g] * (codes[i, j] - zeros[i, g])`` with ``g = g_idx[j]``."""

    name: str
    bits: int
    sym: bool
    codes: torch.Tensor   # [m, n] uint8, original column order
    scales: torch.Tensor  # [m, G] fp16
    zeros: torch.Tensor   # [m, G] int16
    g_idx: torch.Tensor   # [n] int64
    bias: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def num_groups(self) -> int:
        return self.scales.shape[1]

    def group_size(self) -> int:
        """Columns of group 0 (every group but a shorter last one has as many)."""
        return int((self.g_idx == 0).sum())

    def contiguous_group_size(self) -> int | None:
        """gs when column j is in group j // gs (the last group may be shorter), else None."""
        n, gs = self.shape[1], self.group_size()
        ok = gs > 0 and -(-n // gs) == self.num_groups and torch.equal(self.g_idx, torch.arange(n) // gs)
        return gs if ok else None

    def dequantize(self) -> torch.Tensor:
        s = self.scales.float()[:, self.g_idx]
        z = self.zeros.float()[:, self.g_idx]
        return s * (self.codes.float() - z)
