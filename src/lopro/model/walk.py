"""Generic structure discovery for decoder-only models: no per-architecture code.

The decoder blocks are the largest `nn.ModuleList` of identical modules that contain linear
layers; a block's quantizable layers are its `nn.Linear` modules minus routers.
"""
from __future__ import annotations

import torch
from torch import nn

# Linear layers that must stay in full precision (MoE routers), matched on the last name component.
# transformers 5.x routers are mostly custom modules (MixtralTopKRouter ...), never found as nn.Linear;
# these names catch the linear ones (Mixtral 4.x / OLMoE `gate`, Qwen2-MoE `shared_expert_gate`).
SKIP_LINEAR_NAMES = ("gate", "router", "shared_expert_gate")


class UnsupportedModelError(ValueError):
    pass


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best, best_size = None, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(b) for b in mod}) != 1 or not any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            continue
        size = sum(p.numel() for p in mod.parameters())
        if size > best_size:
            best, best_size = (name, mod), size
    if best is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no list of decoder blocks with linear layers found; "
            "lopro supports decoder-only transformers whose blocks use nn.Linear")
    return best


def find_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: mod for name, mod in block.named_modules()
            if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] not in SKIP_LINEAR_NAMES}


def check_finite(model: nn.Module, chunk: int = 1 << 20) -> None:
    # in chunks: isfinite on a whole embedding matrix allocates several times its size (~190 MB on SmolLM2)
    for name, p in model.named_parameters():
        if p.device.type == "meta":  # not loaded yet (a lazy model checks each part as it is read)
            continue
        if not all(bool(torch.isfinite(c).all()) for c in p.detach().reshape(-1).split(chunk)):
            raise ValueError(f"weight {name} contains NaN or inf; the model is corrupt and cannot be quantized")


class StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are stored."""


def capture_block_inputs(model: nn.Module, block: nn.Module, batches) -> list[tuple[torch.Tensor, dict]]:
    """Run the model up to `block` for each batch of input ids; return (hidden, kwargs) per batch, on CPU."""
    captured = []

    def hook(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        captured.append((hidden.detach().cpu(), to_device(kwargs, "cpu")))
        raise StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(ids.to(device), use_cache=False)
                except StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def to_device(obj, device):
    """Move tensors inside nested tuples/lists/dicts; leave other values (caches, flags) alone."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out
