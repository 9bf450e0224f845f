"""Per-layer methods: ``get_method(name) -> MethodSpec`` (lopro.methods.registry).

Each module registers its methods with ``@register(name, ...)``; importing this package imports them all.
"""
from __future__ import annotations

from lopro.methods import flrq, lowrank, scalar  # noqa: F401  (registration)
from lopro.methods.base import LayerResult, LayerStats
from lopro.methods.registry import METHODS, MethodSpec, available_methods, get_method, register

__all__ = ["LayerResult", "LayerStats", "METHODS", "MethodSpec", "register", "get_method", "available_methods"]
