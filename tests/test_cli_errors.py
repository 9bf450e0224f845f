"""Bad input stops with a clear error, before anything is written."""

import pytest
import torch

from lopro.cli import main


def run(capsys, *argv):
    """(exit code, stderr text): the CLI logs its errors to stderr."""
    rc = main(list(argv))
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--model", "smollm2-135m", "--bits", "9"], "bits must be an integer in [2, 8]"),
    (["--model", "smollm2-135m", "--bits", "1"], "bits must be an integer in [2, 8]"),
    (["--model", "smollm2-135m", "--method", "magic"], "unknown method 'magic'"),
    (["--model", "smollm2-135m", "--calib-data", "nonexistent.txt"], "unknown corpus"),
])
def test_quantize_refuses_bad_input(tmp_path, capsys, argv, needle):
    out = tmp_path / "out"
    rc, err = run(capsys, "quantize", *argv, "--out", str(out))
    assert rc == 2
    assert needle in err
    assert not out.exists()


def test_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    rc, err = run(capsys, "quantize", "--model", str(tmp_path / "junk"), "--out", str(tmp_path / "o"))
    assert rc == 2 and "has no config.json" in err and not (tmp_path / "o").exists()


@pytest.mark.real
def test_group_size_larger_than_width_and_short_corpus(tmp_path, capsys, smollm2_path):
    rc, err = run(capsys, "quantize", "--model", "smollm2-135m", "--group-size", "4096", "--out", str(tmp_path / "a"))
    assert rc == 2 and "group_size 4096 is larger than the input width 576" in err
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.\n\nAnd a few more.")
    rc, err = run(capsys, "quantize", "--model", "smollm2-135m", "--calib-data", str(short), "--seqlen", "64",
                "--out", str(tmp_path / "b"))
    assert rc == 2 and "fewer than one window of 64" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc, err = run(capsys, "quantize", "--model", "smollm2-135m", "--out", str(out))
    assert rc == 2 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"


def test_nan_weights_are_refused():
    from conftest import tiny_llama
    from lopro import QuantConfig, quantize

    model = tiny_llama()
    model.model.layers[0].self_attn.q_proj.weight.data[3, 3] = float("nan")
    with pytest.raises(ValueError, match="q_proj.weight contains NaN"):
        quantize(model, QuantConfig(group_size=16), torch.zeros(2, 8, dtype=torch.long), progress=False)


def test_methods_lists_the_registry(capsys):
    assert main(["methods"]) == 0
    listed = set(capsys.readouterr().out.split())
    assert {"rtn", "gptq", "lopro", "lqer", "gptvq", "lopro-v", "flrq"} <= listed
