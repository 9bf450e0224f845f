"""Nothing lost, nothing silent (issue #16): every kind of bad input or damage gets a clear error and an
exit code that says so; identical commands write identical bytes. docs/errors.md lists the kinds."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from lopro.cli import main

VOCAB = 49152


def run(capsys, *argv):
    rc = main(list(argv))
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from lopro.data.corpora import load_corpus

    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(load_corpus("wiki").split("eval")[:20_000])
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm2_path):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("model") / "tiny"
    tiny_llama(layers=2, vocab=VOCAB).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_path).save_pretrained(folder)
    return folder


def quantize_args(model_dir, corpus, out, method="gptq", *extra):
    return ["quantize", "--model", str(model_dir), "--method", method, "--bits", "3", "--group-size", "32",
            "--nsamples", "4", "--seqlen", "32", "--calib-data", str(corpus), "--device", "cpu", "--out", str(out),
            *extra]


@pytest.fixture(scope="module")
def packed(model_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "ckpt"
    assert main(quantize_args(model_dir, corpus, out)) == 0
    return out


def copy_of(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.suffix == ".safetensors" or p.name == "config.json"}


# --------------------------------------------------------------------------- flags checked before any work

@pytest.mark.parametrize("argv,needle", [
    (["quantize", "--model", "m", "--out", "o", "--seqlen", "0"], "--seqlen: must be at least 2, got 0"),
    (["quantize", "--model", "m", "--out", "o", "--nsamples", "0"], "--nsamples: must be at least 1, got 0"),
    (["quantize", "--model", "m", "--out", "o", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["quantize", "--model", "m", "--out", "o", "--seqlen", "x"], "expected an integer, got 'x'"),
    (["eval", "--model", "m", "--windows", "0"], "--windows: must be at least 1, got 0"),
    (["eval", "--model", "m", "--seqlen", "1", "--bos"], "--seqlen: must be at least 2, got 1"),
    (["generate", "--model", "m", "--prompt", "x", "--max-new-tokens", "0"], "must be at least 1"),
])
def test_numeric_flags_out_of_range_are_refused(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda_is_refused(capsys):
    for cmd in (["quantize", "--model", "m", "--out", "o"], ["eval", "--model", "m"]):
        with pytest.raises(SystemExit):
            main([*cmd, "--device", "cuda"])
        assert "CUDA is not available on this machine; use --device cpu" in capsys.readouterr().err


def test_unexpected_error_is_one_line_with_how_to_report(capsys, monkeypatch):
    import lopro.cli as cli

    def boom(a):
        raise TypeError("oops")

    monkeypatch.setattr(cli, "cmd_info", boom)
    rc, err = run(capsys, "info", "x")
    assert rc == 3 and "internal error TypeError: oops" in err and "Traceback" not in err
    rc, err = run(capsys, "-v", "info", "x")
    assert rc == 3 and "Traceback" in err


# --------------------------------------------------------------------------- the model's kind

def test_encoder_model_is_refused(tmp_path, capsys, corpus):
    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(folder)
    rc, err = run(capsys, "quantize", "--model", str(folder), "--out", str(tmp_path / "o"))
    assert rc == 2 and "not a decoder-only causal language model" in err and not (tmp_path / "o").exists()


def test_packed_checkpoint_cannot_be_requantized(packed, tmp_path, capsys, corpus):
    rc, err = run(capsys, *quantize_args(packed, corpus, tmp_path / "o"))
    assert rc == 2 and "already a packed lopro checkpoint" in err


def test_packed_tensors_without_quantization_config_are_refused(packed, tmp_path, capsys):
    bad = copy_of(packed, tmp_path / "noqc")
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["quantization_config"]
    (bad / "config.json").write_text(json.dumps(cfg))
    for cmd in (["eval", "--model", str(bad), "--windows", "1", "--seqlen", "16"],
                ["generate", "--model", str(bad), "--prompt", "hi", "--max-new-tokens", "1"]):
        rc, err = run(capsys, *cmd)
        assert rc == 2 and "holds packed tensors" in err and "no lopro quantization_config" in err


# --------------------------------------------------------------------------- integrity

def test_checksums_are_recorded_and_verified(packed, tmp_path, capsys):
    qc = json.loads((packed / "config.json").read_text())["quantization_config"]
    assert set(qc["files"]) == {p.name for p in packed.glob("*.safetensors")}
    rc, err = run(capsys, "info", str(packed), "--verify")
    assert rc == 0
    bad = copy_of(packed, tmp_path / "flipped")
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-4096:] = bytes(b ^ 0xFF for b in data[-4096:])  # 4 KB of flipped bytes, header intact
    (bad / "model.safetensors").write_bytes(bytes(data))
    rc, err = run(capsys, "info", str(bad), "--verify")
    assert rc == 2 and "model.safetensors changed since it was saved (SHA-256 mismatch)" in err
    import lopro

    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        lopro.load(bad, device="cpu", verify=True)


def _rewrite(folder: Path, edit) -> None:
    """Apply `edit` to the tensors of model.safetensors and record the new checksum (a consistent forgery)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["files"]["model.safetensors"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / "config.json").write_text(json.dumps(cfg))


def test_nan_scale_is_named(packed, tmp_path, capsys):
    bad = copy_of(packed, tmp_path / "nan")
    name = "model.layers.1.mlp.down_proj.scales"
    _rewrite(bad, lambda t: t[name].view(-1).__setitem__(0, float("nan")))
    rc, err = run(capsys, "info", str(bad), "--verify")
    assert rc == 2 and f"tensor {name} in model.safetensors holds NaN or inf" in err


def test_config_that_disagrees_with_its_modules_is_refused(packed, tmp_path, capsys):
    bad = copy_of(packed, tmp_path / "bits")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 4
    (bad / "config.json").write_text(json.dumps(cfg))
    rc, err = run(capsys, "info", str(bad), "--verify")
    assert rc == 2 and "says bits=4 but module" in err


def test_transformers_refuses_a_renamed_tensor(packed, tmp_path):
    import lopro  # noqa: F401  (registers the quantizer)
    from transformers import AutoModelForCausalLM

    bad = copy_of(packed, tmp_path / "renamed")
    _rewrite(bad, lambda t: t.__setitem__("model.norm.weight_renamed", t.pop("model.norm.weight")))
    with pytest.raises(Exception, match="model.norm.weight"):
        AutoModelForCausalLM.from_pretrained(bad)


# --------------------------------------------------------------------------- the same command, the same bytes

@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_identical_runs_write_identical_bytes(model_dir, corpus, tmp_path, method):
    for name in ("a", "b"):
        assert main(quantize_args(model_dir, corpus, tmp_path / name, method)) == 0
    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert a == b and "model.safetensors" in a and "config.json" in a


@pytest.mark.real
def test_compare_exits_nonzero_naming_the_failed_entries(tmp_path, capsys):
    rc, err = run(capsys, "compare", "--methods", "gptq,rtn", "--bits", "2", "--group-size", "4096",
                  "--tasks", "", "--windows", "1", "--nsamples", "2", "--seqlen", "32", "--out", str(tmp_path / "c"))
    assert rc == 1 and "2 of 2 entries failed" in err and "group_size 4096 is larger" in err


# --------------------------------------------------------------------------- output folders

def test_output_that_is_a_file_or_foreign_is_refused_even_with_overwrite(tmp_path, capsys, model_dir, corpus):
    f = tmp_path / "file"
    f.write_text("mine")
    rc, err = run(capsys, *quantize_args(model_dir, corpus, f, "rtn", "--overwrite"))
    assert rc == 2 and "is a file, not a folder" in err and f.read_text() == "mine"
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.jpg").write_text("x")
    rc, err = run(capsys, *quantize_args(model_dir, corpus, foreign, "rtn", "--overwrite"))
    assert rc == 2 and "replaces only folders lopro wrote" in err and "a.jpg" in err
    assert (foreign / "a.jpg").read_text() == "x"
    rc, err = run(capsys, *quantize_args(model_dir, corpus, f / "sub", "rtn"))
    assert rc == 2 and "not a writable folder" in err and f.read_text() == "mine"


def test_output_dot_is_refused(tmp_path, capsys, monkeypatch, model_dir, corpus):
    monkeypatch.chdir(tmp_path)
    rc, err = run(capsys, *quantize_args(model_dir, corpus, ".", "rtn", "--overwrite"))
    assert rc == 2 and "current folder" in err


def test_overwrite_replaces_a_lopro_checkpoint(packed, tmp_path, capsys, model_dir, corpus):
    out = copy_of(packed, tmp_path / "again")
    rc, _ = run(capsys, *quantize_args(model_dir, corpus, out, "rtn", "--overwrite"))
    assert rc == 0 and json.loads((out / "config.json").read_text())["quantization_config"]["method"] == "rtn"


def test_a_file_appearing_during_the_run_is_not_deleted(tmp_path):
    from lopro.io.atomic import check_out_folder, write_folder_atomically

    out = check_out_folder(tmp_path / "out", overwrite=False)

    def write(tmp):
        (tmp / "weights.bin").write_text("new")
        out.mkdir()
        (out / "other-run.txt").write_text("theirs")  # another writer got there first

    with pytest.raises(FileExistsError, match="changed during the run.*other-run.txt.*kept in"):
        write_folder_atomically(out, write)
    assert (out / "other-run.txt").read_text() == "theirs"
    kept = next(tmp_path.glob(".out.kept-*"))
    assert (kept / "weights.bin").read_text() == "new"


def test_stale_temporary_folders_of_dead_runs_are_removed(tmp_path):
    import os

    from lopro.io.atomic import check_out_folder

    dead = tmp_path / ".out.tmp-999999999-abc"
    mine = tmp_path / f".out.tmp-{os.getpid()}-abc"
    other = tmp_path / ".unrelated.tmp-999999999-abc"
    for p in (dead, mine, other):
        p.mkdir()
    check_out_folder(tmp_path / "out", overwrite=False)
    assert not dead.exists() and mine.exists() and other.exists()


def test_compare_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("x")
    rc, err = run(capsys, "compare", "--methods", "rtn", "--bits", "3", "--tasks", "", "--out", str(out))
    assert rc == 2 and "not a lopro compare folder" in err and (out / "todo.txt").exists()


def test_calibration_file_that_is_not_text_is_refused(tmp_path):
    from lopro.data.corpora import load_corpus

    junk = tmp_path / "random.txt"
    junk.write_bytes(bytes(torch.randint(0, 256, (20_000,), generator=torch.Generator().manual_seed(0)).tolist()))
    with pytest.raises(ValueError, match=r"random.txt is not text: only \d+% of its characters"):
        load_corpus(str(junk)).split("calib")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON object"):
        load_corpus(str(bad)).split("calib")


def test_more_inputs_named_before_work(tmp_path, capsys, model_dir, corpus, packed):
    bad = tmp_path / "badcfg"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    rc, err = run(capsys, "quantize", "--model", str(bad), "--out", str(tmp_path / "o"))
    assert rc == 2 and "config.json cannot be read as a model config" in err
    rc, err = run(capsys, *quantize_args(model_dir, corpus, tmp_path / "o", "gptq", "--stats-cache", str(tmp_path)))
    assert rc == 2 and "--stats-cache reuses the fp model's statistics, so it needs --propagate fp" in err
    notok = copy_of(packed, tmp_path / "notok")
    for p in notok.glob("tokenizer*"):
        p.unlink()
    rc, err = run(capsys, "generate", "--model", str(notok), "--prompt", "hi", "--max-new-tokens", "1")
    assert rc == 2 and "has no tokenizer files" in err
    assert not (tmp_path / "o").exists()


def test_a_solver_overflow_is_one_clear_line(tmp_path, capsys, model_dir, corpus, smollm2_path):
    from transformers import AutoTokenizer

    huge = tmp_path / "huge"
    m = tiny_llama(layers=1, vocab=VOCAB)
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight.mul_(3e37)
    m.save_pretrained(huge)
    AutoTokenizer.from_pretrained(smollm2_path).save_pretrained(huge)
    rc, err = run(capsys, *quantize_args(huge, corpus, tmp_path / "o", "gptq"))
    assert rc == 2 and "NaN" in err and "Traceback" not in err and not (tmp_path / "o").exists()


def _block0_codes(method: str, hessian_dtype: str, threads: int) -> dict[str, torch.Tensor]:
    from lopro import QuantConfig, quantize

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = tiny_llama(layers=1, hidden=512, inter=1024, vocab=256)
        ids = torch.randint(0, 256, (16, 128), generator=torch.Generator().manual_seed(0))
        got = {}
        cfg = QuantConfig(method=method, bits=3, group_size=64, rank=8, options={"hessian_dtype": hessian_dtype})
        quantize(model, cfg, ids, progress=False,
                 on_layer=lambda b, name, m, r: got.__setitem__(name, r.residual.codes.clone()))
        return got
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("hessian_dtype", ["fp32", "fp64"])
@pytest.mark.parametrize("method", ["gptq", "lopro", "lqer"])
def test_one_and_two_threads_give_the_same_block0_codes(method, hessian_dtype):
    """The inverse Hessian factor is blocked so that only matrix products see more than one thread
    (hessian.upper_inverse_factor_); LAPACK's own Cholesky differs in its last bits between thread counts,
    which moved 0.02-0.07% of these codes (benchmarks/diag_threads.py at commit 6e10ddd)."""
    one, two = _block0_codes(method, hessian_dtype, 1), _block0_codes(method, hessian_dtype, 2)
    assert one.keys() == two.keys() and len(one) == 7
    differ = {k: (one[k] != two[k]).float().mean().item() for k in one}
    assert all(v == 0 for v in differ.values()), differ
