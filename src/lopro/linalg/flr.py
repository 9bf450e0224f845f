"""R1-FLR (FLRQ, spec section 3): a low rank whose rank each matrix chooses for itself.

Rank-1 sketch terms (the R1SVD step of spec section 1) are extracted one at a time from an explicit
residual ``R`` (deflated by the *stored*, rounded term, as :func:`lopro.linalg.r1svd` does), and after
each term ``r`` the amax of the residual decides whether the term was worth its storage:

- **precision**: the gain ``q = (d + log2(w0 / w_r)) / d`` (``w0 = amax|A|``, ``w_r = amax|R|``) is
  below the size growth ``k = 1 + f r (m + n) / (d m n)`` (``f`` the factor bits: 16 for fp16, as
  in the paper; note ``k > q`` reads ``log2(w0 / w_r) < f r (m + n) / (m n)``, independent of ``d``);
- **budget**: ``k > 1 + budget_x`` (checked before a term is computed: the outcome is the same);
- **flat**: the mean fractional amax drop over the last ``flat_window`` terms is below
  ``flat_threshold``.

The term that triggers a stop is dropped. The test vectors are the same as :func:`r1svd`'s (one
``[max_rank, n]`` draw from a CPU generator seeded with ``seed``), so with no rule active
``flexible_rank(A, d, max_rank=r, rules=())`` equals ``r1svd(A, r)`` up to rounding order.
"""

from __future__ import annotations

import math
import time

import torch

from lopro.linalg.r1svd import _VECTOR_DTYPE, STORAGE_FORMATS, LowRank, _empty, _round_terms

RULES = ("precision", "budget", "flat")


def factor_bits(storage: str) -> int:
    """Bits of one stored entry of ``U`` or ``V``."""
    return torch.finfo(_VECTOR_DTYPE[storage]).bits


def size_growth(rank: int, m: int, n: int, bits: int, storage: str = "fp16") -> float:
    """``k = 1 + f r (m + n) / (d m n)``: the layer's size relative to its ``d``-bit codes alone."""
    return 1 + factor_bits(storage) * rank * (m + n) / (bits * m * n)


def precision_gain(w0: float, w: float, bits: int) -> float:
    """``q = (d + log2(w0 / w)) / d``; infinite when the residual is exactly zero."""
    return math.inf if w == 0 else (bits + math.log2(w0 / w)) / bits


def _amax(R: torch.Tensor) -> float:
    """max |R| (aminmax is the fastest full reduction on CPU: no temporary, one pass)."""
    lo, hi = torch.aminmax(R)
    return max(-lo.item(), hi.item())


def _sketch_term(R: torch.Tensor, s: torch.Tensor, iters: int):
    """One rank-1 sketch of ``R`` (spec section 1): ``u``, ``sigma``, ``v`` in fp32."""
    tiny = torch.finfo(torch.float32).tiny
    p = R @ s
    for _ in range(iters):
        p = p / p.norm().clamp_min(tiny)
        p = R @ (R.T @ p)
    u = p / p.norm().clamp_min(tiny)
    b = R.T @ u
    sigma = b.norm()
    return u, sigma, b / sigma.clamp_min(tiny)


def flexible_rank(A: torch.Tensor, bits: int, max_rank: int = 128, budget_x: float = 0.2, flat_window: int = 4,
                  flat_threshold: float = 1e-3, iters: int = 2, seed: int = 0, storage: str = "fp16",
                  rules: tuple[str, ...] = RULES) -> tuple[LowRank, dict]:
    """R1-FLR of ``A`` (``[m, n]``, typically the alpha-scaled weight) for a ``bits``-bit residual.

    Returns the low rank (factors rounded to ``storage``) and ``info``: ``rank``, ``stop_rule``
    (one of ``RULES``, or ``"max_rank"`` when ``min(max_rank, m, n)`` terms were kept, ``"exact"``
    when the residual became zero, ``"zero"`` for a zero matrix), ``amax`` (``w0 ... w_r`` of the
    kept terms), ``q`` and ``k`` at the chosen rank, and ``seconds``.
    """
    if not isinstance(A, torch.Tensor) or A.ndim != 2 or not torch.is_floating_point(A):
        raise ValueError("A must be a floating tensor of shape [m, n]")
    if storage not in STORAGE_FORMATS:
        raise ValueError(f"storage must be one of {STORAGE_FORMATS}, got {storage!r}")
    unknown = set(rules) - set(RULES)
    if unknown:
        raise ValueError(f"unknown stopping rules {sorted(unknown)}; choose from {RULES}")
    if bits < 1 or max_rank < 0 or iters < 0 or flat_window < 1:
        raise ValueError(f"need bits >= 1, max_rank >= 0, iters >= 0, flat_window >= 1; got {bits}, {max_rank}, "
                         f"{iters}, {flat_window}")
    t0 = time.perf_counter()
    R = A.detach().to(torch.float32).clone()
    m, n = R.shape
    if not bool(torch.isfinite(R).all()):
        raise ValueError("A contains NaN or Inf")
    cap = min(max_rank, m, n)
    w0 = _amax(R) if R.numel() else 0.0
    amax, us, ss, vs = [w0], [], [], []
    rule = "zero" if w0 == 0 else "max_rank"
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sketch = torch.randn(cap, n, generator=gen, dtype=torch.float32).to(R.device) if w0 > 0 else None
    for j in range(cap if w0 > 0 else 0):
        r = j + 1
        if "budget" in rules and size_growth(r, m, n, bits, storage) > 1 + budget_x:
            rule = "budget"
            break
        u, sigma, v = _sketch_term(R, sketch[j], iters)
        u_q, s_q, v_q = _round_terms(u[None], sigma[None], v[None], storage)
        R.addr_(u_q[0].float() * s_q[0].float(), v_q[0].float(), alpha=-1.0)  # R is ours: no undo on a stop
        w = _amax(R)
        if "precision" in rules and size_growth(r, m, n, bits, storage) > precision_gain(w0, w, bits):
            rule = "precision"
            break
        if "flat" in rules and r >= flat_window:
            hist = amax[-flat_window:] + [w]
            drops = [(a - b) / a for a, b in zip(hist, hist[1:])]
            if sum(drops) / flat_window < flat_threshold:
                rule = "flat"
                break
        amax.append(w)
        us.append(u_q[0])
        ss.append(s_q[0])
        vs.append(v_q[0])
        if w == 0:
            rule = "exact"
            break
    rank = len(ss)
    if rank:
        lr = LowRank(U=torch.stack(us, -1), S=torch.stack(ss), V=torch.stack(vs), storage=storage)
    else:
        lr = _empty(R, storage)
    info = {"rank": rank, "stop_rule": rule, "amax": amax, "q": precision_gain(w0, amax[-1], bits) if w0 else 1.0,
            "k": size_growth(rank, m, n, bits, storage), "seconds": time.perf_counter() - t0}
    return lr, info
