"""`QuantConfig`: one validated, serialisable description of a quantization run."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from lopro.linalg.r1svd import FACTOR_DTYPES, SOLVERS
from lopro.methods import get_method
from lopro.methods.options import opt, parse

BITS_RANGE = (2, 8)
RANK_DTYPES = tuple(FACTOR_DTYPES)
LOWRANK_SOLVERS = SOLVERS
PROPAGATE = ("quantized", "fp")
FORWARD_DTYPES = ("fp32", "bf16", "auto")
STARVED_EXPERT_HESSIANS = ("identity", "diagonal")  # the default first


@dataclass(frozen=True)
class PipelineOptions:
    """Options of the pipeline itself, valid with every method (``--option KEY=VALUE``)."""

    hessian_dtype: str = opt("fp32", str, ("fp32", "fp64"), doc="dtype X^T X is accumulated in")
    forward_dtype: str = opt("auto", str, FORWARD_DTYPES,
                             doc="dtype of the calibration and propagation forwards' matmuls (autocast); "
                                 "auto = bf16 where the device computes bf16 natively")
    starved_expert_hessian: str = opt(STARVED_EXPERT_HESSIANS[0], str, STARVED_EXPERT_HESSIANS,
                                      doc="what an MoE expert too few tokens reached is quantized with")
    min_expert_tokens_share: float = opt(0.1, float, minimum=0)
    min_expert_tokens_per_input: float = opt(1.0, float, minimum=0)
    moe_weighted_hessian: bool = opt(False, bool, doc="weight routed tokens by their routing weight")


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
    # pipeline and method options by name (PipelineOptions, the method's classes), kept serialisable
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
        self._parsed()  # the method exists, and every option is known and well typed
        if get_method(self.method).residual == "vq":
            from lopro.methods.rank import vq_config

            vq_config(self, width=None)  # GPTVQ's settings are valid for these bits and options

    def _parsed(self) -> tuple:
        spec = get_method(self.method)
        return parse((PipelineOptions, *spec.options), dict(self.options), f"method {self.method!r}")

    @property
    def pipeline_options(self) -> PipelineOptions:
        return self._parsed()[0]

    @property
    def method_options(self) -> tuple:
        return self._parsed()[1:]

    def options_of(self, cls, required: bool = True):
        """The parsed options object of class `cls` (e.g. RankOptions) for this config's method."""
        for o in self._parsed():
            if isinstance(o, cls):
                return o
        if required:
            raise ValueError(f"method {self.method!r} takes no {cls.__name__}")
        return None

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
