"""Baselines without low rank: RTN and GPTQ."""
from __future__ import annotations

from lopro.methods.base import LayerResult
from lopro.methods.registry import register
from lopro.quant.gptq import gptq_quantize
from lopro.quant.rtn import rtn_quantize


@register("rtn", needs_calibration=False)
def rtn(W, stats, cfg) -> LayerResult:
    """Round to nearest on a min-max (or clip-searched) grid per group; no calibration."""
    q = rtn_quantize(W, cfg.bits, cfg.group_size, cfg.sym, cfg.mse)
    return LayerResult(q.dequantize(), residual=q)


@register("gptq")
def gptq(W, stats, cfg) -> LayerResult:
    """GPTQ: column-by-column rounding with Hessian-based error feedback."""
    q = gptq_quantize(W, stats.H, cfg.bits, cfg.group_size, cfg.sym, cfg.mse, cfg.desc_act,
                      cfg.damp_percent, cfg.blocksize)
    return LayerResult(q.dequantize(), residual=q)
