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

The buffers of each spec, and how they are counted, are the table in :mod:`lopro.formats`.

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

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lopro import formats
from lopro.formats import SPEC_VERSION, buffer_specs, widen
from lopro.linalg.hadamard import BlockRotation, hadamard_matrix

ROTATION_IMPLS = ("matmul", "fwht")
_CPU_COMPUTE = (torch.float32, torch.bfloat16, torch.float64)
_CUDA_COMPUTE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
        device = result.weight.device
        spec, tensors = formats.pack(result, bias)
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
        if torch.is_autocast_enabled(x.device.type):  # the pipeline's bf16 forwards: compute in autocast's dtype
            return torch.get_autocast_dtype(x.device.type)
        allowed = _CUDA_COMPUTE if x.device.type == "cuda" else _CPU_COMPUTE
        return x.dtype if x.dtype in allowed else torch.float32

    def dequantize_residual(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """Ŵq ([m, n], in the transformed column space) in `dtype`, or None when there is no residual."""
        return self._residual(dtype, scratch=False)

    def _residual(self, dtype: torch.dtype, scratch: bool) -> torch.Tensor | None:
        if self.spec["residual"] is None:
            return None
        device = self._any_buffer().device
        if self.cache_weight and self._w_cache is not None and self._w_cache[0] == (dtype, device):
            return self._w_cache[1]
        w = formats.dequantize_residual(self._buffers, self.spec, dtype, scratch=scratch and not self.cache_weight)
        if self.cache_weight:
            self._w_cache = ((dtype, device), w)
        return w

    def lowrank_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """W_r = U diag(S) V diag(alpha)^-1 ([m, n]) or None."""
        if self.spec["lowrank"] is None:
            return None
        w = (widen(self.lr_U, torch.float32) * self.lr_S.to(torch.float32)) @ widen(self.lr_V, torch.float32)
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
        # one 2-D matmul over contiguous rows of b_H: a batched matmul over a strided view is 2x slower in
        # fp32 and 50x slower in bf16 on CPU
        mid = x2[:, start:stop].contiguous().view(-1, rot.block_hadamard)
        out[:, start:stop] = torch.mm(mid, H).view(x2.shape[0], stop - start)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend is not None:
            return self.backend(self, x)
        dtype = self._compute_dtype(x)
        if torch.is_autocast_enabled(x.device.type):  # every operand already in `dtype`: autocast would mix them
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x, dtype)
        return self._forward(x, dtype)

    def _forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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
        V, U, S = widen(self.lr_V, dtype), widen(self.lr_U, dtype), self.lr_S.to(dtype)
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
        """Bits the layer stores (bias excluded), counted by lopro.formats from its spec."""
        return formats.storage_bits(self.spec)

    def effective_bits(self) -> float:
        return formats.effective_bits(self.spec)

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


def _check_spec(spec: dict) -> dict:
    for key in ("in_features", "out_features", "residual", "lowrank"):
        if key not in spec:
            raise ValueError(f"QuantLinear spec is missing {key!r}")
    if spec.get("version", SPEC_VERSION) > SPEC_VERSION:
        raise ValueError(f"QuantLinear spec version {spec['version']} is newer than this library's "
                         f"({SPEC_VERSION}); upgrade lopro")
    return spec


def set_compute_dtype(model: nn.Module, dtype: torch.dtype | None) -> None:
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.compute_dtype = dtype


__all__ = ["QuantLinear", "SPEC_VERSION", "buffer_specs", "set_compute_dtype"]
