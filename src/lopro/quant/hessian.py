"""Hessian preparation shared by the second-order solvers (GPTQ, GPTVQ)."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 6


class HessianError(ValueError):
    """The Hessian cannot be factorised even with heavy damping."""


def dead_columns(H: torch.Tensor) -> torch.Tensor:
    """Columns that never saw a non-zero input: their weights cannot matter."""
    return torch.diag(H) == 0


def inverse_cholesky(H: torch.Tensor, damp_percent: float = 0.01, overwrite: bool = False) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1, as GPTQ uses it.

    Dead columns must already have H_jj = 1. If the factorisation fails, the damping is
    multiplied by 10 and retried (logged), up to MAX_DAMP_RETRIES times. With `overwrite`, the
    damping is added to H itself (an fp32 H the caller no longer needs), which saves one n x n copy.
    """
    H = H.to(torch.float32)
    n = H.shape[0]
    mean_diag = torch.mean(torch.diag(H)).clamp_min(1e-8)
    damp = damp_percent
    diag = torch.diag(H).clone()
    for attempt in range(MAX_DAMP_RETRIES + 1):
        # at most three n x n matrices alive at once (7B down_proj: 3 x 485 MB): each is freed when used
        Hd = H if overwrite and H.dtype == torch.float32 else H.clone()
        Hd.diagonal().copy_(diag).add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if info.item() == 0 and torch.isfinite(U).all():
                if attempt:
                    log.warning("Hessian needed damp_percent=%.3g (asked %.3g) to be positive definite",
                                damp, damp_percent)
                return U
        log.info("Cholesky failed with damp_percent=%.3g; retrying with 10x damping", damp)
        damp *= 10
    raise HessianError(
        f"Hessian of size {n} is not positive definite even with damp_percent={damp / 10:.3g}; "
        "check the calibration data (NaN/inf activations?) or raise --damp-percent")


def prepare(W: torch.Tensor, H: torch.Tensor, damp_percent: float = 0.01, with_inverse: bool = True):
    """fp32 copies of W and H with dead columns zeroed, plus the inverse-Cholesky factor (or None)."""
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()
    if not torch.isfinite(H).all():
        raise HessianError("Hessian contains NaN or inf; the calibration activations are not finite")
    dead = dead_columns(H)
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H, (inverse_cholesky(H.clone(), damp_percent, overwrite=True) if with_inverse else None)
