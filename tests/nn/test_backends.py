"""Kernel backends: every backend computes what the reference QuantLinear path computes (within bf16),
unsupported layers fall back, and the switch reaches lopro.load, the CLI and device moves."""
import pytest
import torch

from conftest import random_hessian, tiny_llama
from lopro import QuantConfig, quantize
from lopro.linalg import BlockRotation, LowRank
from lopro.methods import get_method
from lopro.methods.base import LayerResult, LayerStats
from lopro.nn import backends as bk
from lopro.io import checkpoint as ck
from lopro.nn.qlinear import QuantLinear
from lopro.model.surgery import packer
from lopro.quant.rtn import ScalarQuant

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))
DEVICES = ["cpu", CUDA]
TOL = 1e-2  # relative, bf16 against the fp32 reference


def rel(a, b):
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm()).item()


def synthetic(m, n, bits, gs, rotation=False, lowrank=False, rank=8, block=128, seed=0, sym=False):
    """A LayerResult with random codes and grids (and LoPRo's parts when asked)."""
    g = torch.Generator().manual_seed(seed)
    G = -(-n // gs)
    maxq = 2**bits - 1
    zero = torch.full((m, G), float((maxq + 1) // 2)) if sym else torch.randint(0, maxq + 1, (m, G), generator=g).float()
    q = ScalarQuant(torch.randint(0, maxq + 1, (m, n), dtype=torch.uint8, generator=g),
                    (torch.rand(m, G, generator=g) * 0.02 + 1e-3).half().float(), zero,
                    torch.arange(n) // gs, bits, sym)
    parts: dict = {"residual": q}
    if lowrank:
        parts["lowrank"] = LowRank((torch.randn(m, rank, generator=g) * 0.1).to(torch.float8_e4m3fn),
                                   (torch.rand(rank, generator=g) + 0.5).half(),
                                   torch.randn(rank, n, generator=g).to(torch.float8_e4m3fn), "fp8")
        parts["alpha"] = (torch.rand(n, generator=g) + 0.5).half().float()
    if rotation:
        parts["perm"] = torch.randperm(n, generator=g)
        parts["rotation"] = BlockRotation(n, block, block)
    return LayerResult(torch.zeros(m, n), **parts)


def outputs(layer, x, choices=("int4pack", "dense", "int4pack+dense")):
    """{choice: output} for each kernel choice, and the fp32 reference output."""
    layer.backend = None
    ref = layer(x.float())
    out = {}
    for choice in choices:
        layer.backend = bk.Kernel(choice, torch.bfloat16)
        out[choice] = layer(x)
    layer.backend = None
    return out, ref


# --------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("gs", bk.INT4_GROUP_SIZES)
@pytest.mark.parametrize("rotation,lowrank", [(False, False), (True, False), (False, True), (True, True)])
def test_backends_match_reference_on_random_layers(device, bits, gs, rotation, lowrank):
    layer = QuantLinear.from_result(synthetic(64, 512, bits, gs, rotation, lowrank, seed=bits + gs)).to(device)
    assert bk.int4_unsupported(layer.spec, torch.bfloat16, device) is None
    for tokens in (1, 3, 200):  # 200 > INT4_MAX_TOKENS: auto takes the dense path
        x = torch.randn(tokens, 512, device=device)
        out, ref = outputs(layer, x)
        for choice, y in out.items():
            assert y.dtype == x.dtype and y.shape == ref.shape
            assert rel(y, ref) < TOL, (choice, tokens)


@pytest.mark.parametrize("device", DEVICES)
def test_symmetric_codes_and_bias(device):
    layer = QuantLinear.from_result(synthetic(32, 256, 3, 64, sym=True), bias=torch.randn(32)).to(device)
    assert layer.spec["residual"]["sym"]
    out, ref = outputs(layer, torch.randn(2, 5, 256, device=device))
    assert all(rel(y, ref) < TOL for y in out.values())


def stats(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LayerStats(random_hessian(n, seed=seed), torch.rand(n, generator=g) + 0.1, 256)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["gptq", "lopro", "lqer", "lopro-v"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_backends_match_reference_on_method_results(device, method, bits):
    """Layers as the methods produce them (GPTQ; LoPRo with perm, rotation, fp8 low rank and alpha;
    LoPRo_v's VQ residual takes the dense path under every backend but reference)."""
    if method == "lopro-v" and bits == 4:
        pytest.skip("GPTVQ 2-D at 4 bits: 256-entry codebooks, slow to fit and not a paper setting")
    m, n = 96, 384
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(bits))
    cfg = QuantConfig(method=method, bits=bits, group_size=64, rank=8, block_identity=128, block_hadamard=128)
    layer = QuantLinear.from_result(get_method(method)(W, stats(n), cfg)).to(device)
    vq = method == "lopro-v"
    out, ref = outputs(layer, torch.randn(4, n, device=device), choices=("dense",) if vq else
                       ("int4pack", "dense", "int4pack+dense"))
    for choice, y in out.items():
        assert rel(y, ref) < TOL, choice


@pytest.mark.real
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_backends_match_reference_on_a_real_smollm2_layer(smollm2_path, bits):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    lin = model.model.layers[3].mlp.gate_proj  # 1536 x 576
    W = lin.weight.detach().clone()
    del model
    n = W.shape[1]
    for method, gs in (("gptq", 64), ("gptq", 32), ("lopro", 64)):
        cfg = QuantConfig(method=method, bits=bits, group_size=gs, rank=16)
        layer = QuantLinear.from_result(get_method(method)(W, stats(n), cfg))
        x = torch.randn(6, n, generator=torch.Generator().manual_seed(1))
        out, ref = outputs(layer, x)
        for choice, y in out.items():
            assert rel(y, ref) < TOL, (method, gs, choice)


# --------------------------------------------------------------------------- choices and fallbacks

def test_unsupported_layers_fall_back():
    bf = torch.bfloat16
    ok = QuantLinear.from_result(synthetic(32, 256, 2, 64)).spec
    assert bk.plan(ok, "auto") == ("int4pack+dense", None)
    assert bk.plan(ok, "int4pack") == ("int4pack", None)
    assert bk.plan(ok, "dense") == ("dense", None)
    assert bk.plan(ok, "reference") == ("reference", None)
    eight = QuantLinear.from_result(synthetic(32, 256, 8, 64)).spec
    odd_group = QuantLinear.from_result(synthetic(32, 240, 2, 48)).spec
    short_last = QuantLinear.from_result(synthetic(32, 288, 2, 64)).spec  # 288 = 4 x 64 + 32
    rows = QuantLinear.from_result(synthetic(24, 256, 4, 64)).spec  # 24 rows: the CPU kernel packs 16 at a time
    for spec, why in ((eight, "8-bit"), (odd_group, "group size 48"), (short_last, "not a multiple"),
                      (rows, "out_features 24")):
        assert why in bk.int4_unsupported(spec, bf, "cpu")
        assert bk.plan(spec, "auto")[0] == "dense"
        assert bk.plan(spec, "int4pack")[0] == "reference"
    assert "compute dtype" in bk.int4_unsupported(ok, torch.float32, "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        bk.plan(ok, "magic")


def test_vq_and_act_order_layers_use_the_dense_path():
    m, n = 32, 256
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(0))
    vq = QuantLinear.from_result(get_method("gptvq")(W, stats(n), QuantConfig(method="gptvq", bits=2)))
    act = QuantLinear.from_result(get_method("gptq")(W, stats(n), QuantConfig(method="gptq", bits=3, group_size=64,
                                                                                desc_act=True)))
    assert "vq" in bk.int4_unsupported(vq.spec, torch.bfloat16, "cpu")
    assert "act-order" in bk.int4_unsupported(act.spec, torch.bfloat16, "cpu")
    for layer in (vq, act):
        out, ref = outputs(layer, torch.randn(3, n), choices=("dense",))
        assert rel(out["dense"], ref) < TOL


@pytest.mark.parametrize("native", [True, False])
def test_dense_path_runs_its_gemm_in_fp32_where_the_cpu_has_no_native_bf16(monkeypatch, native):
    monkeypatch.setattr(bk, "has_native_bf16", lambda device: native)
    seen = []
    linear = bk.F.linear
    monkeypatch.setattr(bk.F, "linear", lambda x, w, *a: seen.append((x.dtype, w.dtype)) or linear(x, w, *a))
    layer = QuantLinear.from_result(synthetic(64, 512, 3, 128, rotation=True, lowrank=True))
    x = torch.randn(200, 512).to(torch.bfloat16)  # above INT4_MAX_TOKENS: the dense path
    out, ref = outputs(layer, x, choices=("int4pack+dense",))
    want = torch.bfloat16 if native else torch.float32
    assert seen[-2] == (want, want)  # the residual GEMM, before the low-rank one
    assert out["int4pack+dense"].dtype == torch.bfloat16 and rel(out["int4pack+dense"], ref) < TOL


def test_auto_switches_kernel_by_token_count(monkeypatch):
    layer = QuantLinear.from_result(synthetic(32, 256, 2, 64))
    calls = []
    matmul = bk.Int4Weight.matmul
    monkeypatch.setattr(bk.Int4Weight, "matmul", lambda self, x: calls.append(x.shape[0]) or matmul(self, x))
    layer.backend = bk.Kernel("int4pack+dense", torch.bfloat16)
    limit = bk.INT4_MAX_TOKENS["cpu"]
    layer(torch.randn(limit, 256))
    layer(torch.randn(limit + 1, 256))
    assert calls == [limit]
    layer.backend = bk.Kernel("int4pack", torch.bfloat16)
    layer(torch.randn(limit + 1, 256))
    assert calls == [limit, limit + 1]


# --------------------------------------------------------------------------- models, load, CLI

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def packed_folder(tmp_path_factory):
    model = tiny_llama()  # hidden 64, intermediate 96: every layer fits the int4 kernel at g32
    cfg = QuantConfig(method="lopro", bits=2, group_size=32, rank=4, block_identity=16, block_hadamard=16)
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    model, report = quantize(model, cfg, calib, on_layer=packer(model), progress=False)
    out = tmp_path_factory.mktemp("bk") / "lopro-w2"
    ck.save(model, out, config=cfg, report=report)
    return out


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_load_backends_agree_and_default_to_bf16(packed_folder):
    ref_model = ck.load(packed_folder, device="cpu", backend="reference")
    assert ref_model.model.embed_tokens.weight.dtype == torch.float32
    assert set(bk.backend_choices(ref_model).values()) == {"reference"}
    ref = logits(ref_model)
    auto = ck.load(packed_folder, device="cpu")  # backend="auto"
    assert auto.model.embed_tokens.weight.dtype == torch.bfloat16
    assert auto.model.layers[0].self_attn.q_proj.qweight.dtype == torch.uint8  # packed buffers untouched
    assert set(bk.backend_choices(auto).values()) == {"int4pack+dense"}
    assert "backend=int4pack+dense" in repr(auto.model.layers[0].mlp.up_proj)
    assert rel(logits(auto), ref) < 2e-2
    for backend in ("int4pack", "dense"):
        assert rel(logits(ck.load(packed_folder, device="cpu", backend=backend)), ref) < 2e-2
    fp32 = ck.load(packed_folder, device="cpu", compute_dtype=torch.float32)  # fp32 stays available
    assert set(bk.backend_choices(fp32).values()) == {"dense"}
    assert rel(logits(fp32), ref) < 1e-5
    # switching back to the reference path on a loaded model (its fp tensors were rounded to bf16)
    bk.set_backend(auto, "reference", torch.float32)
    assert auto.model.norm.weight.dtype == torch.float32 and auto.model.layers[0].mlp.up_proj.backend is None
    assert rel(logits(auto), ref) < 2e-2
    with pytest.raises(ValueError, match="backend must be one of"):
        ck.load(packed_folder, device="cpu", backend="fastest")


def test_kernel_is_rebuilt_after_a_device_move(packed_folder):
    model = ck.load(packed_folder, device="cpu")
    first = logits(model)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.backend.int4 is not None
    moved = model.to("cpu")
    assert layer.backend.int4 is None  # reset by the move, rebuilt on the next call
    assert torch.equal(logits(moved), first)
    assert layer.backend.int4 is not None and layer.backend.nbytes() > 0


@pytest.mark.parametrize("device", [CUDA])
def test_load_on_cuda_with_each_backend(packed_folder, device):
    ref = logits(ck.load(packed_folder, device="cpu", backend="reference"))
    for backend in bk.BACKENDS:
        model = ck.load(packed_folder, device=device, backend=backend)
        assert rel(logits(model, IDS.to(device)), ref) < 2e-2, backend


def test_cli_info_shows_the_backend_and_eval_takes_one(packed_folder, capsys):
    from lopro.cli import main

    assert main(["info", str(packed_folder)]) == 0
    text = capsys.readouterr().out
    assert "backend          auto on cpu (bfloat16): int4pack+dense 14" in text
    assert main(["info", str(packed_folder), "--backend", "dense", "--json"]) == 0
    assert '"dense": 14' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(packed_folder), "--backend", "nope"])
