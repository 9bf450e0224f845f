"""GPTQ-format (AutoGPTQ / GPTQModel / transformers `quant_method: "gptq"`) tensors of a scalar residual.

Per quantized linear ``name`` (``m`` outputs, ``n`` inputs, ``G`` groups, ``b`` bits):

- ``name.qweight`` int32 ``[n * b / 32, m]``: for each output column, its ``n`` input codes as a
  little-endian stream of ``b``-bit values cut into 32-bit words (4-bit: word ``i`` holds inputs
  ``8i .. 8i + 7``, input ``8i + k`` in bits ``4k .. 4k + 3``; 3-bit values straddle words);
- ``name.qzeros`` int32 ``[G, m * b / 32]``: the zero points packed the same way along the outputs,
  stored minus one (``gptq`` checkpoint format; readers add one back), or as they are (``gptq_v2``);
- ``name.scales`` fp16 ``[G, m]``; ``name.g_idx`` int32 ``[n]``: the group of each input;
- ``name.bias`` fp16 ``[m]`` when the layer has one.

``W[i, j] = scales[g, i] * (code[j, i] - zero[g, i])`` with ``g = g_idx[j]``.
"""
from __future__ import annotations

import sys

import torch

from lopro.quant.packing import pack
from lopro.export.base import ExportError, ScalarLayer

CHECKPOINT_FORMATS = ("auto", "gptq", "gptq_v2")
GPTQ_BITS = (2, 3, 4, 8)


def _words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Rows of codes -> rows of little-endian int32 words of their bit stream."""
    raw = pack(codes, bits)
    if sys.byteorder != "little":
        raise RuntimeError("GPTQ-format packing here assumes a little-endian machine")
    return raw.contiguous().view(torch.int32)


def storable_v1(layer: ScalarLayer) -> bool:
    """Whether the 'gptq' (zero - 1) format holds the layer exactly."""
    return not bool((layer.zeros == 0).any()) or not bool((_avoid_zero_points(layer)[1] == 0).any())


def layer_tensors(layer: ScalarLayer, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    if checkpoint_format not in CHECKPOINT_FORMATS[1:]:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS[1:]}, got {checkpoint_format!r}")
    m, n = layer.shape
    b = layer.bits
    if b not in GPTQ_BITS:
        raise ExportError(f"{layer.name}: {b}-bit codes: GPTQ-format kernels take {GPTQ_BITS} bits")
    for what, size in (("input", n), ("output", m)):
        if size * b % 32:
            raise ExportError(f"{layer.name}: {size} {what} features x {b} bits is not a whole number of "
                              "32-bit words, which the GPTQ packing needs")
    codes, zeros = layer.codes, layer.zeros.to(torch.int32)
    if checkpoint_format == "gptq" and bool((zeros == 0).any()):
        codes, zeros = _avoid_zero_points(layer)
        if bool((zeros == 0).any()):
            count = int((zeros == 0).sum())
            raise ExportError(f"{layer.name}: {count} group(s) have zero point 0 and use the top code, which the "
                              "'gptq' checkpoint format cannot store (it keeps zero - 1 in b bits, and readers "
                              "disagree on -1); use checkpoint_format='gptq_v2' (exact, read by GPTQModel)")
    zeros = zeros.T.contiguous()  # [G, m]
    if checkpoint_format == "gptq":
        zeros = zeros - 1
    out = {
        "qweight": _words(codes, b).T.contiguous(),
        "qzeros": _words(zeros.to(torch.uint8), b),
        "scales": layer.scales.T.contiguous().to(torch.float16),
        "g_idx": layer.g_idx.to(torch.int32),
    }
    if layer.bias is not None:
        out["bias"] = layer.bias.to(torch.float16)
    return out


def _avoid_zero_points(layer: ScalarLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, zeros) with every zero point 0 of a group whose codes stay below the top code moved to 1
    and its codes up by one: the same weights, storable as zero - 1."""
    m, n = layer.shape
    top = 2 ** layer.bits - 1
    gmax = torch.zeros(m, layer.num_groups, dtype=torch.int32)
    idx = layer.g_idx.expand(m, n)
    gmax.scatter_reduce_(1, idx, layer.codes.to(torch.int32), reduce="amax")
    move = (layer.zeros == 0) & (gmax < top)
    codes = layer.codes.to(torch.int32) + move.to(torch.int32).gather(1, idx)
    return codes.to(torch.uint8), layer.zeros.to(torch.int32) + move.to(torch.int32)


def quantize_config(bits: int, group_size: int, sym: bool, desc_act: bool, checkpoint_format: str) -> dict:
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym, "desc_act": desc_act,
            "damp_percent": 0.01, "static_groups": False, "true_sequential": True,
            "checkpoint_format": checkpoint_format, "model_file_base_name": "model",
            "pack_dtype": "int32", "meta": {"quantizer": ["lopro"]}}


def common_settings(layers: list[ScalarLayer]) -> tuple[int, int, bool, bool]:
    """(bits, group_size (-1: per channel), sym, desc_act) for one quantize_config, or ExportError.

    A layer with a single group fits any group size (its scale is repeated); act-order layers
    (non-contiguous groups) set desc_act and must still have ceil(n / group_size) groups."""
    kinds, sizes = set(), set()
    desc_act = False
    for layer in layers:
        kinds.add((layer.bits, layer.sym))
        n, G = layer.shape[1], layer.num_groups
        if G == 1:
            continue
        desc_act = desc_act or layer.contiguous_group_size() is None
        sizes.add(layer.group_size())
    if len(kinds) > 1 or len(sizes) > 1:
        raise ExportError(f"layers differ in bits/sym {sorted(kinds)} or group size {sorted(sizes)}; a GPTQ "
                          "quantize_config holds one setting")
    bits, sym = kinds.pop()
    group_size = sizes.pop() if sizes else -1
    for layer in layers:
        n, G = layer.shape[1], layer.num_groups
        if G != 1 and -(-n // group_size) != G:
            raise ExportError(f"{layer.name}: {G} groups over {n} columns do not match group size {group_size}")
    return bits, group_size, sym, desc_act


def regroup(layer: ScalarLayer, group_size: int) -> ScalarLayer:
    """A one-group layer spread over ceil(n / group_size) identical groups (exact)."""
    n = layer.shape[1]
    if layer.num_groups != 1 or group_size == -1 or group_size >= n:
        return layer
    G = -(-n // group_size)
    return ScalarLayer(layer.name, layer.bits, layer.sym, layer.codes, layer.scales.repeat(1, G),
                       layer.zeros.repeat(1, G), torch.arange(n) // group_size, layer.bias)
