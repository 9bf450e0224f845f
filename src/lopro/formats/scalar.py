"""Scalar residuals (RTN, GPTQ, FLRQ): integer codes packed `bits` wide, fp16 scales per (row, group),
packed integer zeros unless symmetric, and a column -> group map only when groups are not contiguous."""
from __future__ import annotations

import functools
import math
import sys
import threading
from typing import Mapping

import torch

from lopro.quant.packing import index_dtype, pack, packed_length, unpack

KIND = "scalar"


def _regular_group_size(g_idx: torch.Tensor, num_groups: int) -> int | None:
    """The group size when column j is in group j // gs (contiguous groups), else None."""
    idx = g_idx.cpu().long()
    n = idx.numel()
    gs = int((idx == 0).sum())
    if gs == 0 or math.ceil(n / gs) != num_groups:
        return None
    return gs if torch.equal(idx, torch.arange(n) // gs) else None


def plan(bits: int, num_groups: int, group_size: int | None, sym: bool) -> dict:
    """The residual spec of a scalar layer (what `buffers` reads)."""
    return {"kind": KIND, "bits": bits, "sym": sym, "num_groups": num_groups, "group_size": group_size}


def buffers(res: dict, m: int, n: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    bits, G = res["bits"], res["num_groups"]
    out = {"qweight": ((m, packed_length(n, bits)), torch.uint8), "scales": ((m, G), torch.float16)}
    if not res["sym"]:
        out["qzeros"] = ((m, packed_length(G, bits)), torch.uint8)
    if res["group_size"] is None:
        out["g_idx"] = ((n,), index_dtype(G))
    return out


def spec_of(q, m: int, n: int) -> dict:
    """The residual spec a ScalarQuant packs into: zeros are stored unless every one is the midpoint."""
    if tuple(q.codes.shape) != (m, n):
        raise ValueError(f"codes of shape {tuple(q.codes.shape)} do not match the layer ({m}, {n})")
    bits, G = q.bits, q.scale.shape[1]
    sym = bool(q.sym) and bool((q.zero == (2**bits) / 2).all())
    return plan(bits, G, _regular_group_size(q.g_idx, G), sym)


def pack_residual(q, m: int, n: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """(residual spec, tensors) of a ScalarQuant."""
    res = spec_of(q, m, n)
    bits, maxq = res["bits"], 2 ** res["bits"] - 1
    tensors = {"qweight": pack(q.codes, bits), "scales": q.scale.detach().to(torch.float16)}
    if not res["sym"]:
        zero = q.zero.detach()
        zr = torch.round(zero)
        if not torch.equal(zr, zero) or bool((zr < 0).any()) or bool((zr > maxq).any()):
            raise ValueError(f"zeros must be integers in [0, {maxq}] to be packed at {bits} bits")
        tensors["qzeros"] = pack(zr.to(torch.uint8), bits)
    if res["group_size"] is None:
        tensors["g_idx"] = q.g_idx.to(index_dtype(res["num_groups"]))
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


def dequantize(buf: Mapping[str, torch.Tensor], res: dict, m: int, n: int, dtype: torch.dtype,
               scratch: bool = False) -> torch.Tensor:
    """s * (codes - z) per (row, group), computed in chunks of rows; with `scratch` the result lives
    in the shared workspace (valid until the next layer dequantizes)."""
    bits, G, gs = res["bits"], res["num_groups"], res["group_size"]
    maxq = 2**bits - 1
    qweight = buf["qweight"]
    dev = qweight.device
    scales = buf["scales"].to(dtype)
    zeros = torch.full_like(scales, (maxq + 1) / 2) if res["sym"] else unpack(buf["qzeros"], bits, G).to(dtype)
    offset = -(zeros * scales)  # w = codes * s - z * s
    out = _WORKSPACE.get("weight", m * n, dtype, dev).view(m, n) if scratch else \
        torch.empty(m, n, dtype=dtype, device=dev)
    rows = max(1, min(m, CHUNK_ELEMENTS // max(n, 1)))
    words = _word_view(qweight)
    int_scratch = None
    if 8 % bits == 0 and bits != 8 and dev.type == "cpu":
        per_row = words.shape[1] * (torch.iinfo(words.dtype).bits // bits)
        int_scratch = _WORKSPACE.get(f"int{words.dtype}", rows * per_row, words.dtype, dev)
    full = n // gs if gs is not None else 0
    idx = buf["g_idx"].to(torch.int64) if gs is None else None
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        chunk = out[r0:r1]
        _unpack_rows(qweight[r0:r1], bits, n, chunk, int_scratch)
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
