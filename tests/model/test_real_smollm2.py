"""What users run, on the real SmolLM2 cut to two blocks and a few windows."""
import pytest
import torch
from torch import nn

from lopro import QuantConfig, quantize
from lopro.data.windows import calibration_windows, eval_windows, tokenize_split
from lopro.eval.perplexity import perplexity

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    model.model.layers = nn.ModuleList(model.model.layers[:2])
    model.config.num_hidden_layers = 2
    calib = calibration_windows(tokenize_split(tok, "wiki", "calib"), 16, 256, seed=0)
    windows = eval_windows(tokenize_split(tok, "wiki", "eval"), 256, 4)
    return model, tok, calib, windows


def test_corpora_splits_do_not_overlap():
    from lopro.data.corpora import load_corpus

    for name in ("wiki", "news"):
        c = load_corpus(name)
        calib, ev = c.split("calib"), c.split("eval")
        assert len(ev) > 10_000 and len(calib) > len(ev) // 2
        probe = ev[1000:1200]
        assert probe not in calib


def hidden_error(model, ref, windows) -> float:
    """Relative error of the last block's output on held-out text (a cut model has no meaningful ppl)."""
    with torch.no_grad():
        a = model.model(windows).last_hidden_state
        b = ref.model(windows).last_hidden_state
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("method", ["gptq", "lopro"])
def test_two_blocks_quantize_and_evaluate(smollm2, method):
    import copy

    model, _tok, calib, windows = smollm2
    rtn, rtn_report = quantize(copy.deepcopy(model), QuantConfig(method="rtn", bits=3, group_size=64), calib,
                               progress=False)
    got, report = quantize(copy.deepcopy(model), QuantConfig(method=method, bits=3, group_size=64), calib,
                           progress=False)
    assert len(report.layers) == 14 and report.summary["calibration"]["nsamples"] == 16
    loss = sum(r["proxy_loss"] for r in report.layers)
    assert loss < sum(r["proxy_loss"] for r in rtn_report.layers)
    err, err_rtn = hidden_error(got, model, windows), hidden_error(rtn, model, windows)
    assert 0 < err < err_rtn and err < 0.5, (err, err_rtn)
    assert torch.isfinite(torch.tensor(perplexity(got, windows)["ppl"]))
