"""Module surgery: put packed QuantLinear layers into a model (from a method's results while it is
quantized, or as empty skeletons before a checkpoint's tensors are loaded) and list them."""
from __future__ import annotations

import torch
from torch import nn

from lopro.model.moe import unfuse_experts
from lopro.model.walk import find_blocks
from lopro.nn.qlinear import QuantLinear, set_compute_dtype  # noqa: F401 (re-exported)



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
    unfuse_experts(model)  # packed experts live as per-expert modules
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


__all__ = ["get_submodule_parent", "pack_layer", "packer", "quant_linear_specs", "install_quant_linears",
           "set_compute_dtype"]
