"""`QuantLinear`: the one layer module every method's result packs into.

It computes ``y = W_r x + Ŵq (Q^T P^T x) + b`` where

- ``W_r = U diag(S) V diag(alpha)^-1`` is the low-rank branch (optional; ``alpha`` optional), run as
  two thin matmuls on the input: ``U (S * (V (x / alpha)))``;
- ``Ŵq`` is the packed residual: scalar integer codes with per-(row, group) fp16 scales and packed
  integer zeros (GPTQ/RTN layout), or GPTVQ indices with int8 codebooks; it is dequantized on every
  call in the compute dtype and nothing big is cached (unless :attr:`QuantLinear.cache_weight` is
  switched on, see below);
- ``P`` is a column permutation (optional) and ``Q`` LoPRo's block Hadamard rotation (optional),
  both applied to the input online: row-vector form ``rot.apply(x[..., perm])``.

Plain GPTQ/RTN layers are the same module with the low-rank, alpha, permutation and rotation parts
absent. Everything needed to rebuild the module's skeleton (shapes, dtypes, which parts exist) is a
small JSON-able ``spec`` dict, stored in the checkpoint's ``quantization_config``; the tensors are
the module's buffers, i.e. its state dict is what is saved.

Storage (``spec`` keys in brackets):

=============  ======================================================  ==========================
buffer         shape / dtype                                           present when
=============  ======================================================  ==========================
qweight        [m, ceil(n * bits / 8)] uint8 (lopro.quant.packing)     residual kind "scalar"
scales         [m, G] fp16                                              residual kind "scalar"
qzeros         [m, ceil(G * bits / 8)] uint8 (bits-wide integers)      scalar and not sym
g_idx          [n] int16/int32                                          groups are not contiguous
vq_indices     [m, ceil(nv * bits * dim / 8)] uint8, or [m, nv] int16   residual kind "vq"
vq_codebooks   [num_codebooks, k, dim] int8                             residual kind "vq"
vq_scale       [num_codebooks] fp16                                     residual kind "vq"
lr_U, lr_S,    [m, r], [r], [r, n] at the storage precision             lowrank
lr_V           (fp8 = float8_e4m3fn U/V with fp16 S; fp16; fp32)
alpha          [n] fp16                                                 alpha
perm           [n] int16/int32                                          perm
bias           [m] float                                                bias
=============  ======================================================  ==========================

Dequantization runs in chunks of rows (each pass stays in cache) into one scratch buffer per thread
shared by all layers on the CPU (the largest layer's weight in the compute dtype: fresh allocations
of that size cost page faults on every call); the low-rank branch folds ``1/alpha`` into ``V`` and
adds ``U S (V x)`` into the output in place; the rotation is one ``b_H x b_H`` matmul per block
(``rotation_impl = "fwht"`` uses the butterfly ``BlockRotation.apply`` instead, slower on CPU).

``cache_weight`` (off by default): keep the dequantized residual of the last compute dtype/device
in a plain attribute, trading ``m * n`` compute-dtype elements of memory per layer for skipping the
per-call unpack. Benchmarks measure the default (no cache).
"""
from __future__ import annotations

import functools
import math
import sys
import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lopro.linalg.hadamard import BlockRotation, hadamard_matrix
from lopro.quant.packing import pack, packed_length, unpack

SPEC_VERSION = 1
ROTATION_IMPLS = ("matmul", "fwht")
_LOWRANK_DTYPES = {
    "fp8": (torch.float8_e4m3fn, torch.float16),  # (U/V dtype, S dtype)
    "fp16": (torch.float16, torch.float16),
    "fp32": (torch.float32, torch.float32),
}
_CPU_COMPUTE = (torch.float32, torch.bfloat16, torch.float64)
_CUDA_COMPUTE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- spec

def _index_dtype(n: int) -> torch.dtype:
    return torch.int16 if n - 1 <= 2**15 - 1 else torch.int32


def _regular_group_size(g_idx: torch.Tensor, num_groups: int) -> int | None:
    """The group size when column j is in group j // gs (contiguous groups), else None."""
    idx = g_idx.cpu().long()
    n = idx.numel()
    gs = int((idx == 0).sum())
    if gs == 0 or math.ceil(n / gs) != num_groups:
        return None
    return gs if torch.equal(idx, torch.arange(n) // gs) else None


def buffer_specs(spec: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor a QuantLinear with this spec holds: name -> (shape, dtype)."""
    m, n = spec["out_features"], spec["in_features"]
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    res = spec.get("residual")
    if res is not None and res["kind"] == "scalar":
        bits, G = res["bits"], res["num_groups"]
        out["qweight"] = ((m, packed_length(n, bits)), torch.uint8)
        out["scales"] = ((m, G), torch.float16)
        if not res["sym"]:
            out["qzeros"] = ((m, packed_length(G, bits)), torch.uint8)
        if res["group_size"] is None:
            out["g_idx"] = ((n,), _index_dtype(G))
    elif res is not None and res["kind"] == "vq":
        lay = res["layout"]
        nv = lay["col_bounds"][-1] // lay["dim"]
        ibits = res["bits"] * lay["dim"]
        ncb = (len(lay["col_bounds"]) - 1) * (len(lay["row_bounds"]) - 1)
        if ibits <= 8:
            out["vq_indices"] = ((m, packed_length(nv, ibits)), torch.uint8)
        else:
            out["vq_indices"] = ((m, nv), torch.int16)
        out["vq_codebooks"] = ((ncb, 2**ibits, lay["dim"]), torch.int8)
        out["vq_scale"] = ((ncb,), torch.float16)
    elif res is not None:
        raise ValueError(f"unknown residual kind {res['kind']!r} in QuantLinear spec")
    lr = spec.get("lowrank")
    if lr is not None:
        vec, sig = _LOWRANK_DTYPES[lr["storage"]]
        r = lr["rank"]
        out["lr_U"] = ((m, r), vec)
        out["lr_S"] = ((r,), sig)
        out["lr_V"] = ((r, n), vec)
    if spec.get("alpha"):
        out["alpha"] = ((n,), torch.float16)
    if spec.get("perm"):
        out["perm"] = ((n,), _index_dtype(n))
    if spec.get("bias"):
        out["bias"] = ((m,), torch.float32)  # dtype not fixed: any float dtype is accepted
    return out


def effective_bits(spec: dict) -> float:
    """Stored bits per weight of a QuantLinear with this spec (bias excluded), from its buffers."""
    m, n = spec["out_features"], spec["in_features"]
    total = 0
    for name, (shape, dtype) in buffer_specs(spec).items():
        if name != "bias":
            total += math.prod(shape) * torch.empty(0, dtype=dtype).element_size() * 8
    return total / (m * n)


def _vq_layout(res: dict):
    from lopro.quant.gptvq import VQLayout

    lay = res["layout"]
    return VQLayout(tuple(lay["shape"]), lay["dim"], tuple(lay["col_bounds"]), tuple(lay["row_bounds"]))


# --------------------------------------------------------------------------- module

class QuantLinear(nn.Module):
    """A packed linear layer; see the module docstring for the parts and their storage."""

    cache_weight: bool = False
    rotation_impl: str = "matmul"  # "matmul": x_block @ H (one small matmul); "fwht": BlockRotation.apply
    backend: Any = None  # a prepared kernel (lopro.nn.backends.set_backend); None: the reference path below

    def __init__(self, spec: dict, device: torch.device | str | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.spec = _check_spec(spec)
        self.in_features = spec["in_features"]
        self.out_features = spec["out_features"]
        self.compute_dtype = compute_dtype
        self.rotation = BlockRotation.from_dict(spec["rotation"]) if spec.get("rotation") else None
        if self.rotation is not None and self.rotation.n != self.in_features:
            raise ValueError(f"rotation is over {self.rotation.n} columns but the layer has {self.in_features}")
        for name, (shape, dtype) in buffer_specs(spec).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
        self._derived: dict = {}
        self._w_cache: tuple | None = None

    # ------------------------------------------------------------------ building

    @classmethod
    def from_result(cls, result, bias: torch.Tensor | None = None,
                    compute_dtype: torch.dtype | None = None) -> "QuantLinear":
        """Pack a method's `LayerResult` (see methods/base.py) into a QuantLinear on the result's device."""
        parts = result.parts
        m, n = result.weight.shape
        device = result.weight.device
        spec: dict[str, Any] = {"version": SPEC_VERSION, "in_features": n, "out_features": m,
                                "bias": bias is not None, "residual": None, "lowrank": None,
                                "alpha": "alpha" in parts, "perm": "perm" in parts, "rotation": None}
        tensors: dict[str, torch.Tensor] = {}
        if "quant" in parts and "vq" in parts:
            raise ValueError("a result holds both a scalar ('quant') and a vector ('vq') residual")
        if "quant" in parts:
            spec["residual"], t = _pack_scalar(parts["quant"], m, n)
            tensors.update(t)
        elif "vq" in parts:
            spec["residual"], t = _pack_vq(parts["vq"], m, n)
            tensors.update(t)
        if "lowrank" in parts:
            lr = parts["lowrank"]
            if lr.U.ndim != 2 or lr.U.shape[0] != m or lr.V.shape[-1] != n:
                raise ValueError(f"low-rank factors of shape {tuple(lr.shape)} do not match the layer ({m}, {n})")
            spec["lowrank"] = {"rank": lr.rank, "storage": lr.storage}
            vec, sig = _LOWRANK_DTYPES[lr.storage]
            tensors.update(lr_U=lr.U.to(vec), lr_S=lr.S.to(sig), lr_V=lr.V.to(vec))
        if "alpha" in parts:
            tensors["alpha"] = parts["alpha"].detach().to(torch.float16)
        if "perm" in parts:
            perm = parts["perm"].detach()
            if not torch.equal(torch.sort(perm.cpu().long()).values, torch.arange(n)):
                raise ValueError("parts['perm'] is not a permutation of the input columns")
            tensors["perm"] = perm.to(_index_dtype(n))
        if "rotation" in parts:
            spec["rotation"] = parts["rotation"].to_dict()
        if bias is not None:
            tensors["bias"] = bias.detach().clone()
        mod = cls(spec, device="meta", compute_dtype=compute_dtype)
        for name, t in tensors.items():
            mod._buffers[name] = t.to(device).contiguous()
        mod.check_tensors()
        return mod

    def check_tensors(self) -> None:
        """Every buffer of the spec exists with its shape and dtype (bias: any float dtype)."""
        for name, (shape, dtype) in buffer_specs(self.spec).items():
            t = self._buffers.get(name)
            if t is None:
                raise ValueError(f"QuantLinear is missing tensor {name!r}")
            if tuple(t.shape) != shape:
                raise ValueError(f"QuantLinear tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
            ok = t.is_floating_point() if name == "bias" else t.dtype == dtype
            if not ok:
                raise ValueError(f"QuantLinear tensor {name!r} has dtype {t.dtype}, expected {dtype}")

    # ------------------------------------------------------------------ compute

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        allowed = _CUDA_COMPUTE if x.device.type == "cuda" else _CPU_COMPUTE
        return x.dtype if x.dtype in allowed else torch.float32

    def dequantize_residual(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """Ŵq ([m, n], in the transformed column space) in `dtype`, or None when there is no residual."""
        return self._residual(dtype, scratch=False)

    def _residual(self, dtype: torch.dtype, scratch: bool) -> torch.Tensor | None:
        res = self.spec["residual"]
        if res is None:
            return None
        device = self._any_buffer().device
        if self.cache_weight and self._w_cache is not None and self._w_cache[0] == (dtype, device):
            return self._w_cache[1]
        if res["kind"] == "scalar":
            w = _dequant_scalar(self, res, dtype, scratch=scratch and not self.cache_weight)
        else:
            w = _dequant_vq(self, res, dtype)
        if self.cache_weight:
            self._w_cache = ((dtype, device), w)
        return w

    def lowrank_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """W_r = U diag(S) V diag(alpha)^-1 ([m, n]) or None."""
        if self.spec["lowrank"] is None:
            return None
        w = (_widen(self.lr_U, torch.float32) * self.lr_S.to(torch.float32)) @ _widen(self.lr_V, torch.float32)
        if self.spec["alpha"]:
            w = w / self.alpha.to(torch.float32)
        return w.to(dtype)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense [m, n] matrix the layer computes (for checks; the forward never builds it)."""
        n = self.in_features
        device = self._any_buffer().device
        w = torch.zeros(self.out_features, n, dtype=torch.float32, device=device)
        wq = self.dequantize_residual(torch.float32)
        if wq is not None:  # rows of transform_input(I) @ Ŵq^T are (Ŵq Q^T P^T)^T
            w = w + (self.transform_input(torch.eye(n, device=device)) @ wq.T).T
        lr = self.lowrank_weight(torch.float32)
        if lr is not None:
            w = w + lr
        return w.to(dtype)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """``rot.apply(x[..., perm])``: the input of the quantized branch (row-vector form of Q^T P^T x)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # gathers along the last dim are far faster in 2-D
        if self.spec["perm"]:
            x2 = x2.index_select(1, self._small("perm", lambda: self.perm.to(torch.int64)))
        if self.rotation is not None and not self.rotation.is_identity:
            x2 = self._rotate(x2, inplace=bool(self.spec["perm"]))  # index_select made a fresh tensor
        return x2.reshape(*lead, self.in_features)

    def _small(self, key: str, make):
        """Small derived tensors (the int64 permutation, the b_H x b_H Hadamard), cached per device."""
        dev = self._any_buffer().device
        got = self._derived.get((key, dev))
        if got is None:
            got = make()
            self._derived[(key, dev)] = got
        return got

    def _rotate(self, x2: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        rot = self.rotation
        if self.rotation_impl == "fwht":
            return rot.apply(x2)
        if self.rotation_impl != "matmul":
            raise ValueError(f"rotation_impl must be one of {ROTATION_IMPLS}, got {self.rotation_impl!r}")
        start, stop = rot.rotated
        H = self._small(("hadamard", x2.dtype), lambda: hadamard_matrix(
            rot.block_hadamard, dtype=torch.float32, device=x2.device).to(x2.dtype))
        out = x2 if inplace else x2.clone()
        mid = x2[:, start:stop].unflatten(-1, (rot.num_blocks, rot.block_hadamard))
        out[:, start:stop] = torch.matmul(mid, H).flatten(-2)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend is not None:
            return self.backend(self, x)
        dtype = self._compute_dtype(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(dtype)
        y = self.quant_branch(x2)
        y = self.lowrank_branch(x2, y)
        if y is None:
            y = x2.new_zeros(x2.shape[0], self.out_features)
        if self.spec["bias"]:
            y = y.add_(self.bias.to(dtype))
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def quant_branch(self, x2: torch.Tensor) -> torch.Tensor | None:
        """``Ŵq (Q^T P^T x)`` for 2-D ``x2`` (tokens x n) in its dtype; None without a residual."""
        # the shared scratch buffer is overwritten by the next layer: not when autograd keeps wq
        scratch = not (torch.is_grad_enabled() and x2.requires_grad)
        wq = self._residual(x2.dtype, scratch=scratch)
        return None if wq is None else F.linear(self.transform_input(x2), wq)

    def lowrank_branch(self, x2: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor | None:
        """``y + U (S * (V (x / alpha)))`` as two thin matmuls (added into `y` in place when given)."""
        if self.spec["lowrank"] is None:
            return y
        dtype = x2.dtype
        tokens, r = x2.shape[0], self.spec["lowrank"]["rank"]
        V, U, S = _widen(self.lr_V, dtype), _widen(self.lr_U, dtype), self.lr_S.to(dtype)
        if self.spec["alpha"]:  # 1/alpha on whichever is smaller: the input (tokens x n) or V (r x n)
            if tokens <= r:
                x2 = x2 / self.alpha.to(dtype)
            else:
                V = V / self.alpha.to(dtype)
        t = F.linear(x2, V)
        if tokens <= self.out_features:  # S on t (tokens x r) or on U (m x r)
            t = t.mul_(S)
        else:
            U = U * S
        return F.linear(t, U) if y is None else y.addmm_(t, U.T)

    # ------------------------------------------------------------------ misc

    def _any_buffer(self) -> torch.Tensor:
        return next(iter(self._buffers.values()))

    def _apply(self, fn, recurse=True):
        """Device moves apply to every buffer; dtype casts (``model.half()``, ``.to(torch.bfloat16)``)
        only to the bias: the packed tensors are exact in their own dtypes and stay in them."""
        self._derived = {}
        self._w_cache = None
        if self.backend is not None:  # kernel layouts are per device: rebuilt on the next call
            self.backend.reset()
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            new = fn(buf)
            if name != "bias" and new.dtype != buf.dtype:
                new = buf.to(device=new.device)
            self._buffers[name] = new
        return self

    def storage_bits(self) -> int:
        """Bits held by the buffers (bias excluded)."""
        return sum(t.numel() * t.element_size() * 8 for k, t in self._buffers.items() if k != "bias")

    def effective_bits(self) -> float:
        return self.storage_bits() / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        res = self.spec["residual"]
        desc = "none" if res is None else f"{res['kind']} {res['bits']}b"
        lr = self.spec["lowrank"]
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}", f"residual={desc}"]
        if lr:
            parts.append(f"rank={lr['rank']} {lr['storage']}")
        if self.spec["perm"]:
            parts.append("perm")
        if self.rotation is not None:
            parts.append(f"rotation={self.rotation.block_identity}/{self.rotation.block_hadamard}")
        parts.append(f"bias={self.spec['bias']}")
        if self.backend is not None:
            parts.append(f"backend={self.backend.choice}")
        return ", ".join(parts)


@functools.lru_cache(maxsize=16)
def _fp8_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 256 float8_e4m3fn values in `dtype`, indexed by their bit pattern."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(dtype).to(device)


def _widen(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)`; fp8 on the CPU by table lookup (several times faster than PyTorch's cast there)."""
    if t.dtype != torch.float8_e4m3fn or t.device.type != "cpu":
        return t.to(dtype)
    codes = t.view(torch.uint8).reshape(-1).to(torch.int32)
    return _fp8_table(dtype, t.device).index_select(0, codes).view(t.shape)


def _check_spec(spec: dict) -> dict:
    for key in ("in_features", "out_features", "residual", "lowrank"):
        if key not in spec:
            raise ValueError(f"QuantLinear spec is missing {key!r}")
    if spec.get("version", SPEC_VERSION) > SPEC_VERSION:
        raise ValueError(f"QuantLinear spec version {spec['version']} is newer than this library's "
                         f"({SPEC_VERSION}); upgrade lopro")
    return spec


# --------------------------------------------------------------------------- scalar residual

def _pack_scalar(q, m: int, n: int) -> tuple[dict, dict[str, torch.Tensor]]:
    if tuple(q.codes.shape) != (m, n):
        raise ValueError(f"codes of shape {tuple(q.codes.shape)} do not match the layer ({m}, {n})")
    bits, G = q.bits, q.scale.shape[1]
    maxq = 2**bits - 1
    zero = q.zero.detach()
    sym = bool(q.sym) and bool((zero == (maxq + 1) / 2).all())
    tensors = {"qweight": pack(q.codes, bits), "scales": q.scale.detach().to(torch.float16)}
    if not sym:
        zr = torch.round(zero)
        if not torch.equal(zr, zero) or bool((zr < 0).any()) or bool((zr > maxq).any()):
            raise ValueError(f"zeros must be integers in [0, {maxq}] to be packed at {bits} bits")
        tensors["qzeros"] = pack(zr.to(torch.uint8), bits)
    group_size = _regular_group_size(q.g_idx, G)
    if group_size is None:
        tensors["g_idx"] = q.g_idx.to(_index_dtype(G))
    res = {"kind": "scalar", "bits": bits, "sym": sym, "num_groups": G, "group_size": group_size}
    return res, tensors


class _Workspace(threading.local):
    """One reusable scratch buffer per (role, dtype) on the CPU, shared by all layers of a thread.

    Dequantizing a layer writes ``m * n`` compute-dtype elements; allocating them afresh on every
    call costs page faults that dominate large layers (glibc maps big blocks anew each time). The
    buffer holds at most the largest layer's dequantized weight: the "one layer's fp weights" of
    the memory budget. CUDA needs none (its caching allocator reuses blocks).
    """

    def __init__(self):
        self.bufs: dict = {}

    def get(self, role: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if device.type != "cpu":
            return torch.empty(numel, dtype=dtype, device=device)
        buf = self.bufs.get((role, dtype))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype)
            self.bufs[(role, dtype)] = buf
        return buf[:numel]


_WORKSPACE = _Workspace()


def release_workspace() -> None:
    """Free this thread's dequantization scratch buffers."""
    _WORKSPACE.bufs.clear()


CHUNK_ELEMENTS = 1 << 18  # dequantize this many weights at a time, so that every pass stays in cache


def _word_view(packed: torch.Tensor) -> torch.Tensor:
    """The packed rows as little-endian words (int32 when the row length allows, else int16/uint8)."""
    nb = packed.shape[1]
    if sys.byteorder == "little" and packed.is_contiguous():
        if nb % 4 == 0:
            return packed.view(torch.int32)
        if nb % 2 == 0:
            return packed.view(torch.int16)
    return packed


@functools.lru_cache(maxsize=64)
def _shifts(bits: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    width = torch.iinfo(dtype).bits
    return torch.arange(0, width, bits, dtype=dtype, device=device)


def _unpack_rows(packed: torch.Tensor, bits: int, n: int, out: torch.Tensor, scratch: torch.Tensor | None) -> None:
    """Codes of `packed` rows into the float rows `out[:, :n]` (same number of rows)."""
    if 8 % bits:  # 3, 5, 6, 7 bits: the generic unpacker
        out[:, :n].copy_(unpack(packed, bits, n))
        return
    if bits == 8:
        out[:, :n].copy_(packed)
        return
    words = _word_view(packed)
    rows, nw = words.shape
    per = torch.iinfo(words.dtype).bits // bits
    shifts = _shifts(bits, words.dtype, words.device)
    tmp = torch.empty(rows, nw, per, dtype=words.dtype, device=words.device) if scratch is None else \
        scratch[: rows * nw * per].view(rows, nw, per)
    torch.bitwise_right_shift(words.unsqueeze(-1), shifts, out=tmp)
    tmp.bitwise_and_((1 << bits) - 1)
    if nw * per == n:
        out[:, :n].view(rows, nw, per).copy_(tmp)
    else:  # padding codes at the end of each row
        out[:, :n].copy_(tmp.view(rows, nw * per)[:, :n])


def _dequant_scalar(mod: QuantLinear, res: dict, dtype: torch.dtype, scratch: bool = False) -> torch.Tensor:
    """s * (codes - z) per (row, group), computed in chunks of rows; with `scratch` the result lives
    in the shared workspace (valid until the next layer dequantizes)."""
    m, n = mod.out_features, mod.in_features
    bits, G, gs = res["bits"], res["num_groups"], res["group_size"]
    maxq = 2**bits - 1
    dev = mod.qweight.device
    scales = mod.scales.to(dtype)
    zeros = torch.full_like(scales, (maxq + 1) / 2) if res["sym"] else unpack(mod.qzeros, bits, G).to(dtype)
    offset = -(zeros * scales)  # w = codes * s - z * s
    out = _WORKSPACE.get("weight", m * n, dtype, dev).view(m, n) if scratch else \
        torch.empty(m, n, dtype=dtype, device=dev)
    rows = max(1, min(m, CHUNK_ELEMENTS // max(n, 1)))
    words = _word_view(mod.qweight)
    int_scratch = None
    if 8 % bits == 0 and bits != 8 and dev.type == "cpu":
        per_row = words.shape[1] * (torch.iinfo(words.dtype).bits // bits)
        int_scratch = _WORKSPACE.get(f"int{words.dtype}", rows * per_row, words.dtype, dev)
    full = n // gs if gs is not None else 0
    idx = mod.g_idx.to(torch.int64) if gs is None else None
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        chunk = out[r0:r1]
        _unpack_rows(mod.qweight[r0:r1], bits, n, chunk, int_scratch)
        s, o = scales[r0:r1], offset[r0:r1]
        if gs is None:  # act-order: arbitrary column -> group map
            chunk.mul_(s[:, idx]).add_(o[:, idx])
            continue
        if full:
            grouped = chunk[:, : full * gs].view(r1 - r0, full, gs)
            grouped.mul_(s[:, :full, None]).add_(o[:, :full, None])
        if full < G:  # a shorter last group
            chunk[:, full * gs:].mul_(s[:, full:]).add_(o[:, full:])
    return out


# --------------------------------------------------------------------------- vector residual

def _pack_vq(vq, m: int, n: int) -> tuple[dict, dict[str, torch.Tensor]]:
    lay = vq.layout
    if tuple(lay.shape) != (m, n):
        raise ValueError(f"VQ layout shape {tuple(lay.shape)} does not match the layer ({m}, {n})")
    ibits = vq.bits * lay.dim
    idx = vq.indices.detach()
    tensors = {"vq_indices": pack(idx.to(torch.int64), ibits) if ibits <= 8 else idx.to(torch.int16),
               "vq_codebooks": vq.codebooks.detach().to(torch.int8),
               "vq_scale": vq.codebook_scale.detach().to(torch.float16)}
    res = {"kind": "vq", "bits": vq.bits, "codebook_bits": vq.codebook_bits,
           "layout": {"shape": [m, n], "dim": lay.dim, "col_bounds": list(lay.col_bounds),
                      "row_bounds": list(lay.row_bounds)}}
    return res, tensors


def _dequant_vq(mod: QuantLinear, res: dict, dtype: torch.dtype) -> torch.Tensor:
    from lopro.quant.gptvq import vq_decode

    layout = _vq_layout(res)
    ibits = res["bits"] * layout.dim
    nv = layout.n_pad // layout.dim
    idx = unpack(mod.vq_indices, ibits, nv) if ibits <= 8 else mod.vq_indices
    return vq_decode(idx, mod.vq_codebooks, mod.vq_scale, layout).to(dtype)


# --------------------------------------------------------------------------- model surgery

def get_submodule_parent(model: nn.Module, full_name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = full_name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def pack_layer(model: nn.Module, block_index: int, name: str, module: nn.Module, result,
               compute_dtype: torch.dtype | None = None, blocks: nn.ModuleList | None = None) -> QuantLinear:
    """Replace the nn.Linear `name` of block `block_index` by a QuantLinear built from `result`.

    Use as the pipeline's callback: ``quantize(model, cfg, calib, on_layer=packer(model))``.
    `blocks` (the model's decoder blocks) must be given once packing has started: block discovery
    looks for nn.Linear layers, which packing removes.
    """
    if blocks is None:
        from lopro.model.walk import find_blocks

        _, blocks = find_blocks(model)
    parent, attr = get_submodule_parent(blocks[block_index], name)
    current = getattr(parent, attr)
    if current is not module:
        raise ValueError(f"block {block_index} {name}: the module to replace is not the one quantized")
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    qlin = QuantLinear.from_result(result, bias=bias, compute_dtype=compute_dtype)
    device = module.weight.device
    setattr(parent, attr, qlin.to(device))
    return qlin


def packer(model: nn.Module, compute_dtype: torch.dtype | None = None, keep_weights: dict | None = None):
    """An `on_layer` callback packing every layer; with `keep_weights` (a dict) also records each
    result's dense weight under ``(block_index, name)`` (for comparisons with fake quantization)."""
    from lopro.model.walk import find_blocks

    _, blocks = find_blocks(model)

    def on_layer(block_index, name, module, result):
        if keep_weights is not None:
            keep_weights[(block_index, name)] = result.weight.detach().cpu().clone()
        pack_layer(model, block_index, name, module, result, compute_dtype, blocks)

    return on_layer


def quant_linear_specs(model: nn.Module) -> dict[str, dict]:
    """Full module name -> spec, for every QuantLinear of `model`."""
    return {name: mod.spec for name, mod in model.named_modules() if isinstance(mod, QuantLinear)}


def install_quant_linears(model: nn.Module, specs: dict[str, dict], device: torch.device | str = "meta",
                          compute_dtype: torch.dtype | None = None) -> None:
    """Swap the modules named in `specs` for empty QuantLinear skeletons (before loading tensors)."""
    from lopro.model.moe import unfuse_experts  # packed experts live as per-expert modules

    unfuse_experts(model)
    for full_name, spec in specs.items():
        try:
            parent, attr = get_submodule_parent(model, full_name)
            old = getattr(parent, attr)
        except AttributeError:
            raise ValueError(f"the checkpoint quantizes module {full_name!r}, which this architecture "
                             "does not have") from None
        if isinstance(old, nn.Linear) and (old.in_features, old.out_features) != (
                spec["in_features"], spec["out_features"]):
            raise ValueError(f"module {full_name}: the checkpoint has shape ({spec['out_features']}, "
                             f"{spec['in_features']}) but the architecture ({old.out_features}, {old.in_features})")
        setattr(parent, attr, QuantLinear(spec, device=device, compute_dtype=compute_dtype))


def set_compute_dtype(model: nn.Module, dtype: torch.dtype | None) -> None:
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.compute_dtype = dtype


__all__ = ["QuantLinear", "SPEC_VERSION", "buffer_specs", "effective_bits", "pack_layer", "packer",
           "quant_linear_specs", "install_quant_linears", "set_compute_dtype", "release_workspace"]
