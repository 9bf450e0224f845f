"""What an exporter reads from a packed layer: its scalar residual in plain form, or why there is none.

Everything comes from the public side of a loaded checkpoint: a `QuantLinear`'s spec and buffers,
unpacked with `lopro.quant.packing.unpack`. A scalar residual is returned in the original column
order (a permutation without rotation is undone here: column ``perm[j]`` of the layer is column
``j`` of the residual), as integer codes with per-(row, group) fp16 scales and integer zeros and
the group of every column, so that ``W = s[:, g] * (c - z[:, g])`` exactly.

Refusals are :class:`ExportError` (a ``ValueError``) whose message names the layer, what cannot be
written exactly, and the nearest lossy option with its error measured on that layer.
"""
from __future__ import annotations

import torch

from lopro.export.base import ExportError, ScalarLayer
from lopro.export.gguf_file import requantize_error
from lopro.nn.qlinear import QuantLinear
from lopro.quant.packing import unpack

__all__ = ["ExportError", "ScalarLayer", "quant_layers", "has_rotation", "scalar_layer", "lowrank_factors"]


def quant_layers(model: torch.nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def has_rotation(mod: QuantLinear) -> bool:
    return mod.rotation is not None and not mod.rotation.is_identity


def lossy_hint(mod: QuantLinear, fmt: str) -> str:
    """The nearest lossy option for a layer and its error measured on it (relative Frobenius)."""
    if fmt == "gguf":
        err = requantize_error(mod.dense_weight(), "q8_0")
        return (f"nearest lossy option: lossy='q8_0' (re-quantize the layer's dense weight to GGUF Q8_0, "
                f"8.5 bits/weight; relative error on this layer {err:.2e})")
    return "no lossy GPTQ-format option is offered; GGUF with lossy='q8_0' re-quantizes the dense weight " \
           f"(relative error on this layer {requantize_error(mod.dense_weight(), 'q8_0'):.2e})"


def scalar_layer(name: str, mod: QuantLinear, fmt: str) -> ScalarLayer:
    """The layer's residual in plain form; ExportError when it is not a scalar residual a format can hold."""
    res = mod.spec["residual"]
    what = {"gguf": "GGUF", "gptq": "the GPTQ format", "lora": "a LoRA base"}[fmt]
    if has_rotation(mod):
        raise ExportError(f"{name}: LoPRo's online block-Hadamard rotation of the input cannot be expressed in "
                          f"{what} (its kernels multiply stored weights with the raw input); "
                          + lossy_hint(mod, "gguf" if fmt == "gguf" else "gptq"))
    if res is None:
        raise ExportError(f"{name}: the layer has no quantized residual, only a low-rank branch; "
                          + lossy_hint(mod, "gguf" if fmt == "gguf" else "gptq"))
    if res["kind"] != "scalar":
        raise ExportError(f"{name}: a vector-quantized residual (GPTVQ codebooks, {res['bits']} bits/weight) has "
                          f"no exact form in {what}, whose codes are scalar integers; "
                          + lossy_hint(mod, "gguf" if fmt == "gguf" else "gptq"))
    m, n = mod.out_features, mod.in_features
    bits, G = res["bits"], res["num_groups"]
    codes = unpack(mod.qweight, bits, n)
    scales = mod.scales.detach().to(torch.float16).cpu()
    if res["sym"]:
        zeros = torch.full((m, G), 2 ** (bits - 1), dtype=torch.int16)
    else:
        zeros = unpack(mod.qzeros, bits, G).to(torch.int16)
    if res["group_size"] is not None:
        g_idx = torch.arange(n) // res["group_size"]
    else:
        g_idx = mod.g_idx.to(torch.int64)
    if mod.spec["perm"]:  # the quantized branch reads x[perm]: residual column j is layer column perm[j]
        perm = mod.perm.to(torch.int64)
        orig_codes = torch.empty_like(codes)
        orig_codes[:, perm] = codes
        orig_g = torch.empty_like(g_idx)
        orig_g[perm] = g_idx
        codes, g_idx = orig_codes, orig_g
    bias = mod.bias.detach().float().cpu() if mod.spec["bias"] else None
    return ScalarLayer(name, bits, bool(res["sym"]), codes.cpu(), scales, zeros.cpu(), g_idx.cpu(), bias)


def lowrank_factors(mod: QuantLinear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(lora_A = diag(S) V diag(alpha)^-1 [r, n], lora_B = U [m, r]) in fp32, so that B A = W_r; None without."""
    if mod.spec["lowrank"] is None or mod.spec["lowrank"]["rank"] == 0:
        return None
    U = mod.lr_U.to(torch.float32)
    A = mod.lr_S.to(torch.float32)[:, None] * mod.lr_V.to(torch.float32)
    if mod.spec["alpha"]:
        A = A / mod.alpha.to(torch.float32)
    return A.contiguous(), U.contiguous()
