"""Vector residuals (GPTVQ, LoPRo_v): codeword indices per `dim`-vector (packed when they fit in a
byte), int8 codebooks with one fp16 scale each; which codebook decodes a vector is the VQLayout."""
from __future__ import annotations

from typing import Mapping

import torch

from lopro.quant.gptvq import VQLayout, vq_decode
from lopro.quant.packing import pack, packed_length, unpack

KIND = "vq"


def layout(res: dict) -> VQLayout:
    lay = res["layout"]
    return VQLayout(tuple(lay["shape"]), lay["dim"], tuple(lay["col_bounds"]), tuple(lay["row_bounds"]))


def plan(bits: int, codebook_bits: int, lay: VQLayout) -> dict:
    m, n = lay.shape
    return {"kind": KIND, "bits": bits, "codebook_bits": codebook_bits,
            "layout": {"shape": [m, n], "dim": lay.dim, "col_bounds": list(lay.col_bounds),
                       "row_bounds": list(lay.row_bounds)}}


def buffers(res: dict, m: int, n: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    lay = res["layout"]
    nv = lay["col_bounds"][-1] // lay["dim"]
    ibits = res["bits"] * lay["dim"]
    ncb = (len(lay["col_bounds"]) - 1) * (len(lay["row_bounds"]) - 1)
    out = {"vq_indices": ((m, packed_length(nv, ibits)), torch.uint8) if ibits <= 8 else ((m, nv), torch.int16)}
    out["vq_codebooks"] = ((ncb, 2**ibits, lay["dim"]), torch.int8)
    out["vq_scale"] = ((ncb,), torch.float16)
    return out


def spec_of(vq, m: int, n: int) -> dict:
    if tuple(vq.layout.shape) != (m, n):
        raise ValueError(f"VQ layout shape {tuple(vq.layout.shape)} does not match the layer ({m}, {n})")
    return plan(vq.bits, vq.codebook_bits, vq.layout)


def pack_residual(vq, m: int, n: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """(residual spec, tensors) of a VQResult."""
    res = spec_of(vq, m, n)
    lay = vq.layout
    ibits = vq.bits * lay.dim
    idx = vq.indices.detach()
    tensors = {"vq_indices": pack(idx.to(torch.int64), ibits) if ibits <= 8 else idx.to(torch.int16),
               "vq_codebooks": vq.codebooks.detach().to(torch.int8),
               "vq_scale": vq.codebook_scale.detach().to(torch.float16)}
    return res, tensors


def dequantize(buf: Mapping[str, torch.Tensor], res: dict, m: int, n: int, dtype: torch.dtype,
               scratch: bool = False) -> torch.Tensor:
    lay = layout(res)
    ibits = res["bits"] * lay.dim
    nv = lay.n_pad // lay.dim
    idx = unpack(buf["vq_indices"], ibits, nv) if ibits <= 8 else buf["vq_indices"]
    return vq_decode(idx, buf["vq_codebooks"], buf["vq_scale"], lay).to(dtype)
