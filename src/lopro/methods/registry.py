"""The registry of per-layer methods: ``name -> MethodSpec``. Adding a method is one module with a
``@register(...)`` function, imported in ``lopro/methods/__init__.py``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lopro.methods.options import NoOptions


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of the library knows about a method, in one place."""

    name: str
    fn: Callable  # (W [m, n] fp32, LayerStats | None, QuantConfig) -> LayerResult
    needs_calibration: bool = True  # False: weight-only (no Hessian, no calibration forwards)
    options: tuple[type, ...] = (NoOptions,)  # typed option classes (lopro.methods.options)
    residual: str = "scalar"  # what the residual is stored as: "scalar" or "vq" (lopro.formats)
    lowrank: bool = False  # stores low-rank factors (and the input scaling alpha)
    stores_permutation: bool = False
    default_rank_dtype: str = "fp8"  # the CLI's --rank-dtype default
    doc: str = ""

    def __call__(self, W, stats, cfg):
        return self.fn(W, stats, cfg)

    def takes(self, option: str) -> bool:
        """Whether `option` is one of this method's own options (the pipeline's are valid everywhere)."""
        from lopro.methods.options import names

        return any(option in names(c) for c in self.options)


METHODS: dict[str, MethodSpec] = {}


def register(name: str, **fields):
    def deco(fn: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = MethodSpec(name, fn, doc=(fn.__doc__ or "").strip().split("\n")[0], **fields)
        return fn
    return deco


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None


def available_methods() -> list[str]:
    return sorted(METHODS)
