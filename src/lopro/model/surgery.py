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


class Packer:
    """The pipeline's `on_layer` for packed output (``quantize(..., on_layer=packer(model))``).

    A layer quantized mid-block keeps computing with its dequantized dense weight (fake quantization,
    as GPTQModel and llm-compressor calibrate) until the block's later stages and its propagation are
    done; the pipeline then calls :meth:`end_block`, which swaps in the packed QuantLinear layers. The
    dense weight is the block's own (overwritten in place) and the packed tensors are built at once, so
    this costs no memory; what it saves is running LoPRo's permutation, rotation and low-rank branch,
    and every format's unpacking, on every calibration batch. Packing and fake quantization therefore
    propagate the same activations and produce the same codes.

    With `keep_weights` (a dict) each result's dense weight is also recorded under
    ``(block_index, name)`` (for comparisons with fake quantization).
    """

    def __init__(self, model: nn.Module, compute_dtype: torch.dtype | None = None, keep_weights: dict | None = None):
        self.compute_dtype = compute_dtype
        self.keep_weights = keep_weights
        _, self.blocks = find_blocks(model)  # before packing starts: discovery looks for nn.Linear layers
        self.pending: dict[int, list] = {}

    def __call__(self, block_index, name, module, result) -> None:
        if self.keep_weights is not None:
            self.keep_weights[(block_index, name)] = result.weight.detach().cpu().clone()
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        qlin = QuantLinear.from_result(result, bias=bias, compute_dtype=self.compute_dtype).to(module.weight.device)
        module.weight.data.copy_(result.weight.to(module.weight.dtype))
        self.pending.setdefault(block_index, []).append((name, module, qlin))

    def end_block(self, block_index: int) -> None:
        """Swap the block's quantized layers for their packed QuantLinear modules."""
        for name, module, qlin in self.pending.pop(block_index, []):
            parent, attr = get_submodule_parent(self.blocks[block_index], name)
            if getattr(parent, attr) is not module:
                raise ValueError(f"block {block_index} {name}: the module to replace is not the one quantized")
            setattr(parent, attr, qlin)  # built on the layer's device in __call__


def packer(model: nn.Module, compute_dtype: torch.dtype | None = None, keep_weights: dict | None = None) -> Packer:
    """An `on_layer` callback packing every layer at the end of its block (see :class:`Packer`)."""
    return Packer(model, compute_dtype, keep_weights)


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


__all__ = ["Packer", "get_submodule_parent", "packer", "quant_linear_specs", "install_quant_linears",
           "set_compute_dtype"]
