"""Streamed quantization (block by block from disk to disk), resume after a crash, streamed evaluation.

Models are tiny random Llamas saved to disk with SmolLM2's tokenizer (vocab 49152, so real text
tokenizes into valid ids)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from lopro import QuantConfig, quantize, save
from lopro.cli import main
from lopro.io.stream import ResumeError, work_folder
from lopro.jobs import evaluate_ppl, quantize_to_folder
from lopro.io.checkpoint import CheckpointError
from lopro.model.surgery import packer

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 49152


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from lopro.data.corpora import load_corpus

    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(load_corpus("wiki").split("eval")[:40_000])
    return path


def save_model(folder: Path, smollm2_path, layers=3, hidden=64, inter=96, seed=0, **save_kw) -> Path:
    from transformers import AutoTokenizer

    model = tiny_llama(seed=seed, layers=layers, hidden=hidden, inter=inter, vocab=VOCAB)
    model.save_pretrained(folder, **save_kw)
    AutoTokenizer.from_pretrained(smollm2_path).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm2_path):
    return save_model(tmp_path_factory.mktemp("model") / "tiny", smollm2_path, layers=4)


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


CFG = dict(bits=3, group_size=32, rank=4, block_identity=16, block_hadamard=16)


def quant_args(model_dir, corpus, out, *extra):
    return ["quantize", "--model", str(model_dir), "--method", "gptq", "--bits", "3", "--group-size", "32",
            "--nsamples", "4", "--seqlen", "64", "--batch-size", "2", "--calib-data", str(corpus), "--device", "cpu",
            "--out", str(out), *extra]


@pytest.mark.parametrize("method", ["gptq", "lopro"])
def test_streamed_equals_in_memory_byte_for_byte(model_dir, corpus, tmp_path, method):
    """The streamed run (blocks read from disk, written as shards, merged) writes the same bytes as
    quantizing the loaded model in memory and saving it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lopro.data.windows import calibration_windows, tokenize_split

    cfg = QuantConfig(method=method, **CFG)
    quantize_to_folder(str(model_dir), cfg, tmp_path / "streamed", calib_data=str(corpus), nsamples=4, seqlen=64,
                       batch_size=2, device="cpu")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    calib = calibration_windows(tokenize_split(tok, str(corpus), "calib"), 4, 64, cfg.seed)
    model, report = quantize(model, cfg, calib, batch_size=2, device="cpu", on_layer=packer(model))
    save(model, tmp_path / "memory", config=cfg, report=report, tokenizer=tok)
    assert hashes(tmp_path / "streamed") == hashes(tmp_path / "memory")
    assert (tmp_path / "streamed" / "config.json").read_bytes() == (tmp_path / "memory" / "config.json").read_bytes()
    rep = json.loads((tmp_path / "streamed" / "report.json").read_text())
    assert [b["block"] for b in rep["blocks"]] == [0, 1, 2, 3]
    assert all(b["read_s"] >= 0 and b["write_s"] >= 0 and b["solve_s"] > 0 for b in rep["blocks"])
    assert rep["summary"]["bytes_read"] > 0 and rep["summary"]["bytes_written"] > 0
    assert not work_folder(tmp_path / "streamed").exists()


def test_large_output_stays_sharded_with_index(model_dir, corpus, tmp_path):
    from lopro.io.checkpoint import load

    cfg = QuantConfig(method="rtn", bits=4, group_size=32)
    # a 1-byte shard limit: the output counts as large, so the per-block files stay, with their index
    quantize_to_folder(str(model_dir), cfg, tmp_path / "out", calib_data=str(corpus), device="cpu", max_shard_bytes=1)
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    # one shard per block, then one per tensor outside the blocks (embeddings, final norm; the head is tied)
    assert files == [f"model-{k:05d}-of-00006.safetensors" for k in range(1, 7)]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["model.embed_tokens.weight"] == "model-00005-of-00006.safetensors"
    assert index["weight_map"]["model.norm.weight"] == "model-00006-of-00006.safetensors"
    load(tmp_path / "out", device="cpu")


def _run_cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "lopro.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def _blocks_done(work: Path) -> int:
    try:
        return len(json.loads((work / "manifest.json").read_text())["body"]["blocks"])
    except (OSError, ValueError, KeyError):
        return 0


def test_sigkill_then_resume_is_byte_identical(model_dir, corpus, tmp_path):
    """SIGKILL at a random point (after a random number of finished blocks, plus a random delay), then
    the same command with --resume: the same bytes as an uninterrupted run."""
    ref = tmp_path / "ref"
    p = _run_cli(quant_args(model_dir, corpus, ref))
    assert p.wait() == 0, p.stderr.read()
    rng = random.Random(1234)
    out = tmp_path / "out"
    work = work_folder(out)
    proc = _run_cli(quant_args(model_dir, corpus, out))
    k = rng.randint(1, 3)
    deadline = time.time() + 120
    while proc.poll() is None and _blocks_done(work) < k and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed mid-run (block 2 of 4), so the resume has work to do
    assert not out.exists() and work.exists()  # only a finished run appears under --out
    p = _run_cli(quant_args(model_dir, corpus, out))  # without --resume: refused, the folder kept
    assert p.wait() == 2 and "--resume" in p.stderr.read() and work.exists()
    p = _run_cli(quant_args(model_dir, corpus, out, "--resume"))
    assert p.wait() == 0, p.stderr.read()
    assert hashes(out) == hashes(ref)


def _partial_run(model_dir, corpus, out, blocks: int, monkeypatch, offload="ram"):
    """Run in-process until `blocks` blocks are finished, then fail as a full disk would."""
    from lopro.io import stream

    real = stream.write_tensors
    calls = {"n": 0}

    def failing(tensors, path):
        if any(".layers." in k for k in tensors):
            calls["n"] += 1
            if calls["n"] > blocks:
                raise OSError(28, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(stream, "write_tensors", failing)
    with pytest.raises(OSError, match="--resume"):
        quantize_to_folder(str(model_dir), QuantConfig(method="gptq", **CFG), out, calib_data=str(corpus), nsamples=4,
                           seqlen=64, batch_size=2, device="cpu", offload=offload)
    monkeypatch.setattr(stream, "write_tensors", real)


def _resume(model_dir, corpus, out, offload="ram", **cfg):
    return quantize_to_folder(str(model_dir), QuantConfig(method="gptq", **{**CFG, **cfg}), out,
                              calib_data=str(corpus), nsamples=4, seqlen=64, batch_size=2, device="cpu",
                              resume=True, offload=offload)


@pytest.fixture(scope="module")
def reference(model_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref"
    quantize_to_folder(str(model_dir), QuantConfig(method="gptq", **CFG), out, calib_data=str(corpus), nsamples=4,
                       seqlen=64, batch_size=2, device="cpu")
    return hashes(out)


@pytest.mark.parametrize("offload", ["ram", "disk"])
def test_full_disk_keeps_finished_blocks_and_resume_completes(model_dir, corpus, tmp_path, monkeypatch, reference,
                                                              offload):
    out = tmp_path / "out"
    _partial_run(model_dir, corpus, out, 2, monkeypatch, offload)
    manifest = json.loads((work_folder(out) / "manifest.json").read_text())["body"]
    assert len(manifest["blocks"]) == 2 and not out.exists()
    summary = _resume(model_dir, corpus, out, offload)
    assert summary["resumed_from_block"] == 2
    assert hashes(out) == reference


def test_torn_shard_and_torn_manifest_are_redone(model_dir, corpus, tmp_path, monkeypatch, reference):
    out = tmp_path / "out"
    _partial_run(model_dir, corpus, out, 3, monkeypatch)
    work = work_folder(out)
    body = json.loads((work / "manifest.json").read_text())["body"]
    last = work / body["blocks"][-1]["file"]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a torn shard: block 2 is redone
    (work / "manifest.json").write_text('{"body": {"blocks": [')    # a torn manifest: the previous one is used
    summary = _resume(model_dir, corpus, out)
    assert summary["resumed_from_block"] == 2  # the previous manifest (2 blocks done): block 2 is redone
    assert hashes(out) == reference


def test_resume_with_other_settings_is_refused_naming_them(model_dir, corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _partial_run(model_dir, corpus, out, 1, monkeypatch)
    with pytest.raises(ResumeError, match=r"quant_config\.bits: 3 -> 4"):
        _resume(model_dir, corpus, out, bits=4)
    assert work_folder(out).exists()  # nothing lost


def test_checkpoint_that_does_not_match_its_config_is_refused(model_dir, tmp_path, corpus):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    t = load_file(str(bad / "model.safetensors"))
    t["model.layers.0.mlp.gate.weight"] = t.pop("model.layers.0.mlp.gate_proj.weight")
    save_file(t, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.gate_proj.weight.*model.layers.0.mlp.gate.weight"):
        quantize_to_folder(str(bad), QuantConfig(method="rtn", bits=4, group_size=32), tmp_path / "o",
                           calib_data=str(corpus))
    assert not (tmp_path / "o").exists() and not work_folder(tmp_path / "o").exists()


def test_missing_shard_is_refused(tmp_path, smollm2_path, corpus):
    folder = save_model(tmp_path / "sharded", smollm2_path, layers=2, max_shard_size="1MB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    assert main(quant_args(folder, corpus, tmp_path / "o")) == 2
    with pytest.raises(CheckpointError, match="missing"):
        quantize_to_folder(str(folder), QuantConfig(method="rtn", bits=4, group_size=32), tmp_path / "o",
                           calib_data=str(corpus))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_stream(tmp_path, smollm2_path, corpus, dtype):
    """fp16 / bf16 checkpoints: blocks computed in fp32, unquantized tensors kept in their stored dtype."""
    from transformers import AutoModelForCausalLM

    folder = save_model(tmp_path / "m", smollm2_path, layers=2)
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    m.save_pretrained(folder)
    out = tmp_path / "o"
    quantize_to_folder(str(folder), QuantConfig(method="gptq", **CFG), out, calib_data=str(corpus), nsamples=2,
                       seqlen=32, device="cpu")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == dtype
    assert evaluate_ppl(str(out), str(corpus), seqlen=32, windows=2, device="cpu")["ppl"] > 0


def test_streamed_fp_eval_equals_in_memory(model_dir, corpus):
    from lopro.io.loading import load_model

    streamed = evaluate_ppl(str(model_dir), str(corpus), seqlen=64, windows=5, batch_size=2, device="cpu")
    model, tok, _ = load_model(str(model_dir), device="cpu")
    memory = evaluate_ppl(model, str(corpus), seqlen=64, windows=5, batch_size=2, tokenizer=tok)
    assert streamed["streamed"] and streamed["nll"] == memory["nll"]


def _peak_rss(folder: Path, corpus: Path) -> int:
    code = ("import json,sys; from lopro import QuantConfig; from lopro.jobs import quantize_to_folder; "
            "s = quantize_to_folder(sys.argv[1], QuantConfig(method='gptq', bits=4, group_size=64), sys.argv[2], "
            "calib_data=sys.argv[3], nsamples=2, seqlen=32, device='cpu', offload='ram'); "
            "print(json.dumps(s['peak_memory_bytes']))")
    p = subprocess.run([sys.executable, "-c", code, str(folder), str(folder) + "-q", str(corpus)], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    return int(p.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_depth(tmp_path, smollm2_path, corpus):
    """2 and 8 blocks of the same width peak within 10% (one block in memory at a time); holding all 8
    blocks would add 6 x 28 MB, about a third of the 2-block peak."""
    two = save_model(tmp_path / "two", smollm2_path, layers=2, hidden=768, inter=2048)
    eight = save_model(tmp_path / "eight", smollm2_path, layers=8, hidden=768, inter=2048)
    p2, p8 = _peak_rss(two, corpus), _peak_rss(eight, corpus)
    assert p8 <= 1.10 * p2, (p2, p8)


def test_fused_moe_experts_stream_from_per_expert_checkpoint(tmp_path, smollm2_path, corpus):
    """transformers saves Mixtral experts per expert (w1/w2/w3) and fuses them on load; the lazy model
    goes through the same conversion mapping, and the streamed run equals the in-memory one."""
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from lopro.data.windows import calibration_windows, tokenize_split
    from lopro.io.lazy import LazyModel

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=128)
    folder = tmp_path / "moe"
    MixtralForCausalLM(cfg).eval().save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    tok.save_pretrained(folder)
    lazy = LazyModel(folder)
    assert lazy.sources["model.layers.0.mlp.experts.gate_up_proj"][0] == "convert"
    qcfg = QuantConfig(method="gptq", bits=4, group_size=32, options={"min_expert_tokens_per_input": 0.0})
    quantize_to_folder(str(folder), qcfg, tmp_path / "streamed", calib_data=str(corpus), nsamples=8, seqlen=32,
                       device="cpu")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    calib = calibration_windows(tokenize_split(tok, str(corpus), "calib"), 8, 32, qcfg.seed)
    model, report = quantize(model, qcfg, calib, batch_size=8, device="cpu", on_layer=packer(model))
    save(model, tmp_path / "memory", config=qcfg, report=report, tokenizer=tok)
    assert hashes(tmp_path / "streamed") == hashes(tmp_path / "memory")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_run_on_cuda_keeps_one_block_on_the_gpu(model_dir, corpus, tmp_path):
    from lopro.io.checkpoint import load

    cfg = QuantConfig(method="gptq", **CFG)
    s = quantize_to_folder(str(model_dir), cfg, tmp_path / "gpu", calib_data=str(corpus), nsamples=4, seqlen=64,
                           batch_size=2, device="cuda")
    quantize_to_folder(str(model_dir), cfg, tmp_path / "cpu", calib_data=str(corpus), nsamples=4, seqlen=64,
                       batch_size=2, device="cpu")
    block_bytes = sum(p.numel() * 4 for p in tiny_llama(layers=1, vocab=VOCAB).model.layers[0].parameters())
    assert 0 < s["peak_gpu_bytes"] < 20 * block_bytes + 2**20 and s["peak_rss_bytes"] > 0
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = load(tmp_path / "gpu", device="cpu", backend="reference")(ids).logits
        b = load(tmp_path / "cpu", device="cpu", backend="reference")(ids).logits
    assert ((a - b).norm() / b.norm()).item() < 0.05


def test_not_enough_disk_is_refused_before_any_work(model_dir, corpus, tmp_path, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda _p: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError, match="GiB free but the run needs about"):
        quantize_to_folder(str(model_dir), QuantConfig(method="gptq", **CFG), tmp_path / "o", calib_data=str(corpus),
                           nsamples=4, seqlen=64, device="cpu")
    assert not (tmp_path / "o").exists()


def test_weight_only_run_resumes_without_activations(model_dir, corpus, tmp_path, monkeypatch):
    """RTN runs no calibration forward, so it saves no activations: a resume still starts after the
    last finished block."""
    from lopro.io import stream

    cfg = QuantConfig(method="rtn", bits=4, group_size=32)
    quantize_to_folder(str(model_dir), cfg, tmp_path / "ref", calib_data=str(corpus), device="cpu")
    real, calls = stream.write_tensors, {"n": 0}

    def failing(tensors, path):
        if any(".layers." in k for k in tensors):
            calls["n"] += 1
            if calls["n"] > 2:
                raise OSError(28, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(stream, "write_tensors", failing)
    with pytest.raises(OSError, match="--resume"):
        quantize_to_folder(str(model_dir), cfg, tmp_path / "out", calib_data=str(corpus), device="cpu")
    monkeypatch.setattr(stream, "write_tensors", real)
    summary = quantize_to_folder(str(model_dir), cfg, tmp_path / "out", calib_data=str(corpus), device="cpu",
                                 resume=True)
    assert summary["resumed_from_block"] == 2
    assert hashes(tmp_path / "out") == hashes(tmp_path / "ref")
