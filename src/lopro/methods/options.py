"""Typed method options: frozen dataclasses whose fields say their type, allowed values and range.

``QuantConfig.options`` (``--option KEY=VALUE`` on the command line) is parsed into the method's options
class when the config is built, so a typo or a bad value is refused before any model is loaded, with
the name of the option and the allowed ones. Methods read the parsed object, never the raw dict.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def opt(default: Any, kind: type | tuple, choices: tuple | None = None, minimum: float | None = None,
        doc: str = ""):
    """A typed option field; `kind` is int, float, bool or str (a tuple adds None: ``(float, None)``)."""
    return field(default=default, metadata={"kind": kind, "choices": choices, "min": minimum, "doc": doc})


def _coerce(name: str, value: Any, meta: dict, owner: str) -> Any:
    kinds = meta["kind"] if isinstance(meta["kind"], tuple) else (meta["kind"],)
    if value is None and None in kinds:
        return None
    kind = next(k for k in kinds if k is not None)
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
          isinstance(value, str))
    if not ok:
        raise ValueError(f"option {name}={value!r} of {owner}: expected {kind.__name__}")
    value = float(value) if kind is float else value
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ValueError(f"option {name}={value!r} of {owner}: must be one of {list(meta['choices'])}")
    if meta["min"] is not None and value < meta["min"]:
        raise ValueError(f"option {name}={value!r} of {owner}: must be >= {meta['min']}")
    return value


def names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def parse(classes: tuple[type, ...], options: dict, owner: str) -> tuple:
    """One instance per class from the keys each declares; unknown keys are refused, naming the allowed ones."""
    allowed = {n: c for c in classes for n in names(c)}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for {owner}; "
                         f"allowed: {', '.join(sorted(allowed)) or 'none'}")
    out = []
    for cls in classes:
        kw = {f.name: _coerce(f.name, options[f.name], f.metadata, owner)
              for f in dataclasses.fields(cls) if f.name in options}
        obj = cls(**kw)
        check = getattr(obj, "check", None)
        if check is not None:
            check()
        out.append(obj)
    return tuple(out)


@dataclass(frozen=True)
class NoOptions:
    pass


@dataclass(frozen=True)
class RankOptions:
    """How a low-rank method chooses its rank (R1-FLR, lopro.linalg.flr)."""

    rank_mode: str = opt("fixed", str, ("auto", "fixed"), doc="auto: R1-FLR per layer; fixed: QuantConfig.rank")
    max_rank: int = opt(128, int, minimum=0)
    budget_x: float = opt(0.2, float, minimum=0)
    flat_window: int = opt(4, int, minimum=1)
    flat_threshold: float = opt(1e-3, float, minimum=0)
    bits_budget: float | None = opt(None, (float, None), doc="at most this many bits per weight in all")

    def check(self) -> None:
        if self.bits_budget is not None and self.bits_budget <= 0:
            raise ValueError(f"option bits_budget must be positive, got {self.bits_budget}")


@dataclass(frozen=True)
class FLRQRankOptions(RankOptions):
    rank_mode: str = opt("auto", str, ("auto", "fixed"))


@dataclass(frozen=True)
class FLRQOptions:
    blc: bool = opt(True, bool, doc="best low rank under clipping")
    blc_epochs: int | None = opt(None, (int, None), minimum=0, doc="default 20 at 2 bits, else 1")
    residual: str = opt("rtn", str, ("rtn", "gptq"))
    grid: str = opt("flrq", str, ("flrq", "sym", "asym"))
    clip_weight: str = opt("hdiag", str, ("hdiag", "none"))
    blc_rank: str = opt("refit", str, ("refit", "first"))

    def resolved(self, bits: int) -> "FLRQOptions":
        """blc_epochs from the bits; GPTQ residuals run on lopro's symmetric grid instead of FLRQ's."""
        epochs = self.blc_epochs if self.blc_epochs is not None else (20 if bits <= 2 else 1)
        grid = "sym" if self.residual == "gptq" and self.grid == "flrq" else self.grid
        return dataclasses.replace(self, blc_epochs=epochs, grid=grid)


@dataclass(frozen=True)
class VQOptions:
    """GPTVQ knobs (lopro.quant.gptvq.VQConfig fields with a ``vq_`` prefix); unset keeps the paper's."""

    vq_dim: int | None = opt(None, (int, None))
    vq_group_size: int | None = opt(None, (int, None))
    vq_columns_per_group: int | None = opt(None, (int, None))
    vq_kmeans_iters: int | None = opt(None, (int, None), minimum=0)
    vq_refine_iters: int | None = opt(None, (int, None), minimum=0)
    vq_codebook_bits: int | None = opt(None, (int, None))
    vq_blocksize: int | None = opt(None, (int, None))
    vq_assign_metric: str | None = opt(None, (str, None), ("block", "diag"))

    def overrides(self) -> dict:
        return {f.name[3:]: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
