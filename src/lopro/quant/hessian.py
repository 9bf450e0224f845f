"""Hessian preparation shared by the second-order solvers (GPTQ, GPTVQ)."""
from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager

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
    damping is multiplied by 10 and retried (logged), up to MAX_DAMP_RETRIES times. The factor is
    computed in one n x n buffer, the result's (upper_inverse_factor_), so the solve holds two n x n
    matrices (H and it; 2 x 485 MB for a 7B down_proj). With `refill` (a function returning H anew),
    H is the caller's scratch copy and is factored in its own buffer: one n x n matrix, and refill()
    for a retry. The bits do not depend on the thread count.
    """
    n = H.shape[0]
    # an fp64 H (hessian_dtype=fp64) is factored in fp64 and rounded to fp32 at the end
    if refill is not None and H.dtype == solve_dtype(H):
        work = _row_major_(H)  # the same bits as a fresh buffer: the products' kernels follow the layout
    else:
        refill, work = None, torch.empty(n, n, dtype=solve_dtype(H), device=H.device)
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
        if upper_inverse_factor_(work) and all_finite(work):
            if attempt:
                log.warning("Hessian needed damp_percent=%.3g (asked %.3g) to be positive definite",
                            damp, damp_percent)
            return work.to(torch.float32)  # row-major, as GPTQ's loops read it
        log.info("Cholesky failed with damp_percent=%.3g; retrying with 10x damping", damp)
        damp *= 10
    raise HessianError(
        f"Hessian of size {n} is not positive definite even with damp_percent={damp / 10:.3g}; "
        "check the calibration data (NaN/inf activations?) or raise --damp-percent")


@contextmanager
def _one_thread(device: torch.device):
    """Small LAPACK calls on one CPU thread: their last bits depend on the thread count."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def upper_inverse_factor_(A: torch.Tensor, block: int = 256) -> bool:
    """Overwrite the symmetric positive definite A with the upper U such that U^T U = A^-1; False if A is not.

    U is the upper Cholesky factor of A^-1 (what GPTQ's reference code gets from cholesky, cholesky_inverse
    and cholesky again), found without forming A^-1: A = V V^T with V upper (a Cholesky factorisation from
    the bottom-right corner), then U = V^-1. Both steps are blocked: the diagonal blocks are factored and
    inverted on one thread, everything else is matrix products, so the result has the same bits on any
    number of threads (LAPACK's potrf/potri do not: their blocking follows the threads). n^3 flops in all,
    against 4/3 n^3 for the three LAPACK calls; extra memory: two n x block panels. Only A's upper triangle is read.
    """
    n = A.shape[0]
    starts = list(range(0, n, block))
    eye = torch.eye(min(block, n), dtype=A.dtype, device=A.device)
    for k in reversed(range(len(starts))):  # A = V V^T, block columns right to left
        s, e = starts[k], min(starts[k] + block, n)
        with _one_thread(A.device):
            M, info = torch.linalg.cholesky_ex(A[s:e, s:e].flip(0, 1))  # D = J M M^T J, J M J upper
            if info.item() != 0:
                return False
            V22 = M.flip(0, 1)
            V22inv = torch.linalg.solve_triangular(V22, eye[:e - s, :e - s], upper=True)
        A[s:e, s:e] = V22
        if s:
            V12 = A[:s, s:e] @ V22inv.T  # A12 = V12 V22^T
            A[:s, s:e] = V12
            for c in starts[:k]:  # A11 -= V12 V12^T, upper block columns only
                ce = min(c + block, s)
                A[:ce, c:ce].addmm_(V12[:ce], V12[c:ce].T, alpha=-1)
    A.triu_()  # the lower triangle still held A
    for k, s in enumerate(starts):  # U = V^-1, block columns left to right: [[X, Y], [0, Z]]^-1
        e = min(s + block, n)
        with _one_thread(A.device):
            Zinv = torch.linalg.solve_triangular(A[s:e, s:e], eye[:e - s, :e - s], upper=True).triu_()
        if s:
            A[:s, s:e] = (A[:s, :s] @ A[:s, s:e]) @ Zinv  # A[:s, :s] already holds X^-1 (upper)
            A[:s, s:e].neg_()
        A[s:e, s:e] = Zinv
    return True


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


def _row_major_(A: torch.Tensor) -> torch.Tensor:
    """A's values laid out row-major in A's own buffer (returned as that view)."""
    if A.is_contiguous():
        return A
    if not A.T.is_contiguous():
        raise ValueError("a scratch Hessian must be a contiguous matrix or its transpose")
    return _transpose_(A.T)


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
