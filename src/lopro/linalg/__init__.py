"""Linear-algebra pieces: Hadamard rotations and low-rank (R1SVD / SVD) factors."""

from lopro.linalg.hadamard import (
    HADAMARD_CONVENTION,
    MAX_SMALL_ORDER,
    SMALL_ORDERS,
    BlockRotation,
    hadamard_factor,
    hadamard_matrix,
    hadamard_transform,
    is_supported,
)
from lopro.linalg.r1svd import (
    SOLVERS,
    STORAGE_FORMATS,
    LowRank,
    lowrank,
    r1svd,
    svd_lowrank_exact,
)

__all__ = [
    "HADAMARD_CONVENTION",
    "MAX_SMALL_ORDER",
    "SMALL_ORDERS",
    "SOLVERS",
    "STORAGE_FORMATS",
    "BlockRotation",
    "LowRank",
    "hadamard_factor",
    "hadamard_matrix",
    "hadamard_transform",
    "is_supported",
    "lowrank",
    "r1svd",
    "svd_lowrank_exact",
]
