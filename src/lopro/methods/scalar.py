"""Baselines without low rank: RTN and GPTQ."""
from __future__ import annotations

from lopro.quant.gptq import gptq_quantize
from lopro.quant.rtn import rtn_quantize
from lopro.methods import register
from lopro.methods.base import LayerResult


def scalar_result(q) -> LayerResult:
    return LayerResult(q.dequantize(), q.storage_bits(), parts={"quant": q})


@register("rtn", needs_hessian=False)
def rtn(W, stats, cfg) -> LayerResult:
    q = rtn_quantize(W, cfg.bits, cfg.group_size, cfg.sym, cfg.mse)
    return scalar_result(q)


@register("gptq")
def gptq(W, stats, cfg) -> LayerResult:
    q = gptq_quantize(W, stats.H, cfg.bits, cfg.group_size, cfg.sym, cfg.mse, cfg.desc_act,
                      cfg.damp_percent, cfg.blocksize)
    return scalar_result(q)
