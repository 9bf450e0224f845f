"""Effective bits per weight, counted from what is stored."""
from __future__ import annotations

import math

SCALE_BITS = 16  # fp16 group scales, low-rank Sigma, alpha


def num_groups(n: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(n / group_size)


def scalar_bits(m: int, n: int, bits: int, groups: int, sym: bool) -> float:
    """Total bits of a scalar-quantized m x n matrix: codes, fp16 scales, packed integer zeros."""
    per_group = SCALE_BITS + (0 if sym else bits)
    return m * n * bits + m * groups * per_group


def lowrank_bits(m: int, n: int, rank: int, factor_bits: int) -> float:
    """U [m, r] and V [r, n] at the factor precision, Sigma in fp16."""
    return rank * (m + n) * factor_bits + rank * SCALE_BITS


def index_bits(n: int) -> int:
    """A stored permutation: int16 when it fits, else int32."""
    return 16 if n <= 32768 else 32


def paper_bits(m: int, n: int, bits: int, group_size: int, rank: int, factor_bits: int, d_o: int = 16) -> float:
    """The LoPRo paper's formula: d_q + d_o/g + r d_r (1/n + 1/m) + 2 d_o / n + r d_o / (m n)."""
    return bits + d_o / group_size + rank * factor_bits * (1 / n + 1 / m) + 2 * d_o / n + rank * d_o / (m * n)
