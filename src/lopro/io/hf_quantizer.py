"""transformers integration: ``AutoModelForCausalLM.from_pretrained(DIR)`` on a packed lopro folder.

Importing :mod:`lopro` arranges for :func:`register` to run as soon as transformers imports its
quantizer registry (:func:`register_lazily`, an import hook: importing the registry eagerly would
add seconds to ``import lopro``). :func:`register` adds ``quant_method: "lopro"`` to transformers'
quantization auto-mapping (``register_quantization_config`` / ``register_quantizer``). The
quantizer swaps the modules named in ``quantization_config["modules"]`` for empty ``QuantLinear``
skeletons before the weights load, so transformers' own loader fills their buffers; afterwards it
restores each buffer's storage dtype (transformers may cast float tensors to the model dtype) and
checks every QuantLinear tensor. :func:`lopro.load` is the stricter path: it verifies every tensor
of the checkpoint against the config before reading any.
"""
from __future__ import annotations

import importlib.abc
import logging
import sys


from lopro.io.checkpoint import QUANT_METHOD

log = logging.getLogger(__name__)

_REGISTERED = False


def _classes():
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class LoproConfig(QuantizationConfigMixin):
        """The ``quantization_config`` of a lopro checkpoint, kept as the dict it was saved as."""

        def __init__(self, modules: dict | None = None, **kwargs):
            self.quant_method = QUANT_METHOD
            self.modules = modules or {}
            for key, value in kwargs.items():
                if key != "quant_method":
                    setattr(self, key, value)

        def to_dict(self) -> dict:
            return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    class LoproHfQuantizer(HfQuantizer):
        """Loads pre-quantized lopro checkpoints (it cannot quantize on the fly: use ``lopro quantize``)."""

        requires_calibration = True

        def validate_environment(self, *args, **kwargs):
            if not self.pre_quantized:
                raise ValueError("lopro checkpoints are made by `lopro quantize`; transformers cannot "
                                 "quantize a model with quant_method 'lopro' on the fly")

        def _process_model_before_weight_loading(self, model, **kwargs):
            from lopro.model.surgery import install_quant_linears

            install_quant_linears(model, self.quantization_config.modules, device="meta")
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            from lopro.nn.qlinear import QuantLinear, buffer_specs

            for name, mod in model.named_modules():
                if not isinstance(mod, QuantLinear):
                    continue
                for leaf, (shape, dtype) in buffer_specs(mod.spec).items():
                    t = mod._buffers.get(leaf)
                    if t is None or t.device.type == "meta":
                        raise ValueError(f"tensor {name}.{leaf} was not loaded (missing from the checkpoint)")
                    if leaf != "bias" and t.dtype != dtype:
                        mod._buffers[leaf] = t.to(dtype)  # exact: the values were stored in this dtype
                mod.check_tensors()
            from pathlib import Path

            from lopro.io.checkpoint import expected_tensors, scan_checkpoint, verify_tensors

            folder = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
            if folder and Path(folder).is_dir():  # missing, extra or renamed tensors: refused, not warned
                verify_tensors(scan_checkpoint(folder), expected_tensors(model))
            return model

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            return False

        @property
        def is_trainable(self) -> bool:
            return False

        def is_serializable(self, safe_serialization=None) -> bool:
            return False  # save with lopro.save, which writes the quantization_config with the specs

    return LoproConfig, LoproHfQuantizer


def register() -> bool:
    """Register quant_method "lopro" with transformers; False (and a debug log) when impossible."""
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, \
            register_quantization_config, register_quantizer
    except ImportError as exc:  # pragma: no cover - depends on the transformers version
        log.debug("transformers has no quantizer registry (%s); lopro.load still works", exc)
        return False
    config_cls, quantizer_cls = _classes()
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(config_cls)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(quantizer_cls)
    _REGISTERED = True
    return True


_TARGET = "transformers.quantizers.auto"


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Runs :func:`register` right after transformers imports its quantizer registry.

    Importing that registry costs seconds (it imports every quantizer's config), so ``import lopro``
    does not import it; transformers does when a model is first loaded, and this hook registers
    lopro at that moment.
    """

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _Loader(spec.loader)
                return spec
        return None


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _remove_hook()
        register()


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterOnImport)]


def register_lazily() -> None:
    """Register now if transformers' registry is loaded, else as soon as it is imported."""
    if _TARGET in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
