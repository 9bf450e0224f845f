"""What every per-layer method receives and returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lopro import formats


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's input (n features)."""

    H: torch.Tensor        # (2/N) X^T X, [n, n], fp32 or fp64
    absmean: torch.Tensor  # mean_t |x_tj|, [n]
    tokens: int


@dataclass
class LayerResult:
    """A quantized layer: the dense weight it now computes and the parts a packed layer stores.

    ``weight`` is the [m, n] matrix the quantized layer is equivalent to (fake quantization); the
    layer computes ``W_r x + Ŵq (Q^T P^T x)`` with ``W_r = U S V diag(alpha)^-1`` (``lowrank``,
    ``alpha``), ``Ŵq`` the ``residual`` (ScalarQuant or VQResult), ``P`` the permutation ``perm`` and
    ``Q`` the block ``rotation``. Its storage is counted by lopro.formats, like the checkpoint's.
    """

    weight: torch.Tensor
    residual: Any = None        # lopro.quant.rtn.ScalarQuant | lopro.quant.gptvq.VQResult | None
    lowrank: Any = None         # lopro.linalg.LowRank | None
    alpha: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    rotation: Any = None        # lopro.linalg.BlockRotation | None
    info: dict[str, Any] = field(default_factory=dict)

    def spec(self, bias: bool = False) -> dict:
        return formats.spec_of(self, bias)

    @property
    def total_bits(self) -> int:
        return formats.storage_bits(self.spec())

    def effective_bits(self) -> float:
        return formats.effective_bits(self.spec())
