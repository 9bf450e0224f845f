"""Resolve a model name or folder and load it with its tokenizer."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from lopro.data.assets import BUILTIN_MODELS, resolve_builtin_model
from lopro.device import default_device

log = logging.getLogger(__name__)


class ModelNotFoundError(ValueError):
    pass


def resolve_model_path(name_or_dir: str) -> Path:
    if name_or_dir in BUILTIN_MODELS:
        return resolve_builtin_model(name_or_dir)
    path = Path(name_or_dir)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is a folder but not a model: it has no config.json "
                                     "(expected a Hugging Face model folder saved with save_pretrained)")
        return path
    raise ModelNotFoundError(f"unknown model {name_or_dir!r}: use a built-in name "
                             f"({', '.join(BUILTIN_MODELS)}) or a local Hugging Face model folder")


def load_tokenizer(name_or_dir: str):
    """(tokenizer, path) without loading any weights."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_dir)
    try:
        return AutoTokenizer.from_pretrained(path), path
    except (OSError, ValueError, TypeError) as exc:
        names = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
        if path.is_dir() and not any((path / n).exists() for n in names):
            raise ModelNotFoundError(f"{path} has no tokenizer files ({', '.join(names)}): copy them from the "
                                     "model it was made from") from None
        raise ModelNotFoundError(f"the tokenizer in {path} cannot be loaded: {exc}") from None


def load_model(name_or_dir: str, dtype: torch.dtype = torch.float32, device=None):
    """(model, tokenizer, path). Quantized lopro checkpoints load through the same call."""
    from transformers import AutoModelForCausalLM

    from lopro.io.checkpoint import is_lopro_checkpoint, load

    tokenizer, path = load_tokenizer(name_or_dir)
    if is_lopro_checkpoint(path):  # packed checkpoint: verified, loaded layer by layer
        model = load(path, device=device or default_device(), dtype=dtype)
        return model, tokenizer, path
    from transformers import AutoConfig

    from lopro.io.checkpoint import check_causal_lm, refuse_unlabelled_packed, scan_checkpoint

    check_causal_lm(path, AutoConfig.from_pretrained(path))
    refuse_unlabelled_packed(path, scan_checkpoint(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    model.to(device or default_device())
    return model, tokenizer, path
