"""What every per-layer method receives and returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's input (n features)."""

    H: torch.Tensor        # (2/N) X^T X, [n, n], fp32 or fp64
    absmean: torch.Tensor  # mean_t |x_tj|, [n]
    tokens: int


@dataclass
class LayerResult:
    """A quantized layer: the weight it now computes, its storage cost and its stored parts.

    `weight` is the dense matrix the quantized layer is equivalent to (fake quantization);
    `parts` holds what a packed layer stores (codes, grids, low-rank factors, alpha, permutation,
    rotation), so that a QuantLinear can be built from it.
    """

    weight: torch.Tensor
    total_bits: float
    parts: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def effective_bits(self) -> float:
        m, n = self.weight.shape
        return self.total_bits / (m * n)


MethodFn = Callable[[torch.Tensor, LayerStats, Any], LayerResult]
