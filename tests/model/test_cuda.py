"""The same pipeline on CUDA: every method quantizes a tiny model there and agrees with the CPU run,
and a packed checkpoint saved from CUDA reloads and runs on both devices. Skipped without a GPU."""
import copy

import pytest
import torch

from conftest import tiny_llama
from lopro import QuantConfig, quantize
from lopro.methods import available_methods
from lopro.io import checkpoint as ck
from lopro.model.surgery import packer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CALIB = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(5))


def cfg(method: str) -> QuantConfig:
    return QuantConfig(method=method, bits=3, group_size=32, rank=4, block_identity=16, block_hadamard=16)


def rel(a, b):
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


@pytest.mark.parametrize("method", available_methods())
def test_method_runs_on_cuda_and_matches_cpu(method):
    cpu = tiny_llama()
    gpu = copy.deepcopy(cpu).cuda()
    _, rep_cpu = quantize(cpu, cfg(method), CALIB, progress=False)
    _, rep_gpu = quantize(gpu, cfg(method), CALIB.cuda(), progress=False)
    assert next(gpu.parameters()).device.type == "cuda"
    with torch.no_grad():
        a, b = gpu(IDS.cuda()).logits, cpu(IDS).logits
    assert torch.isfinite(a).all()
    # different kernels round differently, so a grid point may flip; the models must still agree closely
    assert rel(a, b) < 0.05, method
    assert rep_gpu.summary["effective_bits"] == pytest.approx(rep_cpu.summary["effective_bits"], rel=1e-6)


@pytest.mark.parametrize("method", ["gptq", "lopro", "lopro-v"])
def test_packed_checkpoint_from_cuda_reloads_on_both_devices(tmp_path, method):
    model = tiny_llama().cuda()
    fake = copy.deepcopy(model)
    kept: dict = {}
    model, report = quantize(model, cfg(method), CALIB.cuda(), on_layer=packer(model, keep_weights=kept),
                             progress=False)
    from lopro.model.walk import find_blocks

    _, blocks = find_blocks(fake)
    for (i, name), w in kept.items():
        blocks[i].get_submodule(name).weight.data.copy_(w)
    ck.save(model, tmp_path / "out", config=cfg(method), report=report)
    with torch.no_grad():
        ref = fake(IDS.cuda()).logits
        on_gpu = ck.load(tmp_path / "out", device="cuda", dtype=torch.float32, compute_dtype=torch.float32)
        on_cpu = ck.load(tmp_path / "out", device="cpu", backend="reference")
        assert rel(on_gpu(IDS.cuda()).logits, ref) < 1e-3
        assert rel(on_cpu(IDS).logits, ref) < 1e-3
        half = ck.load(tmp_path / "out", device="cuda")  # default: bf16 storage and compute on CUDA
        assert rel(half(IDS.cuda()).logits, ref) < 0.05


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("gs", [32, 64, 128, 256])
@pytest.mark.parametrize("method", ["gptq", "lopro"])
def test_cuda_backends_match_the_reference_path(bits, gs, method):
    """int4pack (aten._weight_int4pack_mm), dense and auto on CUDA against the fp32 reference path."""
    from conftest import random_hessian
    from lopro.methods import get_method
    from lopro.methods.base import LayerStats
    from lopro.nn import backends as bk
    from lopro.nn.qlinear import QuantLinear

    m, n = 128, 512
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(bits))
    stats = LayerStats(random_hessian(n), torch.rand(n) + 0.1, 256)
    c = QuantConfig(method=method, bits=bits, group_size=gs, rank=8, block_identity=128, block_hadamard=128)
    layer = QuantLinear.from_result(get_method(method)(W, stats, c)).cuda()
    if torch.cuda.get_device_capability() < (8, 0):
        assert bk.plan(layer.spec, "auto", device="cuda")[0] == "dense"
        return
    assert bk.plan(layer.spec, "auto", device="cuda")[0] == "int4pack+dense"
    for tokens in (1, 300):
        x = torch.randn(tokens, n, device="cuda")
        ref = layer(x)
        for choice in ("int4pack", "dense", "int4pack+dense"):
            layer.backend = bk.Kernel(choice, torch.bfloat16)
            assert rel(layer(x), ref) < 1e-2, (choice, tokens)
            layer.backend = None


def test_cuda_load_defaults_to_bf16_kernels(tmp_path):
    from lopro.nn import backends as bk

    model = tiny_llama().cuda()
    model, report = quantize(model, cfg("gptq"), CALIB.cuda(), on_layer=packer(model), progress=False)
    ck.save(model, tmp_path / "out", config=cfg("gptq"), report=report)
    with torch.no_grad():
        ref = ck.load(tmp_path / "out", device="cuda", dtype=torch.float32, backend="reference")(IDS.cuda()).logits
        auto = ck.load(tmp_path / "out", device="cuda")
        assert auto.model.embed_tokens.weight.dtype == torch.bfloat16
        assert set(bk.backend_choices(auto).values()) <= {"int4pack+dense", "dense"}
        assert rel(auto(IDS.cuda()).logits, ref) < 0.05
