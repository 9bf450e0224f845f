"""The comparison cache: keys are stable, finished entries survive failures and reruns."""
from lopro import QuantConfig
from lopro.compare import FP, Grid, ResultStore, entry_key, label_of, markdown_table


def test_entry_key_depends_on_config_calibration_and_eval():
    g = Grid(configs=[])
    d = {**QuantConfig(method="lopro", bits=2, group_size=64).to_dict(), "propagate": "fp"}
    k = entry_key(g, d, "abc")
    assert k == entry_key(Grid(configs=[]), dict(d), "abc")
    assert k != entry_key(g, {**d, "bits": 3}, "abc")
    assert k != entry_key(g, d, "abd")
    assert k != entry_key(Grid(configs=[], eval_windows=8), d, "abc")
    assert entry_key(g, {"method": FP}, "x") == entry_key(g, {"method": FP}, "y")  # fp needs no calibration


def test_failure_never_replaces_a_finished_entry(tmp_path):
    store = ResultStore(tmp_path)
    store.put("k1", {"label": "gptq W2 g64", "ppl": {"wiki": 10.0}})
    store.fail("k1", "gptq W2 g64", "RuntimeError: boom")
    again = ResultStore(tmp_path)  # reloaded from disk, as a rerun would
    assert again.done("k1") and again.data["entries"]["k1"]["ppl"]["wiki"] == 10.0
    again.fail("k2", "lopro W2", "ValueError: bad")
    assert not again.done("k2") and "k2" in ResultStore(tmp_path).data["failures"]


def test_labels_and_table():
    cfg = QuantConfig(method="lopro", bits=2, group_size=64, rank=16).to_dict()
    assert label_of(cfg) == "lopro W2 g64 r16"
    assert label_of({"method": FP}) == "fp"
    rows = [{"label": "fp", "config": {"method": FP}, "effective_bits": 16.0, "ppl": {"wiki": 22.9},
             "quant_seconds": 0.0},
            {"label": "lopro W2 g64 r16", "config": cfg, "effective_bits": 2.695, "ppl": {"wiki": 99.5},
             "quant_seconds": 12.0, "peak_memory_bytes": 2 ** 30}]
    table = markdown_table(rows, Grid(configs=[], eval_data=("wiki",)))
    assert "| lopro W2 g64 r16 | 2 | 2.695 | 99.50 |" in table and "| fp | 16 | 16.000 | 22.90 |" in table
