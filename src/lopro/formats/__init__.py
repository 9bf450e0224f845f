"""What a packed layer stores: the one table every count of bits, every checkpoint and every loader uses.

A layer's **spec** (JSON, kept in the checkpoint's ``quantization_config``) says which parts exist;
:func:`buffer_specs` turns it into the tensors it holds, and :func:`storage_bits` counts them. The
residual kinds are entries of :data:`RESIDUALS` (``scalar``: RTN/GPTQ/FLRQ codes; ``vq``: GPTVQ
indices and codebooks), each with ``plan`` (spec), ``spec_of`` (spec of a solver's result),
``buffers``, ``pack_residual`` and ``dequantize``.

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
lr_V           (lopro.linalg.r1svd.FACTOR_DTYPES: fp8 U/V + fp16 S, ...)
alpha          [n] fp16                                                 alpha
perm           [n] int16/int32 (lopro.quant.packing.index_dtype)       perm
bias           [m] float                                                bias
=============  ======================================================  ==========================
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import torch

from lopro.formats import scalar, vq
from lopro.linalg.r1svd import FACTOR_DTYPES
from lopro.quant.gptvq import VQResult
from lopro.quant.packing import index_dtype
from lopro.quant.rtn import ScalarQuant

SPEC_VERSION = 1
RESIDUALS = {scalar.KIND: scalar, vq.KIND: vq}


def residual_format(res: dict):
    try:
        return RESIDUALS[res["kind"]]
    except KeyError:
        raise ValueError(f"unknown residual kind {res['kind']!r} in QuantLinear spec; known: "
                         f"{sorted(RESIDUALS)}") from None


def layer_spec(m: int, n: int, residual: dict | None, lowrank: dict | None = None, alpha: bool = False,
               perm: bool = False, rotation: dict | None = None, bias: bool = False) -> dict:
    return {"version": SPEC_VERSION, "in_features": n, "out_features": m, "bias": bias, "residual": residual,
            "lowrank": lowrank, "alpha": alpha, "perm": perm, "rotation": rotation}


def buffer_specs(spec: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor a layer with this spec holds: name -> (shape, dtype)."""
    m, n = spec["out_features"], spec["in_features"]
    res = spec.get("residual")
    out = dict(residual_format(res).buffers(res, m, n)) if res is not None else {}
    lr = spec.get("lowrank")
    if lr is not None:
        vec, sig = FACTOR_DTYPES[lr["storage"]]
        r = lr["rank"]
        out["lr_U"] = ((m, r), vec)
        out["lr_S"] = ((r,), sig)
        out["lr_V"] = ((r, n), vec)
    if spec.get("alpha"):
        out["alpha"] = ((n,), torch.float16)
    if spec.get("perm"):
        out["perm"] = ((n,), index_dtype(n))
    if spec.get("bias"):
        out["bias"] = ((m,), torch.float32)  # dtype not fixed: any float dtype is accepted
    return out


@functools.lru_cache(maxsize=None)
def _dtype_bits(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size() * 8


def storage_bits(spec: dict) -> int:
    """Bits a layer with this spec stores (bias excluded): the one count of effective bits."""
    return sum(math.prod(shape) * _dtype_bits(dtype) for name, (shape, dtype) in buffer_specs(spec).items()
               if name != "bias")


def effective_bits(spec: dict) -> float:
    return storage_bits(spec) / (spec["out_features"] * spec["in_features"])


def lowrank_bits(m: int, n: int, rank: int, storage: str) -> int:
    """Bits of rank-`rank` factors of an m x n layer (U, S, V as stored)."""
    return storage_bits(layer_spec(m, n, None, {"rank": rank, "storage": storage})) if rank else 0


def spec_of(result: Any, bias: bool = False) -> dict:
    """The spec a method's LayerResult packs into (no tensor is packed)."""
    m, n = result.weight.shape
    res = None
    if result.residual is not None:
        fmt = scalar if isinstance(result.residual, ScalarQuant) else vq if isinstance(result.residual, VQResult) \
            else None
        if fmt is None:
            raise TypeError(f"unknown residual type {type(result.residual).__name__}")
        res = fmt.spec_of(result.residual, m, n)
    lr = result.lowrank
    if lr is not None and (lr.U.ndim != 2 or lr.U.shape[0] != m or lr.V.shape[-1] != n):
        raise ValueError(f"low-rank factors of shape {tuple(lr.shape)} do not match the layer ({m}, {n})")
    return layer_spec(m, n, res, None if lr is None else {"rank": lr.rank, "storage": lr.storage},
                      alpha=result.alpha is not None, perm=result.perm is not None,
                      rotation=None if result.rotation is None else result.rotation.to_dict(), bias=bias)


def pack(result: Any, bias: torch.Tensor | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(spec, tensors) of a method's LayerResult: what a QuantLinear holds."""
    m, n = result.weight.shape
    spec = spec_of(result, bias is not None)
    tensors: dict[str, torch.Tensor] = {}
    if spec["residual"] is not None:
        _, t = residual_format(spec["residual"]).pack_residual(result.residual, m, n)
        tensors.update(t)
    if result.lowrank is not None:
        lr = result.lowrank
        vec, sig = FACTOR_DTYPES[lr.storage]
        tensors.update(lr_U=lr.U.to(vec), lr_S=lr.S.to(sig), lr_V=lr.V.to(vec))
    if result.alpha is not None:
        tensors["alpha"] = result.alpha.detach().to(torch.float16)
    if result.perm is not None:
        perm = result.perm.detach()
        if not torch.equal(torch.sort(perm.cpu().long()).values, torch.arange(n)):
            raise ValueError("the result's perm is not a permutation of the input columns")
        tensors["perm"] = perm.to(index_dtype(n))
    if bias is not None:
        tensors["bias"] = bias.detach().clone()
    return spec, tensors


def dequantize_residual(buf: Mapping[str, torch.Tensor], spec: dict, dtype: torch.dtype,
                        scratch: bool = False) -> torch.Tensor | None:
    """Ŵq ([m, n], in the transformed column space) from a layer's tensors, or None without a residual."""
    res = spec["residual"]
    if res is None:
        return None
    return residual_format(res).dequantize(buf, res, spec["out_features"], spec["in_features"], dtype, scratch)


@functools.lru_cache(maxsize=16)
def _fp8_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 256 float8_e4m3fn values in `dtype`, indexed by their bit pattern."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(dtype).to(device)


def widen(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)`; fp8 on the CPU by table lookup (several times faster than PyTorch's cast there)."""
    if t.dtype != torch.float8_e4m3fn or t.device.type != "cpu":
        return t.to(dtype)
    codes = t.view(torch.uint8).reshape(-1).to(torch.int32)
    return _fp8_table(dtype, t.device).index_select(0, codes).view(t.shape)


__all__ = ["SPEC_VERSION", "RESIDUALS", "FACTOR_DTYPES", "layer_spec", "buffer_specs", "storage_bits",
           "effective_bits", "lowrank_bits", "spec_of", "pack", "dequantize_residual", "widen", "index_dtype"]
