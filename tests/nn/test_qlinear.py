"""QuantLinear: packed layers compute exactly what the method's result says (x @ result.weight.T + b)."""
import pytest
import torch

from conftest import random_hessian
from lopro import QuantConfig
from lopro.linalg import BlockRotation, LowRank
from lopro.methods import get_method
from lopro.methods.base import LayerResult, LayerStats
from lopro.nn.qlinear import QuantLinear, buffer_specs
from lopro.formats import effective_bits
from lopro.quant.rtn import ScalarQuant, rtn_quantize

M, N = 48, 192


def stats(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LayerStats(random_hessian(n, seed=seed), torch.rand(n, generator=g) + 0.1, 256)


def weight(m=M, n=N, seed=0):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def fp16_grids(monkeypatch):
    """Round grid scales and alpha to fp16 inside the solvers, as the packed layer stores them."""
    import lopro.methods.lowrank as lowrank
    import lopro.quant.gptq as gptq
    import lopro.quant.grid as grid
    import lopro.quant.rtn as rtn

    find_params, scaling = grid.find_params, lowrank.input_scaling

    def rounded(w, g):
        s, z = find_params(w, g)
        return s.half().float(), z

    for mod in (grid, gptq, rtn):
        monkeypatch.setattr(mod, "find_params", rounded)
    monkeypatch.setattr(lowrank, "input_scaling", lambda a: scaling(a).half().float())


CASES = [("rtn", {}), ("gptq", {}), ("gptq", {"desc_act": True}), ("gptq", {"sym": True}),
         ("lopro", {}), ("lqer", {}), ("lowrank-gptq-hadamard", {"rank_dtype": "fp16"})]


@pytest.mark.parametrize("method,extra", CASES)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_forward_matches_result_weight_exactly_with_fp16_grids(fp16_grids, method, extra, bits):
    cfg = QuantConfig(method=method, bits=bits, group_size=64, rank=8, block_identity=32, block_hadamard=32,
                      **extra)
    result = get_method(method)(weight(), stats(), cfg)
    bias = torch.randn(M)
    layer = QuantLinear.from_result(result, bias=bias)
    x = torch.randn(2, 5, N)
    assert rel(layer(x), x @ result.weight.T + bias) < 2e-6
    assert rel(layer.dense_weight(), result.weight) < 2e-6
    # one count (lopro.formats): what the report says is what the layer holds, byte for byte
    held = sum(t.numel() * t.element_size() * 8 for k, t in layer.state_dict().items() if k != "bias")
    assert layer.effective_bits() == result.effective_bits() == held / (M * N)


@pytest.mark.parametrize("method", ["rtn", "gptq", "lopro", "lqer"])
def test_forward_matches_result_weight_with_solver_grids(method):
    """Without fp16-rounded grids the only difference is the fp16 storage of scales and alpha."""
    cfg = QuantConfig(method=method, bits=2, group_size=64, rank=8, block_identity=64, block_hadamard=64)
    result = get_method(method)(weight(), stats(), cfg)
    layer = QuantLinear.from_result(result)
    x = torch.randn(7, N)
    assert rel(layer(x), x @ result.weight.T) < 1e-3


def test_parts_absent_means_plain_layer_and_dtypes():
    q = rtn_quantize(weight(), 3, 64)
    layer = QuantLinear.from_result(LayerResult(q.dequantize(), residual=q))
    assert set(layer.state_dict()) == {"qweight", "scales", "qzeros"}
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (M, N * 3 // 8)
    assert layer.scales.dtype == torch.float16 and layer.qzeros.shape == (M, 2)  # 3 groups x 3 bits -> 2 bytes
    assert layer.effective_bits() == pytest.approx(3 + (16 + 16 / 3) / 64)


def test_lopro_parts_storage():
    cfg = QuantConfig(method="lopro", bits=2, group_size=64, rank=8, block_identity=64, block_hadamard=64)
    layer = QuantLinear.from_result(get_method("lopro")(weight(), stats(), cfg))
    sd = layer.state_dict()
    assert sd["lr_U"].dtype == torch.float8_e4m3fn and sd["lr_U"].shape == (M, 8)
    assert sd["lr_V"].dtype == torch.float8_e4m3fn and sd["lr_S"].dtype == torch.float16
    assert sd["alpha"].dtype == torch.float16 and sd["perm"].dtype == torch.int16
    assert layer.spec["rotation"]["block_hadamard"] == 64
    assert set(sd) == set(buffer_specs(layer.spec))
    assert layer.effective_bits() == pytest.approx(effective_bits(layer.spec))


def test_online_rotation_equals_block_rotation_apply():
    n = 320  # 64 identity + 4 blocks of 64 + nothing left
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    rot = BlockRotation(n, 64, 64)
    q = rtn_quantize(torch.randn(16, n), 4, 64)
    layer = QuantLinear.from_result(LayerResult(torch.zeros(16, n), residual=q, perm=perm, rotation=rot))
    x = torch.randn(3, 4, n)
    ref = rot.apply(x[..., perm])
    for impl in ("matmul", "fwht"):
        layer.rotation_impl = impl
        assert torch.allclose(layer.transform_input(x), ref, atol=1e-5)
        assert rel(layer(x), ref @ q.dequantize().T) < 1e-3  # scales stored in fp16


def test_synthetic_lowrank_only_and_leftover_columns():
    m, n, r = 24, 200, 4  # 200 = 64 identity + 2 x 64 rotated + 8 leftover
    g = torch.Generator().manual_seed(2)
    lr = LowRank(torch.randn(m, r, generator=g).to(torch.float8_e4m3fn), torch.rand(r, generator=g).half(),
                 torch.randn(r, n, generator=g).to(torch.float8_e4m3fn), "fp8")
    alpha = (torch.rand(n, generator=g) + 0.5).half().float()
    q = ScalarQuant(torch.randint(0, 4, (m, n), dtype=torch.uint8, generator=g),
                    torch.rand(m, 4, generator=g).half().float(), torch.randint(0, 4, (m, 4), generator=g).float(),
                    torch.arange(n) // 64, 2, False)
    perm, rot = torch.randperm(n, generator=g), BlockRotation(n, 64, 64)
    inv = torch.argsort(perm)
    W = lr.dense() / alpha + rot.apply_transpose(q.dequantize())[:, inv]
    layer = QuantLinear.from_result(LayerResult(W, residual=q, lowrank=lr, alpha=alpha, perm=perm, rotation=rot))
    x = torch.randn(5, n, generator=g)
    assert rel(layer(x), x @ W.T) < 1e-5
    only = QuantLinear.from_result(LayerResult(lr.dense() / alpha, lowrank=lr, alpha=alpha))
    assert only.spec["residual"] is None and rel(only(x), x @ (lr.dense() / alpha).T) < 1e-5


def test_vq_residual():
    pytest.importorskip("lopro.quant.gptvq")
    cfg = QuantConfig(method="lopro-v", bits=2, group_size=64, rank=4, block_identity=64, block_hadamard=64)
    result = get_method("lopro-v")(weight(), stats(), cfg)
    layer = QuantLinear.from_result(result)
    assert layer.spec["residual"]["kind"] == "vq" and layer.vq_indices.dtype == torch.uint8
    x = torch.randn(3, N)
    assert rel(layer(x), x @ result.weight.T) < 1e-3
    assert layer.effective_bits() == pytest.approx(result.effective_bits(), abs=1e-6)


def test_compute_dtypes_device_moves_and_cache():
    cfg = QuantConfig(method="lopro", bits=4, group_size=64, rank=8, block_identity=64, block_hadamard=64)
    result = get_method("lopro")(weight(), stats(), cfg)
    layer = QuantLinear.from_result(result)
    x = torch.randn(4, N)
    ref = x @ result.weight.T
    y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and rel(y16.float(), ref) < 2e-2
    layer.compute_dtype = torch.float32
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    layer.compute_dtype = None
    layer.to("cpu")
    layer.cache_weight = True
    a, b = layer(x), layer(x)
    assert torch.equal(a, b) and layer._w_cache is not None
    layer.to(torch.device("cpu"))
    assert layer._w_cache is None
    layer.to(torch.bfloat16)  # casts leave the packed storage alone
    assert layer.scales.dtype == torch.float16 and layer.lr_U.dtype == torch.float8_e4m3fn
    assert torch.equal(layer(x), a)


def test_bad_parts_are_refused():
    q = rtn_quantize(weight(), 2, 64)
    with pytest.raises(ValueError, match="permutation"):
        QuantLinear.from_result(LayerResult(q.dequantize(), residual=q, perm=torch.zeros(N, dtype=torch.long)))
    q.zero[0, 0] = 1.5
    with pytest.raises(ValueError, match="zeros must be integers"):
        QuantLinear.from_result(LayerResult(q.dequantize(), residual=q))


def test_autocast_computes_in_its_dtype_like_compute_dtype():
    """Under the pipeline's bf16 autocast a LoPRo layer (permutation, rotation, low rank) computes every
    branch in bf16, exactly as with compute_dtype=bf16, and returns its input's dtype."""
    cfg = QuantConfig(method="lopro", bits=3, group_size=64, rank=8, block_identity=64, block_hadamard=64)
    result = get_method("lopro")(weight(), stats(), cfg)
    layer = QuantLinear.from_result(result)
    x = torch.randn(40, N)  # more tokens than rows: S is folded into U
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32 and rel(y, x @ result.weight.T) < 2e-2
    layer.compute_dtype = torch.bfloat16
    assert torch.equal(y, layer(x))
