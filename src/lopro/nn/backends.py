"""Kernel backends for :class:`~lopro.nn.qlinear.QuantLinear`: one switch, a small table, a fallback.

``set_backend(model, backend)`` (called by ``lopro.load(DIR, backend=...)``) picks, for every packed
layer, how its forward runs; the on-disk format is untouched (kernel layouts are built at load time,
because they depend on the CPU's instruction set or the GPU):

==============  ==================================================================================
backend         what a layer computes with
==============  ==================================================================================
``int4pack``    PyTorch's fused int4 kernel, ``aten._weight_int4pack_mm_for_cpu`` (x86 AVX2/AVX-512,
                vectorised for bf16 activations) or ``aten._weight_int4pack_mm`` (CUDA, bf16, sm80+),
                at every token count. Scalar residuals of 2, 3 and 4 bits with contiguous groups of
                32, 64, 128 or 256 columns; other layers fall back to ``reference``.
``dense``       dequantize the residual once per call into the compute dtype (bf16 by default; fp32
                on a CPU without native bf16, where bf16 GEMMs are emulated and 3.8x slower) and
                run one GEMM; VQ residuals decode per call from a flat codebook table
                (:class:`VQTable`: one gather) into the same GEMM.
``auto``        (default) per layer: ``int4pack`` where supported for calls of at most
                :data:`INT4_MAX_TOKENS` tokens (decode), ``dense`` above that (prefill, where a bf16
                GEMM beats the int4 kernel) and for every layer ``int4pack`` does not support.
``reference``   QuantLinear's own forward (today's path, any dtype): the fallback and the yardstick.
==============  ==================================================================================

The kernel backends (all but ``reference``) also prepare the LoPRo extras once: the permutation as
one int64 ``index_select``, the block rotation as one batched matmul over the rotated blocks (the
identity block and the leftover columns are not touched), the low-rank factors widened once with
``1/alpha`` folded into ``V`` and ``S`` folded into ``U``. On CUDA they run in the compute dtype; on
the CPU they run in fp32 for decode-sized calls (PyTorch's small bf16 GEMMs are several times slower
than fp32 there, see :class:`Kernel`), the rotation in bf16 for prefill.

lopro's asymmetric codes map into the int4 kernel exactly: the kernel computes
``(c' - 8) * s + zero`` per (row, group) with a 4-bit ``c'`` and bf16 ``s`` and ``zero``. 2- and 3-bit
codes are shifted, ``c' = c - z + 8`` (in [1, 15]) with ``zero = 0``; 4-bit codes keep ``c' = c``
with ``zero = (8 - z) * s``. Only the bf16 rounding of the scale (and of the 4-bit zero) differs
from the fp16 grid, what a bf16 dequantization costs too. 2- and 3-bit codes held as int4 take 4 bits a weight at run time, in
addition to the packed buffers (kept for the reference path and for saving).

Packed models compute in bf16 with the kernel backends (``set_backend`` casts the unquantized
parameters as well); ``backend="reference"`` keeps the dtypes the model was loaded in (fp32 on CPU).
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lopro.device import has_native_bf16

log = logging.getLogger(__name__)

BACKENDS = ("auto", "int4pack", "dense", "reference")
INT4_BITS = (2, 3, 4)
INT4_GROUP_SIZES = (32, 64, 128, 256)
# Calls with at most this many tokens use the int4 kernel under "auto"; more tokens dequantize to
# bf16 and run one GEMM. Measured on 4096x4096 W2/W3/W4 layers (benchmarks/bench_generate.py,
# "crossover" table, 2 threads): the int4 kernel wins up to ~64-128 tokens on CPU.
INT4_MAX_TOKENS = {"cpu": 64, "cuda": 128}
SMALL_TOKENS = 64  # calls up to this many tokens run the LoPRo extras in Kernel.extras_dtype
DEFAULT_DTYPE = torch.bfloat16


# --------------------------------------------------------------------------- support tests

def _cuda_inner_k_tiles(n: int) -> int | None:
    return next((k for k in (8, 4, 2) if n % (16 * k) == 0), None)


def int4_unsupported(spec: dict, dtype: torch.dtype, device: torch.device | str) -> str | None:
    """Why the int4 kernel cannot run a layer with this spec (None when it can)."""
    device = torch.device(device)
    res = spec.get("residual")
    m, n = spec["out_features"], spec["in_features"]
    if res is None:
        return "no residual"
    if res["kind"] != "scalar":
        return f"{res['kind']} residual"
    if res["bits"] not in INT4_BITS:
        return f"{res['bits']}-bit codes"
    gs = res["group_size"]
    if gs is None:
        return "act-order group map"
    if gs not in INT4_GROUP_SIZES:
        return f"group size {gs}"
    if n % gs:
        return f"in_features {n} not a multiple of the group size {gs}"
    if dtype != torch.bfloat16:
        return f"compute dtype {str(dtype).removeprefix('torch.')} (the kernel takes bf16)"
    if device.type == "cpu":
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return "this PyTorch has no _weight_int4pack_mm_for_cpu"
        if m % 16:
            return f"out_features {m} not a multiple of 16"
        return None
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "the CUDA int4 kernel needs sm80+"
        if m % 8:
            return f"out_features {m} not a multiple of 8"
        if _cuda_inner_k_tiles(n) is None:
            return f"in_features {n} not a multiple of 32"
        return None
    return f"device {device.type}"


def plan(spec: dict, backend: str = "auto", dtype: torch.dtype = DEFAULT_DTYPE,
         device: torch.device | str = "cpu") -> tuple[str, str | None]:
    """(what a layer with this spec runs under `backend`, why int4pack is not used or None).

    The choice is one of ``"int4pack+dense"`` (auto: int4 kernel for few tokens, dense above),
    ``"int4pack"``, ``"dense"`` or ``"reference"``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference", None
    if backend == "dense":
        return "dense", None
    why = int4_unsupported(spec, dtype, device)
    if backend == "int4pack":
        return ("reference", why) if why else ("int4pack", None)
    return ("dense", why) if why else ("int4pack+dense", None)


def plan_specs(specs: dict[str, dict], backend: str = "auto", dtype: torch.dtype = DEFAULT_DTYPE,
               device: torch.device | str = "cpu") -> dict[str, Any]:
    """Counts of each choice over a checkpoint's module specs and the reasons for the fallbacks."""
    choices: Counter = Counter()
    reasons: Counter = Counter()
    for spec in specs.values():
        choice, why = plan(spec, backend, dtype, device)
        choices[choice] += 1
        if why:
            reasons[why] += 1
    return {"backend": backend, "device": str(torch.device(device)), "dtype": str(dtype).removeprefix("torch."),
            "max_int4_tokens": INT4_MAX_TOKENS.get(torch.device(device).type), "layers": dict(choices),
            "fallback_reasons": dict(reasons)}


# --------------------------------------------------------------------------- the prepared layer

def _int4_operands(mod) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as int32 [m, n], each < 16; qScaleAndZeros [G, m, 2] bf16) for the int4 kernels.

    The kernels compute ``(c' - 8) * s + zero``. At 2 and 3 bits ``c' = c - z + 8`` lies in [1, 15]
    and ``zero = 0``: exact up to the bf16 scale. At 4 bits ``c' = c`` and ``zero = (8 - z) * s``.
    """
    from lopro.quant.packing import unpack

    res = mod.spec["residual"]
    bits, G, gs = res["bits"], res["num_groups"], res["group_size"]
    codes = unpack(mod.qweight, bits, mod.in_features).to(torch.int32)
    s = mod.scales.to(torch.bfloat16).to(torch.float32)  # the kernel's scale
    if res["sym"]:
        z = torch.full(s.shape, 2 ** (bits - 1), dtype=torch.int32, device=s.device)
    else:
        z = unpack(mod.qzeros, bits, G).to(torch.int32)
    if bits < 4:
        codes = codes.view(codes.shape[0], G, gs).sub_(z[:, :, None]).add_(8).view(codes.shape)
        zero = torch.zeros_like(s)
    else:
        zero = (8 - z).to(torch.float32) * s
    sz = torch.stack([s, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [G, m, 2]
    return codes, sz


class Int4Weight:
    """The residual repacked for PyTorch's int4 kernel on the layer's device."""

    def __init__(self, mod):
        res = mod.spec["residual"]
        self.group_size = res["group_size"]
        device = mod.qweight.device
        codes, self.scales_and_zeros = _int4_operands(mod)
        if device.type == "cpu":
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            self._mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        else:  # CUDA: two codes a byte, the even column in the high nibble
            nibbles = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
            self.packed = torch.ops.aten._convert_weight_to_int4pack(
                nibbles.contiguous(), _cuda_inner_k_tiles(mod.in_features))
            self._mm = torch.ops.aten._weight_int4pack_mm

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 @ Ŵq^T`` for 2-D bf16 ``x2``."""
        return self._mm(x2.contiguous(), self.packed, self.group_size, self.scales_and_zeros)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros))


class VQTable:
    """A VQ residual's codebooks as one flat [codebooks * k, dim] table in the compute dtype, and the
    row/column offsets that turn a vector's index into its row of the table: decoding is then one
    unpack, one broadcast add and one gather (``vq_decode`` builds the codebook map and gathers with
    two int64 index tensors on every call)."""

    def __init__(self, mod, dtype: torch.dtype):
        from lopro.formats.vq import layout as _vq_layout

        res = mod.spec["residual"]
        lay = _vq_layout(res)
        dev = mod.vq_indices.device
        self.dtype = dtype
        self.shape, self.dim = lay.shape, lay.dim
        self.nv = lay.n_pad // lay.dim
        self.ibits = res["bits"] * lay.dim
        k = 2**self.ibits
        C = mod.vq_codebooks.to(torch.float32) * mod.vq_scale.to(torch.float32)[:, None, None]
        self.table = C.reshape(-1, lay.dim).to(dtype)
        rb = torch.tensor(lay.row_bounds[1:-1], dtype=torch.long, device=dev)
        cb = torch.tensor(lay.col_bounds[1:-1], dtype=torch.long, device=dev) // lay.dim
        row_block = torch.bucketize(torch.arange(lay.shape[0], device=dev), rb, right=True)
        col_group = torch.bucketize(torch.arange(self.nv, device=dev), cb, right=True)
        self.row_offset = (row_block * k).to(torch.int32)[:, None]
        self.col_offset = (col_group * lay.num_row_blocks * k).to(torch.int32)[None, :]

    def decode(self, mod) -> torch.Tensor:
        """Ŵq [m, n] in the compute dtype."""
        from lopro.quant.packing import unpack

        idx = unpack(mod.vq_indices, self.ibits, self.nv) if self.ibits <= 8 else mod.vq_indices
        rows = idx.to(torch.int32).add_(self.row_offset).add_(self.col_offset)
        m, n = self.shape
        w = self.table.index_select(0, rows.view(-1)).view(m, self.nv * self.dim)
        return w if self.nv * self.dim == n else w[:, :n]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.table, self.row_offset, self.col_offset))


class Kernel:
    """A QuantLinear's forward with its extras prepared once (see the module docstring).

    Built lazily on the first call and again after a device move (QuantLinear._apply resets it).
    ``choice`` is what :func:`plan` said; ``int4`` is None on the dense path.

    The extras (permutation, rotation, low rank) of a call with few tokens (at most
    :data:`SMALL_TOKENS`) run in ``extras_dtype``: fp32 on the CPU, where PyTorch's bf16 GEMMs of
    16-128 columns cost 3-7x their fp32 counterparts (measured: the rank-16 branch of a 576x576
    layer, 34 us in bf16, 5 us in fp32, one thread), the compute dtype elsewhere. Larger calls run
    the rotation in the compute dtype. The low-rank factors are held once, in ``extras_dtype``.
    """

    def __init__(self, choice: str, dtype: torch.dtype):
        self.choice = choice
        self.dtype = dtype
        self.gemm_dtype = dtype  # of the dense path's GEMM and of large calls' extras (see prepare)
        self.max_int4_tokens: int | None = None
        self.reset()

    def reset(self) -> None:
        self._ready = False
        self.int4: Int4Weight | None = None
        self.vq: VQTable | None = None
        self.rotated: tuple[int, int, int, int] | None = None
        self.hadamard: dict[torch.dtype, torch.Tensor] = {}
        self.perm = self.lr_V = self.lr_SUt = self.bias = None
        self.extras_dtype = self.dtype

    # -------------------------------------------------------------- preparation

    def prepare(self, mod) -> None:
        from lopro.linalg.hadamard import hadamard_matrix
        from lopro.formats import widen as _widen

        self.reset()
        dtype, spec = self.dtype, mod.spec
        device = mod._any_buffer().device
        self.extras_dtype = torch.float32 if device.type == "cpu" else dtype
        # a CPU without native bf16 (AVX2 only) emulates bf16 GEMMs, 3.8x slower than fp32 at 512 tokens: the
        # dense path dequantizes to fp32 there (the int4 kernel still takes bf16 activations)
        self.gemm_dtype = dtype if dtype != torch.bfloat16 or has_native_bf16(device) else torch.float32
        if self.choice.startswith("int4pack"):
            self.int4 = Int4Weight(mod)
            self.max_int4_tokens = None if self.choice == "int4pack" else INT4_MAX_TOKENS.get(device.type, 0)
        if spec["residual"] is not None and spec["residual"]["kind"] == "vq" and not mod.cache_weight:
            self.vq = VQTable(mod, self.gemm_dtype)
        if spec["perm"]:
            self.perm = mod.perm.to(torch.int64)
        rot = mod.rotation
        if rot is not None and not rot.is_identity:
            self.rotated = (*rot.rotated, rot.num_blocks, rot.block_hadamard)
            H = hadamard_matrix(rot.block_hadamard, dtype=torch.float32, device=device)
            self.hadamard = {dt: H.to(dt) for dt in {self.gemm_dtype, self.extras_dtype}}
        if spec["lowrank"] is not None and spec["lowrank"]["rank"] > 0:
            V = _widen(mod.lr_V, torch.float32)
            if spec["alpha"]:
                V = V / mod.alpha.to(torch.float32)
            US = _widen(mod.lr_U, torch.float32) * mod.lr_S.to(torch.float32)
            self.lr_V = V.to(self.extras_dtype).contiguous()
            # (U S)^T, [rank, m]: x @ it reads rows, ~2x faster at one token than F.linear on [m, rank]
            self.lr_SUt = US.T.to(self.extras_dtype).contiguous()
        if spec["bias"]:
            self.bias = mod.bias.to(dtype)
        self._ready = True

    # -------------------------------------------------------------- compute

    def transform(self, x2: torch.Tensor) -> torch.Tensor:
        """``rot.apply(x2[:, perm])`` with one gather and one batched matmul over the rotated blocks
        (the identity block and the leftover columns are only copied), in x2's dtype."""
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)  # a fresh tensor: rotated in place below
        elif self.rotated is not None:
            x2 = x2.clone()
        if self.rotated is not None:
            start, stop, nb, bh = self.rotated
            mid = x2[:, start:stop].unflatten(-1, (nb, bh))
            x2[:, start:stop] = torch.matmul(mid, self.hadamard[x2.dtype]).flatten(-2)
        return x2

    def __call__(self, mod, x: torch.Tensor) -> torch.Tensor:
        if not self._ready:
            self.prepare(mod)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, mod.in_features)
        tokens = x2.shape[0]
        small = tokens <= SMALL_TOKENS
        xe = x2.to(self.extras_dtype if small else self.gemm_dtype)
        y = None
        if mod.spec["residual"] is not None:
            xt = self.transform(xe) if (self.perm is not None or self.rotated is not None) else xe
            if self.int4 is not None and (self.max_int4_tokens is None or tokens <= self.max_int4_tokens):
                y = self.int4.matmul(xt.to(torch.bfloat16))
            else:
                scratch = not (torch.is_grad_enabled() and x2.requires_grad)
                w = self.vq.decode(mod) if self.vq is not None else mod._residual(self.gemm_dtype, scratch=scratch)
                y = F.linear(xt.to(self.gemm_dtype), w)
        if self.lr_V is not None:
            lr = F.linear(xe.to(self.lr_V.dtype), self.lr_V) @ self.lr_SUt
            y = lr if y is None else y.add_(lr)
        if y is None:
            y = x2.new_zeros(tokens, mod.out_features, dtype=self.dtype)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.reshape(*lead, mod.out_features).to(x.dtype)

    def nbytes(self) -> int:
        """Run-time bytes this kernel holds beyond the layer's buffers."""
        total = sum(p.nbytes() for p in (self.int4, self.vq) if p is not None)
        for t in (self.perm, self.lr_V, self.lr_SUt, self.bias, *self.hadamard.values()):
            if t is not None:
                total += t.numel() * t.element_size()
        return total


# --------------------------------------------------------------------------- the switch

def _cast_floats(model: nn.Module, dtype: torch.dtype) -> None:
    """Unquantized parameters (and QuantLinear biases) to `dtype`; other buffers (RoPE tables) stay."""
    from lopro.nn.qlinear import QuantLinear

    for p in model.parameters():  # deduplicated: tied embeddings stay tied
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    for mod in model.modules():
        if isinstance(mod, QuantLinear) and mod.spec.get("bias") and mod.bias.dtype != dtype:
            mod._buffers["bias"] = mod.bias.to(dtype)


def set_backend(model: nn.Module, backend: str | None = "auto", dtype: torch.dtype | None = None,
                prepare: bool = True) -> dict[str, str]:
    """Choose every QuantLinear's backend (see the module docstring); returns module name -> choice.

    `dtype`: the compute dtype. Kernel backends default to bf16 and cast the model's unquantized
    parameters to it (a lossy cast: load with ``backend="reference"`` for exact fp32);
    ``"reference"`` (or None) keeps the model as loaded unless `dtype` is given.
    `prepare`: build the kernel layouts now (default) rather than on each layer's first call.
    """
    from lopro.nn.qlinear import QuantLinear
    from lopro.nn.qlinear import set_compute_dtype

    backend = backend or "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    qmods = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if backend == "reference":
        if dtype is not None:
            _cast_floats(model, dtype)
            set_compute_dtype(model, dtype)
        for mod in qmods.values():
            mod.backend = None
        return {name: "reference" for name in qmods}
    dtype = dtype or DEFAULT_DTYPE
    _cast_floats(model, dtype)
    set_compute_dtype(model, dtype)
    choices: dict[str, str] = {}
    reasons: Counter = Counter()
    for name, mod in qmods.items():
        choice, why = plan(mod.spec, backend, dtype, mod._any_buffer().device)
        if why:
            reasons[why] += 1
        choices[name] = choice
        mod.backend = None if choice == "reference" else Kernel(choice, dtype)
        if prepare and mod.backend is not None:
            mod.backend.prepare(mod)
    log.info("backend %s (%s): %s%s", backend, str(dtype).removeprefix("torch."), dict(Counter(choices.values())),
             f"; int4pack not used: {dict(reasons)}" if reasons else "")
    return choices


def backend_choices(model: nn.Module) -> dict[str, str]:
    """Module name -> the backend each QuantLinear runs ("reference" when none is set)."""
    from lopro.nn.qlinear import QuantLinear

    return {name: (m.backend.choice if m.backend is not None else "reference")
            for name, m in model.named_modules() if isinstance(m, QuantLinear)}


__all__ = ["BACKENDS", "INT4_BITS", "INT4_GROUP_SIZES", "INT4_MAX_TOKENS", "Kernel", "Int4Weight",
           "int4_unsupported", "plan", "plan_specs", "set_backend", "backend_choices"]
