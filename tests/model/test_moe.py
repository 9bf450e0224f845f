"""Mixture-of-experts: fused experts unfused exactly, per-expert Hessians, routers, starved experts."""
import logging

import pytest
import torch
from torch import nn

from lopro import QuantConfig, available_methods, quantize
from lopro.methods import get_method
from lopro.pipeline.calibrate import StatsCollector
from lopro.config import STARVED_EXPERT_HESSIANS
from lopro.model.moe import (UnfusedExperts, expert_stages, find_fused_experts,
                             refuse_experts, starved_experts, unfuse_experts, upcycle_smollm2, weight_only_stats)
from lopro.model.walk import capture_block_inputs, find_linears
from lopro.methods.base import LayerStats


def tiny_mixtral(seed=0, layers=2, hidden=64, inter=96, experts=4, top_k=2, vocab=128):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                        num_experts_per_tok=top_k, max_position_embeddings=256, tie_word_embeddings=True,
                        initializer_range=0.1)  # wide router logits: uneven routing
    return MixtralForCausalLM(cfg).eval()


CALIB = (16, 32)  # enough tokens that every expert sees more than its width (else it falls back)


def calib(n=CALIB[0], L=CALIB[1], vocab=128, seed=0):
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


def starve(model, expert):
    """Routers never pick `expert` (its logit is -inf before the top-k)."""
    def hook(mod, args, out):
        logits = out[0].clone()
        logits[:, expert] = float("-inf")
        probs = torch.softmax(logits.float(), -1)
        val, idx = torch.topk(probs, mod.top_k, -1)
        return logits, val / val.sum(-1, keepdim=True), idx
    return [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]


def expert_names(block_linears):
    return sorted(n for n in block_linears if ".experts." in n)


def test_unfuse_and_refuse_are_exact():
    model = tiny_mixtral()
    ids = calib()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(ids).logits
        assert unfuse_experts(model) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
        assert torch.equal(model(ids).logits, ref)
        block = model.model.layers[0]
        assert isinstance(block.mlp.experts, UnfusedExperts)
        assert sorted(find_linears(block)) == sorted(
            [f"self_attn.{p}_proj" for p in "qkvo"]
            + [f"mlp.experts.{e}.{m}" for e in range(4) for m in ("gate_proj", "up_proj", "down_proj")])
        assert block.mlp.experts.expert(2).down_proj.weight.shape == (64, 96)
        assert refuse_experts(model) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
        assert torch.equal(model(ids).logits, ref)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_transposed_interleaved_biased_layout():
    """GPT-OSS experts: [E, H, 2I] interleaved gate/up with biases and a custom gate."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    torch.manual_seed(0)
    cfg = GptOssConfig(hidden_size=32, intermediate_size=48, num_local_experts=3)
    mod = GptOssExperts(cfg)
    for p in mod.parameters():
        nn.init.normal_(p, std=0.2)
    holder = nn.Module()
    holder.experts = mod
    lay = find_fused_experts(holder)["experts"]
    assert (lay.transposed, lay.concatenated, lay.bias, lay.hidden, lay.inter) == (True, False, True, 32, 48)
    x = torch.randn(10, 32)
    idx = torch.stack([torch.randperm(3)[:2] for _ in range(10)])
    w = torch.rand(10, 2)
    with torch.no_grad():
        ref = mod(x, idx, w)
        unfuse_experts(holder)
        assert torch.allclose(holder.experts(x, idx, w), ref, atol=1e-6)
        assert holder.experts.expert(1).gate_proj.bias.shape == (48,)
        refuse_experts(holder)
        assert holder.experts is mod and torch.allclose(mod(x, idx, w), ref, atol=1e-6)


def test_ungated_layout():
    """Experts without a gate (up_proj [E, I, H], activation, down_proj), through transformers' decorator."""
    from transformers.activations import ACT2FN
    from transformers.integrations.moe import use_experts_implementation

    @use_experts_implementation(has_gate=False)
    class Plain(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = 3
            self.up_proj = nn.Parameter(torch.randn(3, 20, 8))
            self.down_proj = nn.Parameter(torch.randn(3, 8, 20))
            self.act_fn = ACT2FN["relu2"]

        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            for e in range(self.num_experts):
                tok, pos = torch.where(top_k_index == e)
                y = self.act_fn(hidden_states[tok] @ self.up_proj[e].T) @ self.down_proj[e].T
                out.index_add_(0, tok, y * top_k_weights[tok, pos, None])
            return out

    from transformers import PretrainedConfig

    holder = nn.Module()
    holder.experts = Plain(PretrainedConfig())
    x, idx, w = torch.randn(6, 8), torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0], [2, 1]]), torch.rand(6, 2)
    with torch.no_grad():
        ref = holder.experts(x, idx, w)
        unfuse_experts(holder)
        assert holder.experts.expert(0).gate_proj is None
        assert torch.allclose(holder.experts(x, idx, w), ref, atol=1e-5)
        refuse_experts(holder)
        assert holder.experts.up_proj.shape == (3, 20, 8) and torch.allclose(holder.experts(x, idx, w), ref, atol=1e-5)


def test_unknown_fused_experts_are_refused_loudly():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(2, 8, 4))
            self.down_proj = nn.Parameter(torch.zeros(2, 4, 4))

        def forward(self, x):
            return x

    holder = nn.Module()
    holder.experts = Odd()
    with pytest.raises(ValueError, match="cannot unfuse"):
        find_fused_experts(holder)


def _block0_moe_inputs(model, ids):
    """(moe input tokens [T, H]) of block 0, captured from the fp model."""
    seen = []
    h = model.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    h.remove()
    return seen[0]


@pytest.mark.parametrize("weighted", [False, True])
def test_per_expert_hessian_is_the_routed_tokens(weighted):
    model = tiny_mixtral()
    ids = calib(2, 16)
    X = _block0_moe_inputs(model, ids)
    moe = model.model.layers[0].mlp
    probs = torch.softmax(X @ moe.gate.weight.T, -1)
    top, idx = torch.topk(probs, 2, -1)
    top = top / top.sum(-1, keepdim=True)
    Wgu, Wd = moe.experts.gate_up_proj.detach().clone(), moe.experts.down_proj.detach().clone()
    unfuse_experts(model, weighted_hessian=weighted)
    block = model.model.layers[0]
    inputs = capture_block_inputs(model, block, [ids])
    with torch.no_grad(), StatsCollector(find_linears(block)) as col:
        col.new_batch()
        block(inputs[0][0], **inputs[0][1])
    stats = col.finish()
    total = 0
    for e in range(4):
        rows, pos = torch.where(idx == e)
        w = top[rows, pos] if weighted else torch.ones(len(rows))
        Xe = X[rows]
        Ye = torch.nn.functional.silu(Xe @ Wgu[e, :96].T) * (Xe @ Wgu[e, 96:].T)
        for name, Z in ((f"mlp.experts.{e}.gate_proj", Xe), (f"mlp.experts.{e}.up_proj", Xe),
                        (f"mlp.experts.{e}.down_proj", Ye)):
            st = stats[name]
            assert st.tokens == len(rows)
            H = 2 * (Z * w[:, None]).T @ Z / w.sum()
            assert torch.allclose(st.H, H, atol=1e-5, rtol=1e-4), name
            assert torch.allclose(st.absmean, (Z.abs() * w[:, None]).sum(0) / w.sum(), atol=1e-6)
        total += len(rows)
        assert not torch.equal(Wd[e], Wd[(e + 1) % 4])
    assert total == 2 * 16 * 2  # every token reaches top_k experts
    assert len(set(stats[f"mlp.experts.{e}.gate_proj"].tokens for e in range(4))) > 1  # routing is uneven


def test_expert_stages_merge_and_complete():
    groups = [["attn.q", "attn.k"], ["mlp.experts.0.gate_proj", "mlp.experts.0.up_proj"], ["mlp.experts.0.down_proj"],
              ["mlp.experts.2.gate_proj", "mlp.experts.2.up_proj"], ["mlp.experts.2.down_proj"]]
    names = [n for g in groups for n in g] + [f"mlp.experts.1.{m}" for m in ("gate_proj", "up_proj", "down_proj")]
    assert expert_stages(groups, names) == [
        ["attn.q", "attn.k"],
        [f"mlp.experts.{e}.{m}" for e in range(3) for m in ("gate_proj", "up_proj")],
        [f"mlp.experts.{e}.down_proj" for e in range(3)]]
    st = {n: LayerStats(None, None, t) for n, t in (("mlp.experts.0.down_proj", 100), ("mlp.experts.1.down_proj", 5),
                                                     ("mlp.experts.2.down_proj", 95))}
    names = [*st, "mlp.experts.3.down_proj"]  # fair share 50: 5 < 0.1 * 50 is not true, 0 tokens always is
    assert set(starved_experts(names, st, 0.1)) == {"mlp.experts.3.down_proj"}
    assert set(starved_experts(names, st, 0.2)) == {"mlp.experts.1.down_proj", "mlp.experts.3.down_proj"}


def test_experts_with_fewer_tokens_than_inputs_are_starved():
    """A Hessian from fewer tokens than inputs is rank-deficient: such an expert matrix falls back, decided per
    matrix (gate/up have 8 inputs, down 24), and the option moves the line."""
    def stats(tokens, width):
        return LayerStats(torch.eye(width), torch.ones(width), tokens)

    st = {"mlp.experts.0.up_proj": stats(20, 8), "mlp.experts.1.up_proj": stats(20, 8),
          "mlp.experts.0.down_proj": stats(20, 24), "mlp.experts.1.down_proj": stats(30, 24)}
    got = starved_experts(list(st), st, 0.1)
    assert set(got) == {"mlp.experts.0.down_proj"}
    assert "20 calibration tokens for 24 inputs" in got["mlp.experts.0.down_proj"]
    assert set(starved_experts(list(st), st, 0.1, min_per_input=2.0)) == {
        "mlp.experts.0.down_proj", "mlp.experts.1.down_proj"}
    assert starved_experts(list(st), st, 0.1, min_per_input=0.0) == {}
    # only experts: a dense layer with few tokens keeps its Hessian
    assert starved_experts(["mlp.down_proj"], {"mlp.down_proj": stats(5, 24)}, 0.1) == {}


def test_min_expert_tokens_per_input_option_reaches_the_pipeline():
    cfg = QuantConfig(method="gptq", bits=4, group_size=16, options={"min_expert_tokens_per_input": 1e6})
    _, report = quantize(tiny_mixtral(layers=1), cfg, calib(), progress=False)
    experts = [r for r in report.layers if ".experts." in r["name"]]
    assert experts and all(r["fallback"] for r in experts)
    assert not any(r["fallback"] for r in report.layers if ".experts." not in r["name"])


def test_starved_expert_hessian_diagonal_keeps_the_diagonal():
    """With starved_expert_hessian="diagonal", a starved expert that saw tokens keeps its H's diagonal and mean |x|
    (lopro's alpha), so its weights differ from the weight-only fallback's; an unknown mode is refused up front."""
    ids = calib()
    outs = {}
    for mode in STARVED_EXPERT_HESSIANS:
        cfg = QuantConfig(method="lopro", bits=3, group_size=16, rank=4, block_identity=16, block_hadamard=16,
                          options={"min_expert_tokens_per_input": 1e6, "starved_expert_hessian": mode})
        model, report = quantize(tiny_mixtral(layers=1), cfg, ids, progress=False)
        assert all(r["fallback"] for r in report.layers if ".experts." in r["name"])
        outs[mode] = model.model.layers[0].mlp.experts.down_proj.detach().clone()
        assert torch.isfinite(outs[mode]).all()
    assert not torch.allclose(outs["identity"], outs["diagonal"])
    with pytest.raises(ValueError, match="starved_expert_hessian='diag'.*'identity', 'diagonal'"):
        quantize(tiny_mixtral(layers=1), QuantConfig(method="gptq", bits=3, group_size=16,
                                                      options={"starved_expert_hessian": "diag"}), ids, progress=False)


def test_router_norms_embeddings_stay_fp_and_every_expert_is_quantized():
    model = tiny_mixtral()
    fp = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = QuantConfig(method="gptq", bits=2, group_size=16)
    model, report = quantize(model, cfg, calib(), progress=False)
    sd = model.state_dict()
    assert sd.keys() == fp.keys()
    for k in fp:
        changed = not torch.equal(sd[k], fp[k])
        quantizable = "proj" in k
        assert changed == quantizable, k  # routers (mlp.gate.weight), norms, embeddings untouched
    assert len(report.layers) == 2 * (4 + 4 * 3)
    for b in range(2):
        rows = {r["name"]: r for r in report.layers if r["block"] == b}
        assert sum(rows[f"mlp.experts.{e}.down_proj"]["tokens"] for e in range(4)) == CALIB[0] * CALIB[1] * 2
        assert not any(r["fallback"] for r in rows.values())


@pytest.mark.parametrize("true_sequential", [True, False])
def test_starved_expert_falls_back_with_a_warning(caplog, true_sequential):
    model = tiny_mixtral()
    fp = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = starve(model, 3)
    cfg = QuantConfig(method="gptq", bits=3, group_size=16, true_sequential=true_sequential)
    with caplog.at_level(logging.WARNING, logger="lopro.pipeline.run"):
        model, report = quantize(model, cfg, calib(), progress=False)
    for h in hooks:
        h.remove()
    starved = [r for r in report.layers if r["fallback"]]
    assert sorted((r["block"], r["name"]) for r in starved) == sorted(
        (b, f"mlp.experts.3.{m}") for b in range(2) for m in ("gate_proj", "up_proj", "down_proj"))
    assert all(r["tokens"] == 0 for r in starved)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 6 and all("experts.3" in m and "0 calibration tokens" in m for m in warned)
    for k, v in model.state_dict().items():
        assert torch.isfinite(v).all(), k
    # the starved expert is quantized weight-only: GPTQ with H = I is RTN of W
    from lopro.quant.rtn import rtn_quantize

    W = fp["model.layers.1.mlp.experts.down_proj"][3]
    assert torch.allclose(model.model.layers[1].mlp.experts.down_proj[3],
                          rtn_quantize(W, 3, 16).dequantize(), atol=1e-6)


def test_min_expert_tokens_share_option():
    cfg = QuantConfig(method="rtn", bits=4, group_size=16, options={"min_expert_tokens_share": 1.0})
    _, report = quantize(tiny_mixtral(), cfg, calib(), progress=False)
    for b in range(2):
        rows = [r for r in report.layers if r["block"] == b and r["name"].endswith("down_proj")]
        fair = sum(r["tokens"] for r in rows) / 4
        assert [r["fallback"] for r in rows] == [r["tokens"] < fair for r in rows]
        assert any(r["fallback"] for r in rows)


@pytest.mark.parametrize("method", available_methods())
def test_every_method_quantizes_every_expert(method):
    model = tiny_mixtral(layers=1, hidden=32, inter=48)
    fp = {k: v.clone() for k, v in model.state_dict().items()}
    starve(model, 1)  # and a starved expert through each method's weight-only path
    cfg = QuantConfig(method=method, bits=3, group_size=16, rank=4, block_identity=16, block_hadamard=16,
                      options={"vq_kmeans_iters": 2} if get_method(method).residual == "vq" else {})
    model, report = quantize(model, cfg, calib(8, 32) if method != "rtn" else None, progress=False)
    experts = model.model.layers[0].mlp.experts
    for name in ("gate_up_proj", "down_proj"):
        W, W0 = getattr(experts, name), fp[f"model.layers.0.mlp.experts.{name}"]
        assert torch.isfinite(W).all()
        for e in range(4):
            assert not torch.equal(W[e], W0[e]), (name, e)
    assert torch.equal(model.model.layers[0].mlp.gate.weight, fp["model.layers.0.mlp.gate.weight"])
    rows = {r["name"]: r for r in report.layers}
    assert len(rows) == 4 + 12
    if method != "rtn":
        assert [rows[f"mlp.experts.{e}.up_proj"]["fallback"] for e in range(4)] == [False, True, False, False]


def test_weight_only_stats_make_gptq_rtn():
    from lopro.quant.rtn import rtn_quantize

    W = torch.randn(24, 48)
    cfg = QuantConfig(method="gptq", bits=3, group_size=16)
    got = get_method("gptq")(W, weight_only_stats(48), cfg).weight
    assert torch.allclose(got, rtn_quantize(W, 3, 16).dequantize(), atol=1e-6)


def test_quantize_end_to_end_and_save(tmp_path):
    from transformers import MixtralForCausalLM

    model = tiny_mixtral()
    ids = calib(8, 32, seed=1)
    with torch.no_grad():
        ref = model(ids).logits
    cfg = QuantConfig(method="lopro", bits=4, group_size=16, rank=4, block_identity=16, block_hadamard=16,
                      options={"moe_weighted_hessian": True})
    model, report = quantize(model, cfg, calib(16, 32), progress=False)
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    rtn, _ = quantize(tiny_mixtral(), QuantConfig(method="rtn", bits=4, group_size=16), None, progress=False)
    with torch.no_grad():
        got = model(ids).logits
        err, err_rtn = (got - ref).norm() / ref.norm(), (rtn(ids).logits - ref).norm() / ref.norm()
    assert err < 0.9 * err_rtn, (err, err_rtn)
    assert report.summary["layers"] == 32 and report.summary["effective_bits"] > 4
    model.save_pretrained(tmp_path)
    again = MixtralForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, got)


def test_packed_experts_stay_unfused():
    from lopro.nn.qlinear import QuantLinear
    from lopro.model.surgery import packer

    model = tiny_mixtral()
    kept = {}
    cfg = QuantConfig(method="gptq", bits=4, group_size=16)
    model, _ = quantize(model, cfg, calib(), progress=False, on_layer=packer(model, keep_weights=kept))
    x = torch.randn(5, 96)
    for b, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        assert isinstance(experts, UnfusedExperts) and not experts.is_plain()
        for e in range(4):
            q = experts.expert(e).down_proj
            assert isinstance(q, QuantLinear)
            assert torch.allclose(q(x), x @ kept[(b, f"mlp.experts.{e}.down_proj")].T, atol=1e-2, rtol=1e-2)
    with torch.no_grad():
        out = model.generate(calib(1, 8), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


class LinearExpertsMoE(nn.Module):
    """A transformers-4.x-style MoE block: router `gate` and `experts` as nn.Linear modules."""

    def __init__(self, hidden=64, inter=96, experts=4, top_k=2, starved=None):
        super().__init__()
        self.top_k, self.starved = top_k, starved
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(nn.ModuleDict({"w1": nn.Linear(hidden, inter, bias=False),
                                                    "w3": nn.Linear(hidden, inter, bias=False),
                                                    "w2": nn.Linear(inter, hidden, bias=False)}) for _ in range(experts))

    def forward(self, x):
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        logits = self.gate(x)
        if self.starved is not None:
            logits[:, self.starved] = float("-inf")
        w, idx = torch.topk(torch.softmax(logits, -1), self.top_k, -1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, ex in enumerate(self.experts):
            tok, pos = torch.where(idx == e)
            if len(tok):
                h = x[tok]
                y = ex["w2"](torch.nn.functional.silu(ex["w1"](h)) * ex["w3"](h))
                out.index_add_(0, tok, y * w[tok, pos, None])
        return out.reshape(shape)


@pytest.mark.parametrize("true_sequential", [True, False])
def test_linear_experts_are_walked_generically(caplog, true_sequential):
    from conftest import tiny_llama

    model = tiny_llama()
    torch.manual_seed(1)
    for layer in model.model.layers:
        layer.mlp = LinearExpertsMoE(starved=2)
    fp = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = QuantConfig(method="gptq", bits=3, group_size=16, true_sequential=true_sequential)
    with caplog.at_level(logging.WARNING, logger="lopro.pipeline.run"):
        model, report = quantize(model, cfg, calib(), progress=False)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], fp[k]) for k in fp if "mlp.gate" in k or "norm" in k or "embed" in k)
    assert all(not torch.equal(sd[k], fp[k]) for k in fp if ".experts." in k)
    rows = {(r["block"], r["name"]): r for r in report.layers}
    assert len(rows) == 2 * (4 + 12)
    for b in range(2):
        assert sum(rows[(b, f"mlp.experts.{e}.w2")]["tokens"] for e in range(4)) == CALIB[0] * CALIB[1] * 2
        assert [rows[(b, f"mlp.experts.{e}.w1")]["fallback"] for e in range(4)] == [False, False, True, False]
    assert sum("experts.2" in r.getMessage() for r in caplog.records) == 6


def test_packed_moe_checkpoint_round_trip(tmp_path):
    import lopro
    from lopro.io.checkpoint import save_quantized
    from lopro.model.surgery import packer

    cfg = QuantConfig(method="gptq", bits=4, group_size=16)
    model = tiny_mixtral()
    model, report = quantize(model, cfg, calib(), progress=False, on_layer=packer(model))
    ids = calib(2, 16, seed=3)
    with torch.no_grad():
        ref = model(ids).logits
    save_quantized(model, tmp_path, config=cfg, report=report)
    again = lopro.load(tmp_path, device="cpu", backend="reference")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref)


@pytest.mark.real
def test_upcycled_smollm2_matches_dense(smollm2_path):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    dense.model.layers = nn.ModuleList(dense.model.layers[:2])
    dense.config.num_hidden_layers = 2
    moe = upcycle_smollm2(dense, num_experts=4, seed=0)
    assert moe.lm_head.weight is moe.model.embed_tokens.weight
    assert moe.model.layers[1].mlp.experts.gate_up_proj.shape == (4, 2 * 1536, 576)
    ids = calib(2, 64, vocab=49152)
    with torch.no_grad():
        a, b = dense(ids).logits, moe(ids).logits
    assert (a - b).abs().max() < 1e-3
