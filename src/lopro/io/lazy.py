"""A model folder opened lazily: the skeleton on the meta device, tensors read from its safetensors
only when a part of the model (one decoder block, the embeddings) is needed, and freed afterwards.

Checkpoint names that differ from the module names (older layouts, fused MoE experts stored per
expert) go through transformers' own checkpoint conversion mapping; a checkpoint whose tensors still
do not match the architecture is refused, naming them, before anything is computed.
"""
from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from lopro.io.checkpoint import (CheckpointError, check_causal_lm, params_on_meta, read_quantization_config,
                                 refuse_unlabelled_packed, scan_checkpoint)
from lopro.model.walk import UnsupportedModelError, check_finite, find_blocks

log = logging.getLogger(__name__)


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _conversions(model: nn.Module):
    """(renamings, converters) transformers applies to this model's checkpoints; empty when none."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # pragma: no cover - older transformers: names must match exactly
        return [], []
    transforms = get_model_conversion_mapping(model)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


class LazyModel:
    """`model` is the architecture with meta parameters (real buffers such as RoPE tables);
    :meth:`load` fills a submodule from disk, :meth:`release` puts it back on meta."""

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = Path(folder)
        self.dtype = dtype
        if read_quantization_config(self.folder) is not None:
            raise CheckpointError(f"{self.folder} is already a packed lopro checkpoint; quantize the original "
                                  "fp model instead")
        try:
            config = AutoConfig.from_pretrained(self.folder)
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self.folder}/config.json cannot be read as a model config: {exc}") from None
        if getattr(config, "quantization_config", None):
            raise CheckpointError(f"{self.folder} is already quantized "
                                  f"({config.quantization_config.get('quant_method', '?')}); use the fp model")
        check_causal_lm(self.folder, config)
        self.found = scan_checkpoint(self.folder)  # headers only; raises on truncated or missing shards
        refuse_unlabelled_packed(self.folder, self.found)
        with params_on_meta():
            try:
                self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            except ValueError as exc:
                raise UnsupportedModelError(f"{self.folder}: not a causal language model ({exc})") from None
        self.model.eval()
        self.blocks_name, self.blocks = find_blocks(self.model)
        self.sources = self._match()

    # ---------------------------------------------------------------- names
    def _expected(self) -> dict[str, torch.Tensor]:
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        return {k: t for k, t in self.model.state_dict(keep_vars=True).items() if k not in tied}

    def _match(self) -> dict[str, tuple]:
        """Module tensor name -> ("copy", checkpoint name) or ("convert", converter, [(pattern, name)])."""
        from transformers.core_model_loading import rename_source_key

        expected = self._expected()
        renamings, converters = _conversions(self.model)
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        sources: dict[str, tuple] = {}
        converted: dict[str, list] = defaultdict(list)
        owner: dict[str, object] = {}
        unmatched = []
        for key in sorted(self.found, key=_natural_key):
            target, pattern = rename_source_key(key, renamings, converters, self.model.base_model_prefix, expected)
            if pattern is not None:
                conv = next(c for c in converters if pattern in c.source_patterns)
                converted[target].append((pattern, key))
                owner[target] = conv
            elif target in expected:
                sources[target] = ("copy", key)
            elif target not in tied:
                unmatched.append(key)
        for target, items in converted.items():
            sources[target] = ("convert", owner[target], items)
        missing = sorted(set(expected) - set(sources), key=_natural_key)
        if missing or unmatched:
            parts = []
            if missing:
                parts.append(f"{len(missing)} tensors of the architecture are not in the checkpoint "
                             f"({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})")
            if unmatched:
                parts.append(f"{len(unmatched)} checkpoint tensors match no module "
                             f"({', '.join(unmatched[:4])}{' ...' if len(unmatched) > 4 else ''})")
            raise CheckpointError(f"{self.folder}: the checkpoint does not match its config.json: "
                                  + "; ".join(parts) + ". Check that the folder holds the weights of this config.")
        return sources

    def names_under(self, prefix: str) -> list[str]:
        return [k for k in self.sources if k.startswith(prefix)]

    def block_prefix(self, i: int) -> str:
        return f"{self.blocks_name}.{i}."

    def outside_blocks(self) -> list[str]:
        return [k for k in self.sources if not k.startswith(f"{self.blocks_name}.")]

    # ---------------------------------------------------------------- reading
    def read(self, names: list[str], dtype: torch.dtype | None = None, copy: bool = True) -> dict[str, torch.Tensor]:
        """Tensors by module name, read from disk; floats cast to `dtype` (None: as stored). With `copy`
        (default) they own their memory; without, they may be views of the file's memory map."""
        from safetensors import safe_open

        wanted: dict[str, list[str]] = defaultdict(list)  # file -> checkpoint names
        for name in names:
            src = self.sources[name]
            for key in ([src[1]] if src[0] == "copy" else [k for _, k in src[2]]):
                wanted[self.found[key]["file"]].append(key)
        raw: dict[str, torch.Tensor] = {}
        for fname, keys in sorted(wanted.items()):
            with safe_open(str(self.folder / fname), framework="pt", device="cpu") as fh:
                for key in keys:
                    raw[key] = fh.get_tensor(key)
        out = {}
        for name in names:
            src = self.sources[name]
            t = raw.pop(src[1]) if src[0] == "copy" else self._convert(name, src[1], src[2], raw)
            if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)
            elif copy:  # out of the file's memory map: freed with this tensor once its layer is packed, where a
                t = t.clone()  # mapped tensor keeps its whole file resident (a 7B block: 0.8 GB) to the block's end
            out[name] = t.contiguous()
        return out

    def _convert(self, target: str, conv, items, raw) -> torch.Tensor:
        collected: dict[str, list[torch.Tensor]] = defaultdict(list)
        for pattern, key in items:
            collected[pattern].append(raw.pop(key))
        result = dict(collected)
        for op in conv.operations:
            result = op.convert(result, source_patterns=conv.source_patterns, target_patterns=conv.target_patterns,
                                full_layer_name=target, model=self.model, config=self.model.config,
                                missing_keys=None)
        if len(result) != 1:  # pragma: no cover - one target per converter in the mappings lopro meets
            raise CheckpointError(f"{target}: transformers' conversion gave {sorted(result)}")
        return next(iter(result.values()))

    def load(self, prefix: str = "", names: list[str] | None = None, dtype: torch.dtype | None = None) -> int:
        """Fill every tensor under `prefix` (or the tensors `names`) from disk, in `dtype` (default:
        self.dtype), on the CPU; checks that they are finite. Returns the bytes read."""
        names = self.names_under(prefix) if names is None else names
        tensors = self.read(names, dtype or self.dtype)
        self.assign(tensors, prefix)
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def assign(self, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Put tensors (by module name) in place; ties the head again unless inside one block; checks
        that they are finite."""
        for name, t in tensors.items():
            _assign(self.model, name, t)
        if not prefix.startswith(f"{self.blocks_name}."):
            self.model.tie_weights()
        root = self.model.get_submodule(prefix.rstrip(".")) if prefix else self.model
        check_finite(root)

    def release_names(self, names: list[str]) -> None:
        for name in names:
            owner, _, leaf = name.rpartition(".")
            self.release(self.model.get_submodule(owner), only=leaf)
        self.model.tie_weights()

    def release(self, module: nn.Module, only: str | None = None) -> None:
        """Back to meta: the module's parameters and persistent buffers (or just `only`) stop holding memory."""
        for mod in (module.modules() if only is None else [module]):
            for k, p in mod._parameters.items():
                if p is not None and p.device.type != "meta" and only in (None, k):
                    mod._parameters[k] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            for k, b in mod._buffers.items():
                if b is not None and k not in mod._non_persistent_buffers_set and b.device.type != "meta" \
                        and only in (None, k):
                    mod._buffers[k] = torch.empty_like(b, device="meta")


def _assign(model: nn.Module, name: str, t: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[leaf] = t
