"""One registry of per-layer methods: `name -> fn(W, stats, config) -> LayerResult`.

Adding a method is one module with a `@register("name")` function, imported at the bottom here.
"""
from __future__ import annotations

from lopro.methods.base import LayerResult, LayerStats, MethodFn

METHODS: dict[str, MethodFn] = {}
NEEDS_HESSIAN: dict[str, bool] = {}


def register(name: str, needs_hessian: bool = True):
    def deco(fn: MethodFn) -> MethodFn:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = fn
        NEEDS_HESSIAN[name] = needs_hessian
        return fn
    return deco


def get_method(name: str) -> MethodFn:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None


def available_methods() -> list[str]:
    return sorted(METHODS)


from lopro.methods import flrq, lowrank, scalar  # noqa: E402,F401  (registration)

__all__ = ["LayerResult", "LayerStats", "METHODS", "register", "get_method", "available_methods"]
