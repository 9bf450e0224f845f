"""Hadamard matrices, the fast Hadamard transform and LoPRo's partial block rotation.

Canonical construction (convention ``HADAMARD_CONVENTION``): a size ``n`` is written as
``n = h * 2**k`` with the smallest base order ``h`` in ``{1} ∪ SMALL_ORDERS``; the matrix is
``H_n = H_h ⊗ H_{2^k} / sqrt(n)``, with ``H_{2^k}`` Sylvester's (entry ``(-1)**popcount(i & j)``)
and ``H_h`` a Paley matrix (Paley I for a prime power ``q = h - 1 ≡ 3 mod 4``, preferred; else
Paley II for ``q = h/2 - 1 ≡ 1 mod 4``). Base orders that only arise by Sylvester doubling
(``40 = 20 * 2``) are listed in ``SMALL_ORDERS`` but always factor through the smaller order.
Paley matrices are not symmetric, hence the ``transpose`` flags.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

HADAMARD_CONVENTION = "sylvester-paley-kron-v1"
MAX_SMALL_ORDER = 256


# --------------------------------------------------------------------------- finite fields

def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q == p**k`` and ``p`` prime, else ``None``."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)  # smallest divisor is prime
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_mulmod(a: list[int], b: list[int], f: list[int], p: int) -> list[int]:
    """Product of polynomials ``a*b mod (f, p)``; coefficient lists, lowest degree first, f monic."""
    k = len(f) - 1
    prod = [0] * (len(a) + len(b) - 1)
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            prod[i + j] = (prod[i + j] + ai * bj) % p
    for d in range(len(prod) - 1, k - 1, -1):  # reduce by the monic f
        c = prod[d]
        if c:
            for i in range(k + 1):
                prod[d - k + i] = (prod[d - k + i] - c * f[i]) % p
    return (prod + [0] * k)[:k]


def _is_irreducible(f: list[int], p: int) -> bool:
    """Trial division of the monic ``f`` (degree k) by every monic polynomial of degree <= k/2."""
    k = len(f) - 1
    for deg in range(1, k // 2 + 1):
        for code in range(p**deg):
            g = [(code // p**i) % p for i in range(deg)] + [1]
            rem = list(f)
            for d in range(k, deg - 1, -1):
                c = rem[d]
                if c:
                    for i in range(deg + 1):
                        rem[d - deg + i] = (rem[d - deg + i] - c * g[i]) % p
            if not any(rem[:deg]):
                return False
    return True


@functools.lru_cache(maxsize=None)
def _jacobsthal(q: int) -> torch.Tensor:
    """Jacobsthal matrix ``Q[i, j] = chi(a_i - a_j)`` of GF(q) (int8, q x q).

    Element ``i`` of GF(p**k) is the polynomial whose base-p digits of ``i`` are its coefficients,
    modulo the first monic irreducible polynomial of degree k in that same digit order.
    """
    pk = _prime_power(q)
    if pk is None or q % 2 == 0:
        raise ValueError(f"Paley construction needs an odd prime power, got q={q}")
    p, k = pk
    if k == 1:
        f = [0, 1]
    else:
        f = next(
            cand for cand in ([(c // p**i) % p for i in range(k)] + [1] for c in range(p**k))
            if _is_irreducible(cand, p)
        )
    digits = torch.tensor([[(i // p**j) % p for j in range(k)] for i in range(q)], dtype=torch.int64)
    squares = {
        sum(c * p**j for j, c in enumerate(_poly_mulmod(d, d, f, p)))
        for d in digits[1:].tolist()
    }
    chi = torch.full((q,), -1, dtype=torch.int8)
    chi[0] = 0
    chi[sorted(squares)] = 1
    diff = (digits[:, None, :] - digits[None, :, :]) % p
    codes = (diff * torch.tensor([p**j for j in range(k)])).sum(-1)
    return chi[codes]


def _paley1(q: int) -> torch.Tensor:
    """Paley I, order q + 1 (q ≡ 3 mod 4): ``I + [[0, 1^T], [-1, Q]]``."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.int8)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.int8)


def _paley2(q: int) -> torch.Tensor:
    """Paley II, order 2(q + 1) (q ≡ 1 mod 4): ``C ⊗ [[1,1],[1,-1]] + I ⊗ [[1,-1],[-1,-1]]``."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.int8)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
    b = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int8)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.int8), b)


def _paley_kind(h: int) -> str | None:
    if h % 4:
        return None
    pk1 = _prime_power(h - 1)
    if pk1 is not None and (h - 1) % 4 == 3:
        return "paley1"
    pk2 = _prime_power(h // 2 - 1)
    if pk2 is not None and (h // 2 - 1) % 4 == 1:
        return "paley2"
    return None


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _small_orders(limit: int) -> tuple[int, ...]:
    found: list[int] = []
    for h in range(12, limit + 1, 4):
        if _is_pow2(h):
            continue
        if _paley_kind(h) is not None or (h // 2 in found):
            found.append(h)
    return tuple(found)


SMALL_ORDERS: tuple[int, ...] = _small_orders(MAX_SMALL_ORDER)
"""Non-power-of-two Hadamard base orders up to ``MAX_SMALL_ORDER`` (Paley I/II, Sylvester doubling)."""


# --------------------------------------------------------------------------- public functions

def _as_size(n: Any) -> int:
    try:
        n = operator.index(n)
    except TypeError:
        raise ValueError(f"Hadamard size must be an integer, got {n!r}") from None
    return n


def hadamard_factor(n: int) -> tuple[int, int]:
    """Split ``n = h * 2**k`` with ``h`` in ``{1} ∪ SMALL_ORDERS``, the smallest possible ``h``."""
    n = _as_size(n)
    if n >= 1 and _is_pow2(n):
        return 1, n
    if n >= 1:
        for h in SMALL_ORDERS:
            if n % h == 0 and _is_pow2(n // h):
                return h, n // h
    raise ValueError(
        f"no Hadamard matrix of size {n}: supported sizes are h * 2**k with h = 1 or h in "
        f"{SMALL_ORDERS}"
    )


def is_supported(n: int) -> bool:
    """Whether ``hadamard_matrix(n)`` exists in this library's construction."""
    try:
        hadamard_factor(n)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _base_signs(h: int) -> torch.Tensor:
    """Unnormalised ±1 Hadamard matrix of a primitive base order (int8, CPU, cached)."""
    if h == 1:
        return torch.ones(1, 1, dtype=torch.int8)
    kind = _paley_kind(h)
    if kind == "paley1":
        mat = _paley1(h - 1)
    elif kind == "paley2":
        mat = _paley2(h // 2 - 1)
    else:  # pragma: no cover - hadamard_factor only returns primitive orders
        raise ValueError(f"order {h} is not a Paley order")
    gram = mat.double() @ mat.double().T  # exact: small integers
    if not torch.equal(gram, h * torch.eye(h, dtype=torch.float64)):
        raise AssertionError(f"Paley construction of order {h} is not Hadamard")  # pragma: no cover
    return mat


def _sylvester_signs(size: int) -> torch.Tensor:
    """Unnormalised Sylvester matrix of a power-of-two order (int8), by doubling."""
    mat = torch.ones(1, 1, dtype=torch.int8)
    while mat.shape[0] < size:
        mat = torch.cat((torch.cat((mat, mat), 1), torch.cat((mat, -mat), 1)), 0)
    return mat


@functools.lru_cache(maxsize=64)
def _base_matrix(h: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _base_signs(h).to(device=device, dtype=dtype)


def hadamard_matrix(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """The canonical orthonormal Hadamard matrix ``H_h ⊗ H_{2^k} / sqrt(n)`` (n x n)."""
    h, pow2 = hadamard_factor(n)
    signs = torch.kron(_base_signs(h), _sylvester_signs(pow2))
    return signs.to(device=device, dtype=dtype).mul_(1.0 / math.sqrt(n))


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Sylvester transform ``x @ H_{2^k}`` along the last dim (butterfly)."""
    size = x.shape[-1]
    lead = x.shape[:-1]
    half = 1
    while half < size:
        x = x.reshape(*lead, size // (2 * half), 2, half)
        a, b = x[..., 0, :], x[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        half *= 2
    return x.reshape(*lead, size)


def hadamard_transform(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x @ H_n`` (or ``x @ H_n^T``) along the last dim, ``n = x.shape[-1]``, in O(n log n).

    With ``H_n = (A ⊗ B) / sqrt(n)`` and ``x`` viewed as ``X`` (``h x 2^k``), ``x H = A^T X B``:
    a butterfly for the Sylvester factor ``B`` and a small ``h x h`` matmul for ``A``.
    fp16/bf16 inputs are computed in fp32 and returned in their own dtype.
    """
    if not torch.is_floating_point(x):
        raise ValueError(f"hadamard_transform needs a floating tensor, got {x.dtype}")
    n = x.shape[-1]
    h, pow2 = hadamard_factor(n)
    out_dtype = x.dtype
    work = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    lead = work.shape[:-1]
    y = _fwht(work.reshape(*lead, h, pow2))
    if h > 1:
        base = _base_matrix(h, work.dtype, work.device)
        y = torch.matmul(base if transpose else base.T, y)
    y = y.reshape(*lead, n) * (1.0 / math.sqrt(n))
    return y.to(out_dtype)


# --------------------------------------------------------------------------- block rotation

@dataclass(frozen=True)
class BlockRotation:
    """``Q = blockdiag(I_{b_I}, H, ..., H, I_leftover)`` over ``n`` columns (LoPRo step 5).

    The first ``block_identity`` columns stay unrotated, then as many whole blocks of
    ``block_hadamard`` columns as fit are rotated by ``hadamard_matrix(block_hadamard)``; the
    columns left over (fewer than a block) stay unrotated. ``block_identity >= n`` is the identity.
    """

    n: int
    block_identity: int
    block_hadamard: int

    def __post_init__(self) -> None:
        for name in ("n", "block_identity", "block_hadamard"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"BlockRotation.{name} must be an int, got {value!r}")
        if self.n < 1:
            raise ValueError(f"BlockRotation.n must be >= 1, got {self.n}")
        if self.block_identity < 0:
            raise ValueError(f"BlockRotation.block_identity must be >= 0, got {self.block_identity}")
        if self.block_hadamard < 1 or not is_supported(self.block_hadamard):
            raise ValueError(
                f"BlockRotation.block_hadamard={self.block_hadamard} is not a supported Hadamard "
                f"size (h * 2**k with h = 1 or h in {SMALL_ORDERS})"
            )

    @classmethod
    def full(cls, n: int) -> "BlockRotation":
        """One Hadamard over all ``n`` columns (the "full rotation" ablation)."""
        if not is_supported(n):
            hadamard_factor(n)  # raises the descriptive error
        return cls(n=n, block_identity=0, block_hadamard=n)

    @property
    def num_blocks(self) -> int:
        return max(self.n - self.block_identity, 0) // self.block_hadamard

    @property
    def rotated(self) -> tuple[int, int]:
        """``(start, stop)`` column range covered by the Hadamard blocks."""
        start = min(self.block_identity, self.n)
        return start, start + self.num_blocks * self.block_hadamard

    @property
    def leftover(self) -> int:
        """Trailing columns that stay unrotated because they do not fill a whole block."""
        return self.n - self.rotated[1] if self.block_identity < self.n else 0

    @property
    def is_identity(self) -> bool:
        return self.num_blocks == 0

    def matrix(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """The dense ``n x n`` orthogonal matrix ``Q``."""
        start, stop = self.rotated
        q = torch.eye(self.n, dtype=dtype, device=device)
        if self.num_blocks:
            hmat = hadamard_matrix(self.block_hadamard, dtype=dtype, device=device)
            q[start:stop, start:stop] = torch.block_diag(*([hmat] * self.num_blocks))
        return q

    def _transform(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        if x.ndim == 0 or x.shape[-1] != self.n:
            raise ValueError(f"BlockRotation(n={self.n}) got a tensor of shape {tuple(x.shape)}")
        if not torch.is_floating_point(x):
            raise ValueError(f"BlockRotation needs a floating tensor, got {x.dtype}")
        if self.is_identity:
            return x.clone()
        start, stop = self.rotated
        lead = x.shape[:-1]
        mid = x[..., start:stop].reshape(*lead, self.num_blocks, self.block_hadamard)
        mid = hadamard_transform(mid, transpose=transpose).reshape(*lead, stop - start)
        return torch.cat((x[..., :start], mid, x[..., stop:]), dim=-1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Q`` along the last dim (fast transform)."""
        return self._transform(x, transpose=False)

    def apply_transpose(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Q^T`` along the last dim; the inverse of :meth:`apply`."""
        return self._transform(x, transpose=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "convention": HADAMARD_CONVENTION,
            "n": self.n,
            "block_identity": self.block_identity,
            "block_hadamard": self.block_hadamard,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BlockRotation":
        convention = d.get("convention")
        if convention != HADAMARD_CONVENTION:
            raise ValueError(
                f"BlockRotation saved with Hadamard convention {convention!r}; this library builds "
                f"{HADAMARD_CONVENTION!r}, so the saved rotation cannot be reproduced"
            )
        missing = {"n", "block_identity", "block_hadamard"} - set(d)
        if missing:
            raise ValueError(f"BlockRotation dict is missing {sorted(missing)}")
        return cls(n=d["n"], block_identity=d["block_identity"], block_hadamard=d["block_hadamard"])
