"""The model walk and pipeline on a tiny random Llama built in code."""
import copy

import pytest
import torch

from conftest import tiny_llama
from lopro import QuantConfig, quantize
from lopro.methods import get_method
from lopro.pipeline.calibrate import StatsCollector
from lopro.model.walk import capture_block_inputs, find_blocks, find_linears


def calib(n=4, L=16, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


def test_structure_discovery():
    model = tiny_llama()
    name, blocks = find_blocks(model)
    assert name == "model.layers" and len(blocks) == 2
    assert sorted(find_linears(blocks[0])) == sorted(
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])


def test_shared_inputs_are_grouped_in_call_order():
    model = tiny_llama()
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], calib().split(2))
    with torch.no_grad(), StatsCollector(find_linears(blocks[0])) as col:
        for h, kw in inputs:
            col.new_batch()
            blocks[0](h, **kw)
    groups = col.groups()
    assert [sorted(g) for g in groups] == [
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    stats = col.finish()
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"]
    assert stats["mlp.down_proj"].H.shape == (96, 96) and stats["mlp.down_proj"].tokens == 4 * 16


def reference_quantize(model, cfg, ids):
    """Per-layer quantization written out by hand: block by block, layer by layer, exact Hessians."""
    _, blocks = find_blocks(model)
    method = get_method(cfg.method)
    hidden = capture_block_inputs(model, blocks[0], [ids])
    h, kw = hidden[0]
    for block in blocks:
        for group in (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]):
            seen = {}

            def keep(mod, args, out, seen=seen):
                seen[mod] = args[0].reshape(-1, args[0].shape[-1]).clone()

            hooks = [block.get_submodule(n).register_forward_hook(keep) for n in group]
            with torch.no_grad():
                block(h, **kw)
            for hk in hooks:
                hk.remove()
            for n in group:
                X = seen[block.get_submodule(n)]
                from lopro.methods.base import LayerStats
                st = LayerStats(2 * X.T @ X / X.shape[0], X.abs().mean(0), X.shape[0])
                lin = block.get_submodule(n)
                lin.weight.data = method(lin.weight.data.float(), st, cfg).weight
        with torch.no_grad():
            h = block(h, **kw)
            h = h[0] if isinstance(h, tuple) else h
    return model


@pytest.mark.parametrize("method", ["gptq", "lopro"])
def test_pipeline_equals_per_layer_reference(method):
    model = tiny_llama()
    ids = calib()
    cfg = QuantConfig(method=method, bits=3, group_size=16, rank=4, block_identity=16, block_hadamard=16,
                      options={"forward_dtype": "fp32"})  # the reference computes in fp32
    ref = reference_quantize(copy.deepcopy(model), cfg, ids)
    got, report = quantize(model, cfg, ids, batch_size=4, progress=False)
    for (n, p), (_, q) in zip(got.named_parameters(), ref.named_parameters()):
        assert torch.allclose(p, q, atol=1e-5, rtol=1e-4), n
    assert len(report.layers) == 14 and report.summary["effective_bits"] > 3
    assert all(r["rel_output_error"] < 1 for r in report.layers)


def test_quantized_outputs_feed_next_block():
    """With propagate='fp' the second block sees fp activations, so its result differs."""
    ids = calib()
    cfg_q = QuantConfig(method="gptq", bits=2, group_size=16)
    cfg_f = QuantConfig(method="gptq", bits=2, group_size=16, propagate="fp")
    a, _ = quantize(tiny_llama(), cfg_q, ids, progress=False)
    b, _ = quantize(tiny_llama(), cfg_f, ids, progress=False)
    la, lb = (find_blocks(m)[1] for m in (a, b))
    assert torch.equal(la[0].self_attn.q_proj.weight, lb[0].self_attn.q_proj.weight)
    assert not torch.equal(la[1].self_attn.q_proj.weight, lb[1].self_attn.q_proj.weight)


def test_stats_cache_reuses_fp_statistics(tmp_path):
    ids = calib()
    cfg = QuantConfig(method="gptq", bits=3, group_size=16, propagate="fp")
    a, ra = quantize(tiny_llama(), cfg, ids, stats_cache=tmp_path, progress=False)
    assert (tmp_path / "complete").exists()
    b, rb = quantize(tiny_llama(), cfg, ids, stats_cache=tmp_path, progress=False)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    # other calibration tokens: the cached statistics are not reused but recomputed
    c, _ = quantize(tiny_llama(), cfg, calib(seed=1), stats_cache=tmp_path, progress=False)
    d, _ = quantize(tiny_llama(), cfg, calib(seed=1), progress=False)
    for p, q in zip(c.parameters(), d.parameters()):
        assert torch.equal(p, q)


def test_bad_inputs_fail_before_work():
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(bits=9)
    with pytest.raises(ValueError, match="unknown method"):
        QuantConfig(method="nope")
    model = tiny_llama()
    with pytest.raises(ValueError, match="group_size 128 is larger"):
        quantize(model, QuantConfig(group_size=128), calib(), progress=False)
    model.model.layers[1].mlp.down_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="down_proj.weight contains NaN"):
        quantize(model, QuantConfig(group_size=16), calib(), progress=False)


@pytest.mark.parametrize("where", [0, -1])
def test_finite_check_scans_every_chunk_of_a_large_weight(where):
    from lopro.model.walk import check_finite

    model = torch.nn.Linear(300, 10)
    model.weight.data.view(-1)[where] = float("inf")
    with pytest.raises(ValueError, match="weight contains NaN or inf"):
        check_finite(model, chunk=256)  # 3000 elements: the bad one sits in the first or the last chunk
    model.weight.data.view(-1)[where] = 0.0
    check_finite(model, chunk=256)


def _seen_input_dtypes(model):
    """The dtype of every linear's input as its forward hook sees it (autocast casts inside F.linear)."""
    seen = set()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_hook(lambda m, args, out: seen.add(out.dtype))
    return seen


def test_bf16_forwards_use_autocast_and_keep_fp32_hessians(monkeypatch):
    """forward_dtype=bf16 runs the block's matmuls in bf16 (their outputs are bf16), accumulates X^T X in fp32,
    and quantizes about as well as fp32 forwards (the statistics differ by bf16 rounding)."""
    from lopro.pipeline import calibrate

    hessian_dtypes = []
    finish = calibrate._Accumulator.finish
    monkeypatch.setattr(calibrate._Accumulator, "finish",
                        lambda self: hessian_dtypes.append(self.xtx.dtype) or finish(self))
    ids, test = calib(n=8, L=32), calib(n=4, L=32, seed=1)
    with torch.no_grad():
        ref = tiny_llama()(test).logits
    errors, weights = {}, {}
    for fwd in ("fp32", "bf16"):
        model = tiny_llama()
        outs = _seen_input_dtypes(model)
        cfg = QuantConfig(method="gptq", bits=4, group_size=32, options={"forward_dtype": fwd})
        quantize(model, cfg, ids, batch_size=2, progress=False)
        assert outs == ({torch.float32} if fwd == "fp32" else {torch.bfloat16})
        with torch.no_grad():
            errors[fwd] = ((model(test).logits - ref).norm() / ref.norm()).item()
        weights[fwd] = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "proj" in n])
    assert set(hessian_dtypes) == {torch.float32}
    assert not torch.equal(weights["fp32"], weights["bf16"])  # the bf16 statistics were used
    assert errors["bf16"] < 1.25 * errors["fp32"], errors


def test_forward_dtype_auto_follows_the_hardware(monkeypatch):
    from lopro import device

    monkeypatch.setattr(device, "has_native_bf16", lambda d: False)
    assert device.forward_dtype("auto", "cpu") is None and device.forward_dtype("bf16", "cpu") is torch.bfloat16
    monkeypatch.setattr(device, "has_native_bf16", lambda d: True)
    assert device.forward_dtype("auto", "cpu") is torch.bfloat16 and device.forward_dtype("fp32", "cpu") is None
    with pytest.raises(ValueError, match="forward_dtype"):
        QuantConfig(options={"forward_dtype": "fp16"})


@pytest.mark.parametrize("true_sequential", [True, False])
def test_profile_has_every_stage(true_sequential):
    model = tiny_llama()
    cfg = QuantConfig(method="gptq", bits=4, group_size=32, true_sequential=true_sequential)
    _, report = quantize(model, cfg, calib(), batch_size=2, progress=False)
    prof = report.summary["profile_seconds"]
    assert {"capture_s", "read_s", "forwards_s", "hessian_s", "solve_s", "propagate_s", "write_s"} <= set(prof)
    assert prof["hessian_s"] > 0 and prof["capture_s"] > 0
    stages = [s["layers"] for s in report.blocks[0]["stages"]]
    if true_sequential:
        assert stages == ["discover", ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
                          ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    else:  # llm-compressor's two passes: every layer at once, then the propagation
        assert len(stages) == 1 and len(stages[0]) == 7
    for b in report.blocks:
        assert abs(b["hessian_s"] - sum(s["hessian_s"] for s in b["stages"])) < 1e-9


def test_only_the_first_of_alike_blocks_runs_the_discovery_forward():
    model = tiny_llama(layers=3)
    cfg = QuantConfig(method="gptq", bits=4, group_size=32)
    _, report = quantize(model, cfg, calib(), batch_size=2, progress=False)
    firsts = [b["stages"][0]["layers"] for b in report.blocks]
    assert firsts[0] == "discover" and firsts[1] == firsts[2] == ["self_attn.k_proj", "self_attn.q_proj",
                                                                  "self_attn.v_proj"]
    assert len(report.layers) == 21


def test_a_block_wired_unlike_the_first_one_stops_with_a_clear_error():
    model = tiny_llama(layers=2)
    # block 1's q_proj gets a copy of its input: same layers and shapes as block 0, but no longer one input with k/v
    model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda mod, args: (args[0].clone(),))
    cfg = QuantConfig(method="gptq", bits=4, group_size=32)
    with pytest.raises(RuntimeError, match="block 1: layers .*q_proj.* true_sequential=False"):
        quantize(model, cfg, calib(), batch_size=2, progress=False)


def test_a_block_that_cannot_run_under_autocast_is_calibrated_in_fp32_with_a_warning(caplog):
    def fp32_buffer(mlp):  # a custom layer adding its (bf16 under autocast) result into an fp32 buffer
        orig = mlp.forward

        def forward(x):
            out = torch.zeros(x.shape, dtype=torch.float32)
            return out.index_add_(0, torch.arange(x.shape[0]), orig(x))
        mlp.forward = forward

    ids = calib()
    weights = {}
    for fwd in ("bf16", "fp32"):
        model = tiny_llama()
        for block in find_blocks(model)[1]:
            fp32_buffer(block.mlp)
        cfg = QuantConfig(method="gptq", bits=3, group_size=16, options={"forward_dtype": fwd})
        _, report = quantize(model, cfg, ids, batch_size=2, progress=False)
        assert report.summary["forward_dtype"] == "float32"
        weights[fwd] = [p.detach().clone() for p in model.parameters()]
    assert sum("calibrating in fp32 instead" in r.getMessage() for r in caplog.records) == 1
    assert all(torch.equal(a, b) for a, b in zip(*weights.values()))


@pytest.mark.parametrize("method", ["gptq", "lopro"])
def test_packing_propagates_what_fake_quantization_does(method):
    """The packer keeps each quantized layer's dense dequantized weight for the rest of its block and swaps
    the QuantLinear in at the block's end: packed and fake-quantized runs see the same activations, so
    their dense weights are identical (not merely close), and every layer ends up packed."""
    from lopro.model.surgery import packer
    from lopro.nn.qlinear import QuantLinear

    cfg = QuantConfig(method=method, bits=2, group_size=32, rank=4, block_identity=16, block_hadamard=16)
    fake, _ = quantize(tiny_llama(), cfg, calib(), progress=False)
    model, kept = tiny_llama(), {}
    packed, _ = quantize(model, cfg, calib(), on_layer=packer(model, keep_weights=kept), progress=False)
    fake_blocks, packed_blocks = fake.model.layers, packed.model.layers
    assert len(kept) == 2 * 7
    for (i, name), w in kept.items():
        assert torch.equal(w, fake_blocks[i].get_submodule(name).weight), (i, name)
        assert isinstance(packed_blocks[i].get_submodule(name), QuantLinear)
