"""lopro.formats: the one table of what a packed layer stores; every count of bits comes from it."""
from __future__ import annotations

import pytest
import torch

from lopro import formats
from lopro.formats import scalar, vq
from lopro.quant.gptvq import VQConfig, VQLayout


@pytest.mark.parametrize("res", [scalar.plan(3, 9, 64, sym=False), scalar.plan(2, 9, None, sym=True),
                                 vq.plan(2, 8, VQLayout.make(96, 576, VQConfig.for_bits(2, width=576)))])
@pytest.mark.parametrize("lowrank", [None, {"rank": 16, "storage": "fp8"}, {"rank": 4, "storage": "fp16"}])
def test_storage_bits_are_the_bytes_of_the_buffers(res, lowrank):
    m, n = 96, 576
    spec = formats.layer_spec(m, n, res, lowrank, alpha=lowrank is not None, perm=True, bias=True)
    bufs = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in formats.buffer_specs(spec).items()}
    assert formats.storage_bits(spec) == sum(t.numel() * t.element_size() * 8 for k, t in bufs.items() if k != "bias")
    assert formats.effective_bits(spec) == formats.storage_bits(spec) / (m * n)
    if lowrank:
        r = lowrank["rank"]
        assert formats.lowrank_bits(m, n, r, lowrank["storage"]) == \
            formats.storage_bits(spec) - formats.storage_bits({**spec, "lowrank": None})


def test_unknown_residual_kind_is_named():
    with pytest.raises(ValueError, match="unknown residual kind 'lut'"):
        formats.buffer_specs(formats.layer_spec(4, 8, {"kind": "lut"}))


def test_fp8_widening_is_exact():
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.allclose(formats.widen(every, dtype), every.to(dtype), rtol=0, atol=0, equal_nan=True)
