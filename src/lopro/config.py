"""`QuantConfig`: one validated, serialisable description of a quantization run."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

BITS_RANGE = (2, 8)
RANK_DTYPES = ("fp8", "fp16", "fp32")
LOWRANK_SOLVERS = ("r1svd", "svd")
PROPAGATE = ("quantized", "fp")


@dataclass
class QuantConfig:
    """Field names follow GPTQModel / AutoGPTQ where a counterpart exists."""

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128          # -1 = one group per output channel
    sym: bool = False
    desc_act: bool = False         # GPTQ act-order
    damp_percent: float = 0.01
    true_sequential: bool = True
    seed: int = 0
    mse: bool = False              # per-group clipping search for the grid
    blocksize: int = 128           # GPTQ lazy-batch block
    propagate: str = "quantized"   # feed the next block the quantized ("quantized") or fp ("fp") outputs
    # low-rank methods (LoPRo, LQER, FLRQ)
    rank: int = 16
    rank_dtype: str = "fp8"
    lowrank_solver: str = "r1svd"
    power_iters: int = 2
    block_identity: int = 128      # b_I: leading columns left unrotated
    block_hadamard: int = 128      # b_H: size of each rotated block
    # method-specific extras (e.g. FLRQ/GPTVQ knobs), kept serialisable
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        lo, hi = BITS_RANGE
        if not isinstance(self.bits, int) or not lo <= self.bits <= hi:
            raise ValueError(f"bits must be an integer in [{lo}, {hi}], got {self.bits!r}")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group_size must be -1 (per channel) or a positive integer, got {self.group_size}")
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"damp_percent must be in (0, 1), got {self.damp_percent}")
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        if self.rank_dtype not in RANK_DTYPES:
            raise ValueError(f"rank_dtype must be one of {RANK_DTYPES}, got {self.rank_dtype!r}")
        if self.lowrank_solver not in LOWRANK_SOLVERS:
            raise ValueError(f"lowrank_solver must be one of {LOWRANK_SOLVERS}, got {self.lowrank_solver!r}")
        if self.propagate not in PROPAGATE:
            raise ValueError(f"propagate must be one of {PROPAGATE}, got {self.propagate!r}")
        if self.block_identity < 0 or self.block_hadamard < 1:
            raise ValueError("block_identity must be >= 0 and block_hadamard >= 1")
        from lopro.methods import get_method  # late import: methods import this module

        get_method(self.method)

    def check_width(self, in_features: int, name: str = "layer") -> None:
        if self.group_size > in_features:
            raise ValueError(f"group_size {self.group_size} is larger than the input width {in_features} of "
                             f"{name}; use a group size <= {in_features} or -1 (per channel)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QuantConfig fields: {sorted(unknown)}")
        return cls(**d)
