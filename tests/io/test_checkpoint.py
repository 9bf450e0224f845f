"""Packed checkpoints: pack -> save -> load round trips, refusal of damaged folders, atomic writes, sizes."""
import copy
import json
import os
import struct

import pytest
import torch

from conftest import tiny_llama
from lopro import QuantConfig, quantize
from lopro.io import checkpoint as ck
from lopro.nn.qlinear import QuantLinear
from lopro.model.surgery import packer
from lopro.model.walk import find_blocks


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def calib(n=8, L=32, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(5))


def packed_and_fake(method="lopro", bits=2, model=None, **kw):
    """The packed model, its report, and the fake-quantized model built from the very same results."""
    model = model if model is not None else tiny_llama()
    fake = copy.deepcopy(model)
    cfg = QuantConfig(method=method, bits=bits, group_size=32, rank=4, block_identity=16, block_hadamard=16, **kw)
    kept: dict = {}
    model, report = quantize(model, cfg, calib(), on_layer=packer(model, keep_weights=kept), progress=False)
    _, blocks = find_blocks(fake)
    for (i, name), w in kept.items():
        blocks[i].get_submodule(name).weight.data.copy_(w)
    return model, fake, cfg, report


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, fake, cfg, report = packed_and_fake("lopro")
    out = tmp_path_factory.mktemp("ck") / "lopro-w2"
    ck.save(model, out, config=cfg, report=report)
    return out, model, fake, cfg, report


@pytest.mark.parametrize("method", ["rtn", "gptq", "lopro", "lopro-v", "flrq"])
def test_round_trip_logits_match_fake_quantized(tmp_path, method):
    model, fake, cfg, report = packed_and_fake(method)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in ck.quant_linear_specs(model))
    ck.save(model, tmp_path / "out", config=cfg, report=report)
    loaded = ck.load(tmp_path / "out", device="cpu", backend="reference")
    ref = logits(fake)
    assert rel(logits(model), ref) < 1e-3
    assert torch.equal(logits(loaded), logits(model))


def test_config_files_and_provenance(saved):
    out, model, _fake, cfg, report = saved
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json",
                                                     "model.safetensors", "report.json"]
    assert out.stat().st_mode & 0o055 == 0o055 or os.umask(os.umask(0)) & 0o055  # readable by others
    assert (out / "model.safetensors").stat().st_mode & 0o044 == 0o044 or os.umask(os.umask(0)) & 0o044
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "lopro" and qc["method"] == "lopro" and qc["bits"] == 2
    assert qc["rank"] == 4 and qc["rank_dtype"] == "fp8" and qc["block_hadamard"] == 16
    assert qc["calibration_sha256"] == report.summary["calibration"]["sha256"] and qc["lopro_version"]
    assert qc["quant_config"] == cfg.to_dict() and len(qc["modules"]) == 14
    spec = qc["modules"]["model.layers.0.mlp.down_proj"]
    assert spec["rotation"]["convention"] == qc["hadamard_convention"] and spec["lowrank"]["rank"] == 4
    assert json.loads((out / "report.json").read_text())["summary"]["layers"] == 14


def test_transformers_from_pretrained_after_import_lopro(saved):
    from transformers import AutoModelForCausalLM

    out, model, *_ = saved
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(hf.model.layers[1].mlp.up_proj, QuantLinear)
    assert hf.model.layers[0].self_attn.q_proj.lr_U.dtype == torch.float8_e4m3fn
    assert torch.allclose(logits(hf), logits(model), rtol=0, atol=1e-5)


def test_load_model_detects_packed_checkpoint(saved, monkeypatch):
    from lopro.io import loading

    out, model, *_ = saved
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: None)
    got, _tok, _ = loading.load_model(str(out), device="cpu")
    assert isinstance(got.model.layers[0].mlp.gate_proj, QuantLinear)
    assert rel(logits(got), logits(model)) < 2e-2  # default backend "auto": bf16 compute


def test_sharded_and_narrow_fp_storage(tmp_path):
    model, _fake, cfg, report = packed_and_fake("gptq", bits=3)
    emb = model.model.embed_tokens.weight
    emb.data = emb.data.bfloat16().float()  # exactly representable in bf16 -> stored as bf16
    ck.save(model, tmp_path / "s", config=cfg, report=report, max_shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "s").glob("*.safetensors"))
    assert len(files) > 2 and (tmp_path / "s" / ck.INDEX_NAME).exists()
    found = ck.scan_checkpoint(tmp_path / "s")
    assert found["model.embed_tokens.weight"]["dtype"] == torch.bfloat16
    assert found["model.norm.weight"]["dtype"] == torch.bfloat16  # ones
    assert "lm_head.weight" not in found  # tied to the embeddings
    loaded = ck.load(tmp_path / "s", device="cpu", backend="reference")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(logits(loaded), logits(model))


# --------------------------------------------------------------------------- damaged checkpoints

def rewrite(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture
def copy_of(saved, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(saved[0], dst)
    return dst


def test_truncated_file_is_refused_naming_the_tensor(copy_of):
    path = copy_of / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ck.CheckpointError, match=r"tensor \S+ in model.safetensors is truncated"):
        ck.load(copy_of, device="cpu")
    path.write_bytes(data[:20])
    with pytest.raises(ck.CheckpointError, match="truncated"):
        ck.load(copy_of, device="cpu")


def test_missing_tensor_is_refused(copy_of):
    rewrite(copy_of / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.down_proj.lr_V"))
    with pytest.raises(ck.CheckpointError, match=r"tensor model\.layers\.1\.mlp\.down_proj\.lr_V is missing"):
        ck.load(copy_of, device="cpu")


def test_wrong_shape_and_dtype_are_refused(copy_of):
    name = "model.layers.0.self_attn.k_proj.qweight"

    def shrink(t):
        t[name] = t[name][:-1].clone()

    rewrite(copy_of / "model.safetensors", shrink)
    with pytest.raises(ck.CheckpointError, match=rf"tensor {name} has shape \[31, 16\].*expected \[32, 16\]"):
        ck.load(copy_of, device="cpu")

    def widen(t):
        t[name] = torch.zeros(32, 16, dtype=torch.uint8)
        t["model.layers.0.self_attn.k_proj.scales"] = t["model.layers.0.self_attn.k_proj.scales"].float()

    rewrite(copy_of / "model.safetensors", widen)
    with pytest.raises(ck.CheckpointError, match=r"k_proj\.scales has dtype torch\.float32.*expected torch\.float16"):
        ck.load(copy_of, device="cpu")


def test_unexpected_tensor_and_missing_shard_are_refused(copy_of):
    rewrite(copy_of / "model.safetensors", lambda t: t.update(extra=torch.zeros(2)))
    with pytest.raises(ck.CheckpointError, match="tensor extra .*not part of the model"):
        ck.load(copy_of, device="cpu")
    (copy_of / "model.safetensors").unlink()
    with pytest.raises(ck.CheckpointError, match="model.safetensors"):
        ck.load(copy_of, device="cpu")


# --------------------------------------------------------------------------- atomic writes

def test_interrupted_save_leaves_no_folder(saved, tmp_path, monkeypatch):
    import safetensors.torch

    _out, model, _fake, cfg, report = saved

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.save(model, tmp_path / "new", config=cfg, report=report)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling

    monkeypatch.undo()
    ck.save(model, tmp_path / "new", config=cfg, report=report)
    before = {p.name: p.read_bytes() for p in (tmp_path / "new").iterdir()}
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        ck.save(model, tmp_path / "new", config=cfg, report=report, overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "new").iterdir()} == before  # old folder intact
    assert [p.name for p in tmp_path.iterdir()] == ["new"]


# --------------------------------------------------------------------------- sizes

def test_size_on_disk_matches_effective_bits(saved):
    out, model, _fake, _cfg, report = saved
    info = ck.checkpoint_info(out)
    bits = report.summary["effective_bits"]  # counted by the methods (quant/bits.py)
    assert info["effective_bits"] == pytest.approx(bits, rel=0.05)
    assert info["effective_bits"] == pytest.approx(info["effective_bits_config"])
    # random fp32 embeddings stay fp32; the norms (all ones) are stored exactly in bf16
    assert info["unquantized_bytes"] == 128 * 64 * 4 + 5 * 64 * 2
    header, start = ck.read_safetensors_header(out / "model.safetensors")
    assert info["weights_bytes"] == start + info["quantized_bytes"] + info["unquantized_bytes"]
    assert info["quantized_bytes"] * 8 == pytest.approx(bits * info["quantized_params"], rel=0.05)


def test_cli_info_and_quantize_flags(saved, capsys):
    from lopro.cli import build_parser, main

    out = saved[0]
    assert main(["info", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "effective bits" in text and "[verified]" in text
    assert main(["info", str(out / "missing")]) == 2
    assert build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--fake"]).fake


def test_header_parser_rejects_garbage(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(ck.CheckpointError, match="corrupt"):
        ck.read_safetensors_header(bad)


# --------------------------------------------------------------------------- real model, whole CLI path

@pytest.mark.real
def test_cli_quantize_info_generate_eval_on_cut_smollm2(smollm2_path, tmp_path, capsys):
    """SmolLM2 cut to one block: `lopro quantize` writes a packed folder that info/generate/eval use."""
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lopro.cli import main

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    model.model.layers = nn.ModuleList(model.model.layers[:1])
    model.config.num_hidden_layers = 1
    model.save_pretrained(tmp_path / "cut")
    AutoTokenizer.from_pretrained(smollm2_path).save_pretrained(tmp_path / "cut")
    from lopro.data.corpora import load_corpus

    text = tmp_path / "text.txt"  # a small corpus: tokenizing the whole built-in one takes longer than the rest
    text.write_text(load_corpus("wiki").split("eval")[:40_000])
    out = tmp_path / "packed"
    assert main(["quantize", "--model", str(tmp_path / "cut"), "--method", "lopro", "--bits", "3",
                 "--group-size", "64", "--nsamples", "4", "--seqlen", "64", "--device", "cpu",
                 "--calib-data", str(text), "--out", str(out)]) == 0
    info = ck.checkpoint_info(out)
    assert info["quantized_layers"] == 7 and 3 < info["effective_bits"] < 4.5
    assert (out / "tokenizer.json").exists() and (out / "report.json").exists()
    assert main(["info", str(out)]) == 0
    assert main(["generate", "--model", str(out), "--prompt", "The capital of France is",
                 "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert main(["eval", "--model", str(out), "--data", str(text), "--seqlen", "64", "--windows", "2",
                 "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "The capital of France is" in text and "ppl=" in text


def test_lopro_rank_auto_round_trip(tmp_path):
    """`lopro --rank auto`: per-layer ranks from R1-FLR are saved per layer and reload exactly."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # strong low-rank parts of different ranks, so R1-FLR keeps different ranks
        for k, lin in enumerate(m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head):
            r = 1 + k % 3
            U, V = torch.randn(lin.out_features, r, generator=g), torch.randn(r, lin.in_features, generator=g)
            lin.weight += U @ V
    model, fake, cfg, report = packed_and_fake("lopro", model=model, options={"rank_mode": "auto"})
    ranks = {f"model.layers.{r['block']}.{r['name']}": r["rank"] for r in report.layers}
    assert len(set(ranks.values())) > 1 and max(ranks.values()) > 0, ranks
    ck.save(model, tmp_path / "out", config=cfg, report=report)
    loaded = ck.load(tmp_path / "out", device="cpu", backend="reference")
    assert rel(logits(loaded), logits(fake)) < 1e-3
    assert torch.equal(logits(loaded), logits(model))
    saved = {name: s["lowrank"]["rank"] for name, s in ck.quant_linear_specs(loaded).items()}
    assert saved == ranks
