"""Group counts and the LoPRo paper's bit formula (what a layer stores is counted by lopro.formats)."""
from __future__ import annotations

import math

SCALE_BITS = 16  # fp16 group scales, low-rank Sigma, alpha


def num_groups(n: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(n / group_size)


def paper_bits(m: int, n: int, bits: int, group_size: int, rank: int, factor_bits: int, d_o: int = 16) -> float:
    """The LoPRo paper's formula: d_q + d_o/g + r d_r (1/n + 1/m) + 2 d_o / n + r d_o / (m n)."""
    return bits + d_o / group_size + rank * factor_bits * (1 / n + 1 / m) + 2 * d_o / n + rank * d_o / (m * n)
