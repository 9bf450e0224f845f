"""Export to GGUF, the GPTQ format and LoRA adapters: read back by independent readers, and the refusals."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lopro
from conftest import tiny_llama
from lopro import QuantConfig, quantize
from lopro.export import ExportError, export, load_exact
from lopro.nn.qlinear import QuantLinear
from lopro.model.surgery import packer

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(5))


def calib(n=8, L=32, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


def checkpoint(tmp_path, method="gptq", bits=4, group_size=32, model=None, **kw):
    model = model if model is not None else tiny_llama()
    cfg = QuantConfig(method=method, bits=bits, group_size=group_size, rank=kw.pop("rank", 4),
                      block_identity=16, block_hadamard=16, **kw)
    model, report = quantize(model, cfg, calib(), on_layer=packer(model), progress=False)
    out = tmp_path / f"{method}-w{bits}-g{group_size}"
    lopro.save(model, out, config=cfg, report=report)
    return out


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------- a GPTQ-format reader

def unpack_gptq_words(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Values packed along dim 0 of int32 `words` ([count * bits / 32, N]) as AutoGPTQ describes them:
    2/4/8 bits: word i holds values i*(32/bits) + k at bits [bits*k, bits*(k+1)); 3 bits: every 3 words
    hold 32 values, 10 in the first word, value 10 split 2 | 1 bits over words 0 and 1, 10 more, value 21
    split 1 | 2 bits over words 1 and 2, the last 10 in word 2."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    mask = (1 << bits) - 1
    out = torch.zeros(count, w.shape[1], dtype=torch.int64)
    if bits in (2, 4, 8):
        per = 32 // bits
        for k in range(per):
            out[k::per] = (w >> (bits * k)) & mask
        return out
    assert bits == 3
    for t in range(count // 32):
        w0, w1, w2 = w[3 * t], w[3 * t + 1], w[3 * t + 2]
        base = 32 * t
        for j in range(10):
            out[base + j] = (w0 >> (3 * j)) & 7
        out[base + 10] = ((w0 >> 30) & 3) | ((w1 & 1) << 2)
        for j in range(10):
            out[base + 11 + j] = (w1 >> (3 * j + 1)) & 7
        out[base + 21] = ((w1 >> 31) & 1) | ((w2 & 3) << 1)
        for j in range(10):
            out[base + 22 + j] = (w2 >> (3 * j + 2)) & 7
    return out


def read_gptq_layer(tensors: dict, name: str, bits: int, v2: bool = False) -> torch.Tensor:
    """The [out, in] weight of one GPTQ-format layer: s[g_idx[k], j] * (q[k, j] - (qzeros + 1))."""
    qweight, qzeros = tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"]
    scales, g_idx = tensors[f"{name}.scales"].float(), tensors[f"{name}.g_idx"].long()
    K, N = g_idx.numel(), scales.shape[1]
    q = unpack_gptq_words(qweight, bits, K)  # [K, N]
    z = unpack_gptq_words(qzeros.T.contiguous(), bits, N).T  # packed along N: [G, N]
    z = z if v2 else z + 1
    return (scales[g_idx] * (q - z[g_idx]).float()).T


@pytest.mark.parametrize("method,bits,group_size,kw,fmt", [
    ("rtn", 4, 32, {}, "gptq"), ("gptq", 3, 32, {}, "gptq"), ("gptq", 2, 64, {"sym": True}, "gptq"),
    ("rtn", 8, -1, {}, "gptq"), ("gptq", 4, 32, {"desc_act": True}, "gptq"),
    ("rtn", 3, 48, {}, "gptq_v2"),  # a group with zero point 0 that uses code 7: auto writes gptq_v2
])
def test_gptq_format_reads_back_the_same_weights(tmp_path, method, bits, group_size, kw, fmt):
    ck = checkpoint(tmp_path, method, bits, group_size, **kw)
    rep = export(ck, "gptq", tmp_path / "gptq")
    tensors = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    qcfg = json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())
    cfg = json.loads((tmp_path / "gptq" / "config.json").read_text())
    assert cfg["quantization_config"] == qcfg and qcfg["quant_method"] == "gptq" and qcfg["bits"] == bits
    assert qcfg["group_size"] == group_size and qcfg["desc_act"] == bool(kw.get("desc_act"))
    assert qcfg["sym"] == bool(kw.get("sym")) and qcfg["checkpoint_format"] == fmt
    model = load_exact(ck)
    for name, mod in layers(model).items():
        assert tensors[f"{name}.qweight"].dtype == torch.int32 and tensors[f"{name}.scales"].dtype == torch.float16
        assert tensors[f"{name}.qweight"].shape == (mod.in_features * bits // 32, mod.out_features)
        assert torch.equal(read_gptq_layer(tensors, name, bits, v2=fmt == "gptq_v2"), mod.dense_weight()), name
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16 and "lm_head.weight" not in tensors
    assert rep["exact"] and len(rep["layers"]) == 14
    assert json.loads((tmp_path / "gptq" / "export.json").read_text())["format"] == "gptq"
    assert (tmp_path / "gptq" / "generation_config.json").exists()


def test_gptq_format_loads_into_plain_transformers_skeleton(tmp_path):
    """Names and shapes of every tensor match what a GPTQ loader builds from config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ck = checkpoint(tmp_path, "rtn", 4, 32)
    export(ck, "gptq", tmp_path / "gptq")
    tensors = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    cfg = AutoConfig.from_pretrained(tmp_path / "gptq")
    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(cfg)
    for name, p in ref.state_dict().items():
        if name.endswith("_proj.weight"):
            base = name.removesuffix(".weight")
            assert {f"{base}.{k}" for k in ("qweight", "qzeros", "scales", "g_idx")} <= set(tensors)
        elif name != "lm_head.weight":
            assert tensors[name].shape == p.shape


def test_zero_point_zero_needs_gptq_v2(tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:4].abs_()  # all-positive groups: zero point 0
    ck = checkpoint(tmp_path, "rtn", 4, 32, model=model)
    with pytest.raises(ExportError, match="zero point 0.*gptq_v2"):
        export(ck, "gptq", tmp_path / "v1", checkpoint_format="gptq")
    assert not (tmp_path / "v1").exists()
    rep = export(ck, "gptq", tmp_path / "v2")
    assert rep["quantize_config"]["checkpoint_format"] == "gptq_v2"
    tensors = load_file(str(tmp_path / "v2" / "model.safetensors"))
    mod = load_exact(ck).model.layers[0].mlp.up_proj
    assert torch.equal(read_gptq_layer(tensors, "model.layers.0.mlp.up_proj", 4, v2=True), mod.dense_weight())


# --------------------------------------------------------------------------- GGUF through transformers' loader

def load_gguf(folder, name="model.gguf"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


@pytest.mark.parametrize("method,bits,group_size,kw,kind,tol", [
    ("gptq", 3, 32, {}, "Q4_0", 0.0),           # <= 3 bits: c - z + 8 in [1, 15], bit-exact
    ("rtn", 3, 64, {"sym": True}, "Q4_0", 0.0),  # symmetric 3-bit: exact too
    ("rtn", 2, -1, {}, "Q4_0", 0.0),             # per channel
    ("gptq", 4, 32, {}, "Q4_1", 1e-3),           # m = -(z + k) d rounded to fp16 in some blocks
    ("rtn", 5, 32, {}, "Q5_1", 1e-3),
    ("rtn", 8, 64, {"sym": True}, "Q8_0", 0.0),
])
def test_gguf_loads_in_transformers_with_the_same_weights(tmp_path, method, bits, group_size, kw, kind, tol):
    ck = checkpoint(tmp_path, method, bits, group_size, **kw)
    rep = export(ck, "gguf", tmp_path / "gguf")
    assert {e["type"] for e in rep["layers"].values()} == {kind}
    hf, lm = load_gguf(tmp_path / "gguf"), load_exact(ck)
    worst = 0.0
    for name, mod in layers(lm).items():
        w, ref = hf.get_submodule(name).weight.detach(), mod.dense_weight()
        worst = max(worst, float((w - ref).abs().max()))
        assert rel(w, ref) <= tol, name
    assert worst == pytest.approx(rep["max_abs_error"], abs=1e-12)
    assert (worst == 0.0) == rep["exact"] == (tol == 0.0)
    assert torch.equal(hf.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert rel(logits(hf), logits(lm)) < (1e-5 if tol == 0 else 3e-3)


def test_gguf_bit_exact_option_writes_4bit_asymmetric_as_q5_0(tmp_path):
    ck = checkpoint(tmp_path, "gptq", 4, 32)
    rep = export(ck, "gguf", tmp_path / "gguf", bit_exact=True)
    assert {e["type"] for e in rep["layers"].values()} == {"Q5_0"} and rep["exact"]
    hf, lm = load_gguf(tmp_path / "gguf"), load_exact(ck)
    for name, mod in layers(lm).items():
        assert torch.equal(hf.get_submodule(name).weight, mod.dense_weight())
    assert rel(logits(hf), logits(lm)) < 1e-5


def test_gguf_metadata(tmp_path):
    from gguf import GGUFReader

    ck = checkpoint(tmp_path, "rtn", 3, 32)
    export(ck, "gguf", tmp_path / "gguf")
    r = GGUFReader(str(tmp_path / "gguf" / "model.gguf"))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 2
    assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.embedding_length"] == 64 and f["llama.feed_forward_length"] == 96
    assert f["llama.rope.dimension_count"] == 16 and f["llama.vocab_size"] == 128
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names and "blk.1.ffn_down.weight" in names
    assert {t.tensor_type.name for t in r.tensors if t.name.endswith("norm.weight")} == {"F32"}


# --------------------------------------------------------------------------- LoRA: base + adapter

def merged_peft(folder, base_weights: dict) -> dict:
    """Each target module's base weight + lora_B @ lora_A * (lora_alpha / r), from a PEFT adapter folder."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and not cfg["use_rslora"]
    t = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for name in cfg["target_modules"]:
        A, B = t[f"base_model.model.{name}.lora_A.weight"], t[f"base_model.model.{name}.lora_B.weight"]
        r = cfg["rank_pattern"].get(name, cfg["r"])
        alpha = cfg["alpha_pattern"].get(name, cfg["lora_alpha"])
        assert A.shape[0] == r == B.shape[1]
        out[name] = base_weights[name] + (alpha / r) * (B @ A)
    return out


FLRQ_FIXED = {"sym": True, "rank_dtype": "fp16", "options": {"rank_mode": "fixed"}}


@pytest.mark.parametrize("method,bits,kw", [("lqer", 3, {}), ("flrq", 4, FLRQ_FIXED),
                                            ("lowrank-gptq", 4, {})])
def test_lora_gguf_base_plus_adapter_is_the_dense_weight(tmp_path, method, bits, kw):
    ck = checkpoint(tmp_path, method, bits, 32, **kw)
    rep = export(ck, "lora", tmp_path / "lora")
    assert rep["base"] == "gguf" and rep["exact"] == (bits <= 3 or kw.get("sym", False))
    out = tmp_path / "lora"
    assert {"model.gguf", "adapter.gguf", "adapter/adapter_config.json", "export.json"} <= set(rep["files"])
    hf, lm = load_gguf(out), load_exact(ck)
    qlayers = layers(lm)
    merged = merged_peft(out / "adapter", {n: hf.get_submodule(n).weight.detach() for n in qlayers})
    assert set(merged) == {n for n, m in qlayers.items() if m.spec["lowrank"]["rank"] > 0}
    for name, w in merged.items():
        dense = qlayers[name].dense_weight()
        assert rel(w, dense) < (1e-6 if rep["exact"] else 1e-3), name
    # the llama.cpp adapter: same factors, lora_b rows in llama.cpp's q/k order, alpha 0 = scale 1
    from gguf import GGUFReader

    from lopro.export.gguf_file import permute_qk_rows

    r = GGUFReader(str(out / "adapter.gguf"))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.type"] == "adapter" and f["adapter.type"] == "lora" and f["adapter.lora.alpha"] == 0.0
    t = {x.name: np.array(x.data) for x in r.tensors}
    peft = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    B = peft["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].numpy()
    assert np.array_equal(t["blk.1.attn_q.weight.lora_b"], permute_qk_rows(B, 4))
    A = peft["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].numpy()
    assert np.array_equal(t["blk.1.ffn_down.weight.lora_a"], A)


def test_lora_gptq_base_plus_adapter_is_the_dense_weight(tmp_path):
    ck = checkpoint(tmp_path, "lqer", 4, 32)
    rep = export(ck, "lora", tmp_path / "lora", base="gptq")
    assert rep["base"] == "gptq" and rep["exact"]
    tensors = load_file(str(tmp_path / "lora" / "base" / "model.safetensors"))
    lm = load_exact(ck)
    qlayers = layers(lm)
    base = {n: read_gptq_layer(tensors, n, 4) for n in qlayers}
    merged = merged_peft(tmp_path / "lora" / "adapter", base)
    for name, w in merged.items():
        assert rel(w, qlayers[name].dense_weight()) < 1e-6, name
    assert json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "../base"


def test_lora_auto_base_falls_back_to_gptq_when_gguf_cannot_hold_it(tmp_path):
    ck = checkpoint(tmp_path, "lqer", 3, 48)
    assert export(ck, "lora", tmp_path / "lora")["base"] == "gptq"


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("fmt", ["gguf", "gptq", "lora"])
def test_rotation_is_refused_with_the_lossy_option_measured(tmp_path, fmt):
    ck = checkpoint(tmp_path, "lopro", 2, 32)
    with pytest.raises(ExportError, match=r"rotation.*lossy='q8_0'.*relative error on this layer \d"):
        export(ck, fmt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_lossy_q8_0_writes_lopro_and_reports_the_error(tmp_path):
    ck = checkpoint(tmp_path, "lopro", 2, 32)
    rep = export(ck, "gguf", tmp_path / "out", lossy="q8_0")
    assert not rep["exact"] and {e["type"] for e in rep["layers"].values()} == {"Q8_0"}
    assert all(0 < e["rel_error"] < 0.02 for e in rep["layers"].values())
    hf, lm = load_gguf(tmp_path / "out"), load_exact(ck)
    for name, mod in layers(lm).items():
        assert rel(hf.get_submodule(name).weight, mod.dense_weight()) == pytest.approx(
            rep["layers"][name]["rel_error"], rel=1e-4)


@pytest.mark.parametrize("method", ["gptvq", "lopro-v"])
def test_vq_residuals_are_refused(tmp_path, method):
    ck = checkpoint(tmp_path, method, 2, 32)
    for fmt in ("gguf", "gptq"):
        with pytest.raises(ExportError, match="vector-quantized|rotation"):
            export(ck, fmt, tmp_path / fmt)


def test_group_size_not_a_multiple_of_32_is_refused_for_gguf_only(tmp_path):
    ck = checkpoint(tmp_path, "rtn", 4, 48)
    with pytest.raises(ExportError, match="group size 48 is not a multiple of 32.*--format gptq"):
        export(ck, "gguf", tmp_path / "gguf")
    assert export(ck, "gptq", tmp_path / "gptq")["exact"]


def test_act_order_is_refused_for_gguf(tmp_path):
    ck = checkpoint(tmp_path, "gptq", 4, 32, desc_act=True)
    with pytest.raises(ExportError, match="not contiguous"):
        export(ck, "gguf", tmp_path / "gguf")


def test_lowrank_needs_the_lora_format(tmp_path):
    ck = checkpoint(tmp_path, "lqer", 3, 32)
    for fmt in ("gguf", "gptq"):
        with pytest.raises(ExportError, match="low-rank branch.*format='lora'"):
            export(ck, fmt, tmp_path / fmt)
    plain = checkpoint(tmp_path, "rtn", 3, 32)
    with pytest.raises(ExportError, match="no low-rank branch"):
        export(plain, "lora", tmp_path / "lora")


def test_bad_arguments_and_folders(tmp_path):
    ck = checkpoint(tmp_path, "rtn", 3, 32)
    with pytest.raises(ValueError, match="format must be one of"):
        export(ck, "onnx", tmp_path / "x")
    with pytest.raises(ValueError, match="lossy must be"):
        export(ck, "gguf", tmp_path / "x", lossy="q2_k")
    with pytest.raises(ValueError, match="GGUF output only"):
        export(ck, "gptq", tmp_path / "x", lossy="q8_0")
    tiny_llama().save_pretrained(tmp_path / "fp")
    with pytest.raises(ExportError, match="not a packed lopro checkpoint"):
        export(tmp_path / "fp", "gguf", tmp_path / "x")
    export(ck, "gguf", tmp_path / "x")
    with pytest.raises(FileExistsError):
        export(ck, "gguf", tmp_path / "x")
    export(ck, "gptq", tmp_path / "x", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["config.json", "export.json",
                                                                 "generation_config.json", "model.safetensors",
                                                                 "quantize_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


# --------------------------------------------------------------------------- the real SmolLM2 (two blocks)

@pytest.mark.real
def test_smollm2_gguf_tokenizer_and_logits(tmp_path, smollm2_path):
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    model.model.layers = nn.ModuleList(model.model.layers[:2])
    model.config.num_hidden_layers = 2
    cfg = QuantConfig(method="rtn", bits=3, group_size=64)
    model, report = quantize(model, cfg, calib(4, 32, 49152), on_layer=packer(model), progress=False)
    lopro.save(model, tmp_path / "ck", config=cfg, report=report, tokenizer=tok)
    rep = export(tmp_path / "ck", "gguf", tmp_path / "gguf")
    assert rep["exact"]
    hf = load_gguf(tmp_path / "gguf")
    ids = tok("The quantized model reads 12345 tokens, then <|im_end|> stops.", return_tensors="pt").input_ids
    assert rel(logits(hf, ids), logits(load_exact(tmp_path / "ck"), ids)) < 1e-5
    from gguf import GGUFReader

    fields = GGUFReader(str(tmp_path / "gguf" / "model.gguf")).fields
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2" and fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is (tok("a").input_ids[0] == tok.bos_token_id)
    gtok = AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf")
    for text in ("Hello world! It's 2026.", " leading space and\nnewline", "<|im_start|>user\nhi<|im_end|>"):
        assert gtok(text).input_ids == tok(text).input_ids, text


def test_cli_export_and_refusal_exit_code(tmp_path, capsys):
    from lopro.cli import main

    ck = checkpoint(tmp_path, "rtn", 3, 32)
    assert main(["export", str(ck), "--format", "gguf", "--out", str(tmp_path / "g"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["exact"] and (tmp_path / "g" / "model.gguf").exists()
    rot = checkpoint(tmp_path, "lopro", 2, 32)
    assert main(["export", str(rot), "--format", "gptq", "--out", str(tmp_path / "q")]) == 2
    assert "rotation" in capsys.readouterr().err and not (tmp_path / "q").exists()
