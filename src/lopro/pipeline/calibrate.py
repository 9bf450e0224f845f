"""Per-layer input statistics (Hessian H = 2/N X^T X and mean |x|) gathered with forward hooks."""
from __future__ import annotations

import time

import torch
from torch import nn

from lopro.methods.base import LayerStats
from lopro.model.walk import StopForward


class _Accumulator:
    def __init__(self, n: int, dtype: torch.dtype, device):
        self.xtx = torch.zeros(n, n, dtype=dtype, device=device)
        self.abssum = torch.zeros(n, dtype=dtype, device=device)
        self.tokens = 0
        self.weight = 0.0  # sum of token weights (= tokens when unweighted)

    def add(self, x: torch.Tensor, w: torch.Tensor | None = None) -> None:
        """w: optional per-token weights (MoE routing weights, see moe.py's moe_weighted_hessian)."""
        x = x.reshape(-1, x.shape[-1]).to(self.xtx.dtype)
        xw = x if w is None else x * w.reshape(-1, 1).to(x.dtype)
        self.xtx.addmm_(xw.T, x)
        self.abssum += xw.abs().sum(0)
        self.tokens += x.shape[0]
        self.weight += x.shape[0] if w is None else float(w.sum())

    def finish(self) -> LayerStats:
        N = self.weight if self.weight > 0 else 1
        # in place: a second n x n copy of a 7B down_proj's X^T X would be 485 MB more at the peak
        return LayerStats(H=self.xtx.mul_(2.0 / N), absmean=self.abssum / N, tokens=self.tokens)


class StatsCollector:
    """Hooks on a set of linears; layers fed the very same input tensor share one accumulator.

    With `stop_after` set, the forward is cut short (StopForward) once all of those layers ran,
    so that sequential sub-layer calibration does not pay for the rest of the block.
    """

    def __init__(self, linears: dict[str, nn.Linear], dtype=torch.float32, stop_after=None):
        self.linears = linears
        self.dtype = dtype
        self.stop_after = set(stop_after or ())
        self.acc: dict[str, _Accumulator] = {}
        self.alias: dict[str, str] = {}
        self.order: list[str] = []
        self._batch_inputs: list[tuple[torch.Tensor, str]] = []
        self._called: set[str] = set()
        self._handles = []
        self.hessian_seconds = 0.0  # time spent accumulating X^T X (part of the forwards' wall time)

    def __enter__(self):
        for name, mod in self.linears.items():
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._batch_inputs.clear()

    def new_batch(self) -> None:
        self._batch_inputs.clear()  # holding the inputs keeps their identity unique within a batch
        self._called.clear()

    def _hook(self, name: str):
        def fn(_mod, args, _out):
            x = args[0]
            if name not in self.alias:
                key = next((k for t, k in self._batch_inputs if t is x), name)
                self.alias[name] = key
                self.order.append(name)
            key = self.alias[name]
            if key == name:
                if key not in self.acc:
                    self.acc[key] = _Accumulator(x.shape[-1], self.dtype, x.device)
                t0 = time.perf_counter()
                self.acc[key].add(x.detach(), getattr(_mod, "calib_token_weights", None))
                self.hessian_seconds += time.perf_counter() - t0
                self._batch_inputs.append((x, key))
            self._called.add(name)
            if self.stop_after and self.stop_after <= self._called:
                raise StopForward
        return fn

    def groups(self) -> list[list[str]]:
        """Layers in call order, grouped by shared input (e.g. q/k/v, gate/up)."""
        out: dict[str, list[str]] = {}
        for name in self.order:
            out.setdefault(self.alias[name], []).append(name)
        return list(out.values())

    def reduce(self, dist) -> None:
        """Sum the statistics of every rank (lopro.pipeline.distributed); layers some rank never saw get
        this rank's empty accumulator first, so that every rank ends with the same keys."""
        if not dist.enabled:
            return
        for alias, order in dist.gather_objects((dict(self.alias), list(self.order))):
            for name in order:
                if name not in self.alias:
                    self.alias[name] = alias[name]
                    self.order.append(name)
        any_acc = next(iter(self.acc.values()), None)
        device = any_acc.xtx.device if any_acc is not None else dist.device
        dist.reduce_accumulators(self.acc, lambda key: _Accumulator(self.linears[key].in_features, self.dtype, device))

    def finish(self) -> dict[str, LayerStats]:
        done = {key: acc.finish() for key, acc in self.acc.items()}
        return {name: done[key] for name, key in self.alias.items()}
