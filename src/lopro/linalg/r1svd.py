"""Low-rank factors: R1SVD (rank-1 sketch deflation, spec section 1) and an exact-SVD reference.

Both return a :class:`LowRank` ``A ≈ U diag(S) V`` (``V``'s rows are right singular vectors)
whose factors are already rounded to their storage format. Leading batch dims are supported:
``A`` of shape ``[..., m, n]`` gives ``U [..., m, r]``, ``S [..., r]``, ``V [..., r, n]``.

Storage rounding (``storage``):

- ``"fp32"``: everything fp32.
- ``"fp16"``: ``U``, ``V`` fp16 (unit vectors, unscaled), ``S`` fp16.
- ``"fp8"``: ``U``, ``V`` ``float8_e4m3fn``, ``S`` fp16. Each vector is multiplied by a power of
  two so that its RMS is about 1 (its max never above 448) before the cast, and the scales are
  folded into ``S``; unscaled unit vectors of length 4096 would sit in fp8's subnormal range.

With fp8/fp16, if the folded ``S`` would leave fp16's normal range, powers of two are moved
between ``S`` and the vectors (within limits) so that neither under- nor overflows.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

STORAGE_FORMATS = ("fp8", "fp16", "fp32")
SOLVERS = ("r1svd", "svd")

# the one table of factor storage: name -> (dtype of U and V, dtype of S); checkpoints store these
FACTOR_DTYPES = {
    "fp8": (torch.float8_e4m3fn, torch.float16),
    "fp16": (torch.float16, torch.float16),
    "fp32": (torch.float32, torch.float32),
}
_VECTOR_DTYPE = {k: v for k, (v, _) in FACTOR_DTYPES.items()}
_SIGMA_DTYPE = {k: s for k, (_, s) in FACTOR_DTYPES.items()}
# largest finite vector entry, and how many binades a vector may be scaled below its preferred
# scale to keep S from underflowing (fp8: keep the bulk of entries out of the subnormals)
_VECTOR_MAX = {"fp8": 448.0, "fp16": 65504.0}
_VECTOR_SLACK = {"fp8": 3, "fp16": 6}
_FP16_MIN_EXP, _FP16_MAX_EXP = -14, 14  # keep S within [2**-14, 2**15): normal fp16


@dataclass
class LowRank:
    """``A ≈ U diag(S) V`` with factors stored in ``storage`` precision."""

    U: torch.Tensor  # [..., m, r]
    S: torch.Tensor  # [..., r]
    V: torch.Tensor  # [..., r, n]
    storage: str = "fp32"

    def __post_init__(self) -> None:
        if self.storage not in STORAGE_FORMATS:
            raise ValueError(f"storage must be one of {STORAGE_FORMATS}, got {self.storage!r}")
        r = self.S.shape[-1] if self.S.ndim else -1
        if self.U.ndim < 2 or self.U.shape[-1] != r or self.V.ndim < 2 or self.V.shape[-2] != r:
            raise ValueError(
                f"LowRank shapes disagree: U {tuple(self.U.shape)}, S {tuple(self.S.shape)}, "
                f"V {tuple(self.V.shape)}"
            )

    @property
    def rank(self) -> int:
        return self.S.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dense matrix, ``(..., m, n)``."""
        return (*self.U.shape[:-1], self.V.shape[-1])

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``U diag(S) V``, computed in fp32 (fp64 if asked for) and returned in ``dtype``."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        us = self.U.to(work) * self.S.to(work).unsqueeze(-2)
        return torch.matmul(us, self.V.to(work)).to(dtype)

    def to(self, device: torch.device | str) -> "LowRank":
        return LowRank(self.U.to(device), self.S.to(device), self.V.to(device), self.storage)


# --------------------------------------------------------------------------- storage rounding

def _pow2_exponent(x: torch.Tensor) -> torch.Tensor:
    """``floor(log2(x))`` for positive ``x`` (0 elsewhere), as float."""
    return torch.where(x > 0, torch.floor(torch.log2(x.clamp_min(torch.finfo(x.dtype).tiny))), 0.0)


def _round_terms(
    u: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor, storage: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round rank-1 terms ``sigma u v^T`` (``u [..., m]``, ``sigma [...]``, ``v [..., n]``, fp32).

    Returns ``(u_q, s_q, v_q)`` in storage dtypes with ``u_q * s_q * v_q^T ≈ sigma u v^T``.
    """
    if storage == "fp32":
        return u, sigma, v
    vec_dtype, sig_dtype = _VECTOR_DTYPE[storage], _SIGMA_DTYPE[storage]
    vmax, slack = _VECTOR_MAX[storage], _VECTOR_SLACK[storage]

    def exponents(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amax = x.abs().amax(-1)
        hi = torch.where(amax > 0, _pow2_exponent(vmax / amax.clamp_min(1e-30)), 0.0)
        if storage == "fp8":  # prefer RMS ~ 1
            rms = x.norm(dim=-1) / math.sqrt(x.shape[-1])
            pref = torch.where(rms > 0, torch.round(-torch.log2(rms.clamp_min(1e-30))), 0.0)
        else:  # fp16 holds unit vectors as they are
            pref = torch.zeros_like(amax)
        return torch.minimum(pref, hi), hi

    eu, hu = exponents(u)
    ev, hv = exponents(v)
    # S = sigma * 2**-(eu + ev) must stay normal in fp16: shift binades where it would not.
    s_exp = _pow2_exponent(sigma) - (eu + ev)
    down = (_FP16_MIN_EXP - s_exp).clamp_min(0)  # shrink the vectors
    up = (s_exp - _FP16_MAX_EXP).clamp_min(0)  # grow the vectors, up to their max
    down_u = torch.minimum(torch.ceil(down / 2), torch.full_like(down, slack))
    down_v = torch.minimum(down - down_u, torch.full_like(down, slack))
    up_u = torch.minimum(torch.ceil(up / 2), hu - eu)
    up_v = torch.minimum(up - up_u, hv - ev)
    eu = eu - down_u + up_u
    ev = ev - down_v + up_v
    u_q = (u * torch.exp2(eu).unsqueeze(-1)).to(vec_dtype)
    v_q = (v * torch.exp2(ev).unsqueeze(-1)).to(vec_dtype)
    s_q = (sigma * torch.exp2(-(eu + ev))).to(sig_dtype)
    if not bool(torch.isfinite(s_q.float()).all()):
        raise ValueError(f"singular values too large for {storage} storage; use storage='fp32'")
    return u_q, s_q, v_q


def _empty(A32: torch.Tensor, storage: str) -> LowRank:
    *batch, m, n = A32.shape
    dev = A32.device
    return LowRank(
        U=torch.zeros(*batch, m, 0, device=dev).to(_VECTOR_DTYPE[storage]),
        S=torch.zeros(*batch, 0, device=dev).to(_SIGMA_DTYPE[storage]),
        V=torch.zeros(*batch, 0, n, device=dev).to(_VECTOR_DTYPE[storage]),
        storage=storage,
    )


def _check(A: torch.Tensor, rank: int, storage: str) -> torch.Tensor:
    if not isinstance(A, torch.Tensor) or A.ndim < 2 or not torch.is_floating_point(A):
        raise ValueError("A must be a floating tensor of shape [..., m, n]")
    if storage not in STORAGE_FORMATS:
        raise ValueError(f"storage must be one of {STORAGE_FORMATS}, got {storage!r}")
    m, n = A.shape[-2:]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= min(m, n):
        raise ValueError(f"rank must be an int in [0, min(m, n) = {min(m, n)}], got {rank!r}")
    return A.to(torch.float32)


def _check_finite(x: torch.Tensor) -> None:
    # A NaN/Inf in A propagates into any product with Gaussian vectors or into the singular
    # values, so checking those (small) results avoids an extra pass over A.
    if not bool(torch.isfinite(x).all()):
        raise ValueError("A contains NaN or Inf")


# --------------------------------------------------------------------------- solvers

def r1svd(
    A: torch.Tensor,
    rank: int,
    iters: int = 2,
    seed: int = 0,
    storage: str = "fp32",
    return_residual: bool = False,
) -> LowRank | tuple[LowRank, torch.Tensor]:
    """Rank-``rank`` R1SVD of ``A`` (``[..., m, n]``), spec section 1, computed in fp32.

    Per term: a fresh Gaussian ``s`` (row ``j`` of one ``[rank, batch, n]`` draw from a CPU
    ``torch.Generator`` seeded with ``seed``, so CPU and CUDA draw the same vectors and the first
    ``k`` terms do not depend on ``rank``), ``p = R s``, ``iters`` steps ``p = R (R^T p)`` with
    renormalisation, ``u = p/|p|``, ``b = R^T u``, ``sigma = |b|``, ``v = b/sigma``; the term is
    rounded to ``storage`` and the *rounded* term deflates ``R``. Deflation is implicit
    (``R x = A x - U_q S_q V_q x``), so each term costs ``2 iters + 2`` products with ``A``,
    ``O(m n)`` (the ``A s`` of all terms share one matmul), and ``A`` is never copied or modified. With ``return_residual`` also returns
    ``R = A - lowrank.dense()`` (fp32), the matrix the next term would have seen.
    """
    A32 = _check(A, rank, storage)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    *batch, m, n = A32.shape
    if rank == 0:
        out = _empty(A32, storage)
        return (out, A32.clone()) if return_residual else out

    mat = A32.reshape(-1, m, n)
    nb = mat.shape[0]
    dev = mat.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # dequantised stored factors (fp32): U_f = U_q * S_q, V_f = V_q; R = A - U_f V_f
    u_f = torch.zeros(nb, m, rank, device=dev, dtype=torch.float32)
    v_f = torch.zeros(nb, rank, n, device=dev, dtype=torch.float32)
    us_q, ss_q, vs_q = [], [], []
    tiny = torch.finfo(torch.float32).tiny

    def r_mul(x: torch.Tensor, j: int) -> torch.Tensor:  # R x, x [nb, n, 1]
        y = torch.bmm(mat, x)
        return y if j == 0 else y - torch.bmm(u_f[:, :, :j], torch.bmm(v_f[:, :j], x))

    def rt_mul(y: torch.Tensor, j: int) -> torch.Tensor:  # (R^T y)^T, y [nb, 1, m]
        x = torch.bmm(y, mat)
        return x if j == 0 else x - torch.bmm(torch.bmm(y, u_f[:, :, :j]), v_f[:, :j])

    # The test vectors do not depend on the deflation, so all the products A s are one matmul
    # (one pass over A instead of one per term); the deflation is applied per term below.
    # Drawn term-major, so the first k terms do not depend on ``rank`` (prefix property).
    sketch = torch.randn(rank, nb, n, generator=gen, dtype=torch.float32).permute(1, 2, 0)
    sketch = sketch.to(dev)
    a_sketch = torch.bmm(mat, sketch)
    _check_finite(a_sketch)
    for j in range(rank):
        p = a_sketch[:, :, j : j + 1]
        if j:
            p = p - torch.bmm(u_f[:, :, :j], torch.bmm(v_f[:, :j], sketch[:, :, j : j + 1]))
        for _ in range(iters):
            p = p / p.norm(dim=1, keepdim=True).clamp_min(tiny)
            p = r_mul(rt_mul(p.transpose(1, 2), j).transpose(1, 2), j)
        u = p / p.norm(dim=1, keepdim=True).clamp_min(tiny)  # [nb, m, 1]
        b = rt_mul(u.transpose(1, 2), j)  # [nb, 1, n]
        sigma = b.norm(dim=2, keepdim=True)
        v = b / sigma.clamp_min(tiny)
        u_q, s_q, v_q = _round_terms(u[:, :, 0], sigma[:, 0, 0], v[:, 0, :], storage)
        us_q.append(u_q)
        ss_q.append(s_q)
        vs_q.append(v_q)
        u_f[:, :, j] = u_q.float() * s_q.float().unsqueeze(-1)
        v_f[:, j, :] = v_q.float()
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("r1svd term %d: sigma %s", j, sigma.flatten()[:4].tolist())

    out = LowRank(
        U=torch.stack(us_q, dim=-1).reshape(*batch, m, rank),
        S=torch.stack(ss_q, dim=-1).reshape(*batch, rank),
        V=torch.stack(vs_q, dim=-2).reshape(*batch, rank, n),
        storage=storage,
    )
    if not return_residual:
        return out
    residual = torch.baddbmm(mat, u_f, v_f, alpha=-1.0).reshape(*batch, m, n)
    return out, residual


def svd_lowrank_exact(A: torch.Tensor, rank: int, storage: str = "fp32") -> LowRank:
    """Truncated SVD via ``torch.linalg.svd`` (fp32), rounded once to ``storage``."""
    A32 = _check(A, rank, storage)
    if rank == 0:
        return _empty(A32, storage)
    _check_finite(A32)
    U, S, Vh = torch.linalg.svd(A32, full_matrices=False)
    u = U[..., :rank].transpose(-1, -2)  # [..., r, m]
    u_q, s_q, v_q = _round_terms(u, S[..., :rank], Vh[..., :rank, :], storage)
    return LowRank(U=u_q.transpose(-1, -2), S=s_q, V=v_q, storage=storage)


def lowrank(
    A: torch.Tensor,
    rank: int,
    solver: str = "r1svd",
    iters: int = 2,
    seed: int = 0,
    storage: str = "fp32",
) -> LowRank:
    """Dispatch to :func:`r1svd` or :func:`svd_lowrank_exact` (``iters``/``seed`` unused there)."""
    if solver == "r1svd":
        return r1svd(A, rank, iters=iters, seed=seed, storage=storage)
    if solver == "svd":
        return svd_lowrank_exact(A, rank, storage=storage)
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
