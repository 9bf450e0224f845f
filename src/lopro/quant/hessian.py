"""Hessian preparation shared by the second-order solvers (GPTQ, GPTVQ)."""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 6


class HessianError(ValueError):
    """The Hessian cannot be factorised even with heavy damping."""


def solve_dtype(H: torch.Tensor) -> torch.dtype:
    """The dtype a Hessian is worked in: fp64 when accumulated in fp64 (hessian_dtype=fp64), else fp32."""
    return torch.float64 if H.dtype == torch.float64 else torch.float32


def dead_columns(H: torch.Tensor) -> torch.Tensor:
    """Columns that never saw a non-zero input: their weights cannot matter."""
    return torch.diag(H) == 0


def inverse_cholesky(H: torch.Tensor, damp_percent: float = 0.01, dead: torch.Tensor | None = None,
                     refill: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1, as GPTQ uses it; H is not modified (but see `refill`).

    `dead` columns (no input reached them) get H_jj = 1 first. If the factorisation fails, the
    damping is multiplied by 10 and retried (logged), up to MAX_DAMP_RETRIES times. Everything is
    factored in one n x n buffer, the result's, laid out column-major as LAPACK works (a row-major
    `out=` costs torch an n x n proxy per call), so the solve holds two n x n matrices (H and it;
    2 x 485 MB for a 7B down_proj). With `refill` (a function returning H anew), H is the caller's
    scratch copy and is factored in its own buffer: one n x n matrix, and refill() for a retry.
    """
    n = H.shape[0]
    # an fp64 H (hessian_dtype=fp64) is factored in fp64 and rounded to fp32 at the end: LAPACK's Cholesky
    # differs in its last bits between thread counts, and fp64's differences vanish in that rounding
    if refill is not None and H.dtype == solve_dtype(H):
        work = _column_major_(H)
    else:
        refill, work = None, torch.empty(n, n, dtype=solve_dtype(H), device=H.device).T
    info = torch.empty((), dtype=torch.int32, device=H.device)
    damp = damp_percent
    diag = mean_diag = None
    for attempt in range(MAX_DAMP_RETRIES + 1):
        if refill is None:
            work.copy_(H)
        elif attempt:
            work.copy_(refill())
        if dead is not None:
            work[dead, dead] = 1.0
        if diag is None:
            diag = torch.diag(work).clone()
            mean_diag = torch.mean(diag).clamp_min(1e-8)
        work.diagonal().copy_(diag).add_(damp * mean_diag)
        torch.linalg.cholesky_ex(work, out=(work, info))
        if info.item() == 0:
            torch.cholesky_inverse(work, out=work)
            torch.linalg.cholesky_ex(work, upper=True, out=(work, info))
            if info.item() == 0 and all_finite(work):
                if attempt:
                    log.warning("Hessian needed damp_percent=%.3g (asked %.3g) to be positive definite",
                                damp, damp_percent)
                return _transpose_(work.T).to(torch.float32)  # row-major, as GPTQ's loops read it
        log.info("Cholesky failed with damp_percent=%.3g; retrying with 10x damping", damp)
        damp *= 10
    raise HessianError(
        f"Hessian of size {n} is not positive definite even with damp_percent={damp / 10:.3g}; "
        "check the calibration data (NaN/inf activations?) or raise --damp-percent")


def all_finite(A: torch.Tensor) -> bool:
    """No NaN or inf in A, without the n x n boolean temporary of isfinite(A).all() (max and min carry NaN)."""
    return A.numel() == 0 or bool(torch.isfinite(A.amax()) & torch.isfinite(A.amin()))


def _transpose_(A: torch.Tensor, tile: int = 512) -> torch.Tensor:
    """A square row-major A transposed in its own buffer, a tile pair at a time; returns A."""
    n = A.shape[0]
    for i in range(0, n, tile):
        for j in range(i, n, tile):
            t = A[i:i + tile, j:j + tile].clone()
            if i != j:
                A[i:i + tile, j:j + tile] = A[j:j + tile, i:i + tile].T
            A[j:j + tile, i:i + tile] = t.T
    return A


def _column_major_(A: torch.Tensor) -> torch.Tensor:
    """A's values laid out column-major in A's own buffer (returned as that view)."""
    if A.T.is_contiguous():
        return A
    if not A.is_contiguous():
        raise ValueError("a scratch Hessian must be a contiguous matrix or its transpose")
    return _transpose_(A).T


def prepare(W: torch.Tensor, H: torch.Tensor, damp_percent: float = 0.01, with_inverse: bool = True):
    """(fp32 copy of W with dead columns zeroed, H in fp32, or fp64 when it is (not copied when it is either),
    the dead columns, and the inverse-Cholesky factor (fp32) or None)."""
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(device=W.device, dtype=solve_dtype(H))
    if not all_finite(H):
        raise HessianError("Hessian contains NaN or inf; the calibration activations are not finite")
    dead = dead_columns(H)
    W[:, dead] = 0.0
    return W, H, dead, (inverse_cholesky(H, damp_percent, dead) if with_inverse else None)
