"""Method options are typed: refused when unknown or ill-typed before any model is loaded, and what a
layer costs is counted by lopro.formats alone (report, checkpoint, `lopro info`, bits budget)."""
from __future__ import annotations

import pytest
import torch

from conftest import random_hessian, tiny_llama
from lopro import QuantConfig, formats, quantize, save
from lopro.cli import main
from lopro.io.checkpoint import checkpoint_info
from lopro.methods import LayerStats, available_methods, get_method
from lopro.methods.rank import base_bits


@pytest.mark.parametrize("options,needle", [
    ({"blc": True}, "unknown option blc for method 'lopro'; allowed: bits_budget"),
    ({"hessian_dtype": "fp99"}, "option hessian_dtype='fp99' of method 'lopro': must be one of ['fp32', 'fp64']"),
    ({"max_rank": "many"}, "option max_rank='many' of method 'lopro': expected int"),
    ({"max_rank": -1}, "must be >= 0"),
    ({"rank_mode": "auto", "bits_budget": -2.0}, "bits_budget must be positive"),
])
def test_bad_options_are_refused_when_the_config_is_built(options, needle):
    with pytest.raises(ValueError) as e:
        QuantConfig(method="lopro", bits=3, options=options)
    assert needle in str(e.value)


def test_vq_settings_are_checked_up_front():
    with pytest.raises(ValueError, match="too big"):
        QuantConfig(method="lopro-v", bits=4, options={"vq_dim": 4})
    with pytest.raises(ValueError, match="unknown option vq_dim for method 'gptq'"):
        QuantConfig(method="gptq", options={"vq_dim": 2})


def test_every_method_describes_itself():
    for name in available_methods():
        spec = get_method(name)
        assert spec.name == name and spec.residual in formats.RESIDUALS and spec.doc
        cfg = QuantConfig(method=name)  # defaults are valid for every method
        assert len(cfg.method_options) == len(spec.options)
    assert not get_method("rtn").needs_calibration and get_method("gptq").needs_calibration
    assert get_method("lopro").stores_permutation and not get_method("lqer").stores_permutation


def test_cli_refuses_an_unknown_option_before_loading_the_model(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["quantize", "--model", str(tmp_path / "no-model-here"), "--method", "gptq",
               "--option", "blc=true", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown option blc for method 'gptq'" in err and "no-model-here" not in err
    assert not out.exists()


@pytest.mark.parametrize("method", ["lopro", "lopro-v"])
def test_bits_budget_is_priced_like_the_checkpoint(method):
    """The rank cap uses the bits the packed layer will store: lopro-v's GPTVQ indices and codebooks
    and its permutation, from the same table that counts the checkpoint."""
    m, n = 48, 128
    torch.manual_seed(0)
    W = torch.randn(m, n)
    stats = LayerStats(H=random_hessian(n), absmean=torch.rand(n) + 0.1, tokens=256)
    extra = {"vq_kmeans_iters": 2} if method == "lopro-v" else {}

    def config(budget):
        return QuantConfig(method=method, bits=2, group_size=32, block_identity=32, block_hadamard=32,
                           options={"bits_budget": budget, **extra})

    per_rank = formats.lowrank_bits(m, n, 1, "fp8")
    budget = (base_bits(m, n, config(8.0)) + 3.5 * per_rank) / (m * n)  # room for 3 ranks, not 4
    res = get_method(method)(W, stats, config(budget))
    assert res.lowrank.rank == 3 and res.effective_bits() <= budget
    assert res.total_bits == base_bits(m, n, config(budget)) + 3 * per_rank  # the plan is what is stored


@pytest.mark.parametrize("method", ["gptq", "lopro", "lopro-v", "flrq"])
def test_report_checkpoint_and_info_agree_on_effective_bits(tmp_path, method):
    model = tiny_llama()
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(method=method, bits=3, group_size=32, rank=4, block_identity=32, block_hadamard=32,
                      options={"vq_kmeans_iters": 2} if get_method(method).residual == "vq" else {})
    model, report = quantize(model, cfg, ids, pack=True, progress=False)
    qc = save(model, tmp_path / "ckpt", config=cfg, report=report)
    info = checkpoint_info(tmp_path / "ckpt")
    assert report.summary["effective_bits"] == pytest.approx(qc["effective_bits"], rel=1e-12)
    assert info["effective_bits"] == pytest.approx(qc["effective_bits"], rel=1e-12)
