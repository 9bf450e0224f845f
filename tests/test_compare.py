"""The comparison cache: keys are stable, finished entries survive failures and reruns."""
import pytest

from lopro import QuantConfig
from lopro.compare import FP, Grid, ResultStore, entry_key, label_of, markdown_table, write_table


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


def test_two_processes_sharing_a_folder_keep_each_others_entries(tmp_path):
    a, b = ResultStore(tmp_path), ResultStore(tmp_path)  # both loaded before either wrote
    a.put("k1", {"label": "gptq W2 g64"})
    b.put("k2", {"label": "lopro W2 g64 r16"})
    b.fail("k1", "gptq W2 g64", "RuntimeError: late failure elsewhere")
    on_disk = ResultStore(tmp_path).data
    assert set(on_disk["entries"]) == {"k1", "k2"} and "k1" not in on_disk["failures"]
    assert b.done("k1")  # sees the other process's finished entry, so it will not recompute it


def _entry(method, bits, eff, ppl, acc):
    cfg = {"method": FP} if method == FP else QuantConfig(method=method, bits=bits, group_size=64).to_dict()
    zs = {"piqa": {"acc": acc, "acc_stderr": 0.05}, "arc_easy": {"acc": acc, "acc_stderr": 0.05}, "average": acc}
    return {"label": label_of(cfg), "config": cfg, "effective_bits": eff, "ppl": {"wiki": ppl},
            "quant_seconds": 1.0, "zeroshot": zs}


def test_table_shows_accuracy_with_its_standard_error_and_the_subset_size():
    grid = Grid(configs=[], eval_data=("wiki",), tasks=("piqa", "arc_easy"), task_limit=100)
    table = markdown_table([_entry("gptq", 2, 2.3, 900.0, 0.4)], grid)
    assert "| 40.0 | 40.0 | 40.0 ± 3.5 |" in table  # sqrt(2 * 0.05^2) / 2 = 0.035
    assert "100 examples per task" in table


def test_plots_of_perplexity_and_accuracy_against_effective_bits(tmp_path):
    pytest.importorskip("matplotlib")
    grid = Grid(configs=[], eval_data=("wiki",), tasks=("piqa", "arc_easy"), task_limit=100)
    rows = [_entry(FP, 16, 16.0, 22.9, 0.6), _entry("gptq", 2, 2.3, 900.0, 0.4), _entry("gptq", 3, 3.3, 60.0, 0.5),
            _entry("lopro", 2, 2.7, 100.0, 0.5)]
    write_table(rows, grid, tmp_path, "t")
    assert "| lopro W2 g64 r16 |" in (tmp_path / "t.md").read_text()
    for name in ("t_ppl_wiki.png", "t_acc.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_compare_cli_defaults_score_the_five_tasks_on_a_seeded_subset():
    from lopro.cli import _grid_from_args, build_parser

    a = build_parser().parse_args(["compare", "--methods", "fp,gptq", "--bits", "2,3"])
    grid = _grid_from_args(a)
    assert grid.tasks == ("piqa", "arc_easy", "arc_challenge", "winogrande", "hellaswag")
    assert grid.task_limit == 100 and len(grid.configs) == 3
    whole = _grid_from_args(build_parser().parse_args(["compare", "--limit", "0", "--tasks", ""]))
    assert whole.task_limit is None and whole.tasks == ()


def test_threads_enter_the_key_only_when_set():
    d = {**QuantConfig(method="gptq", bits=3, group_size=64).to_dict(), "propagate": "quantized"}
    plain = entry_key(Grid(configs=[]), d, "abc")
    assert plain == entry_key(Grid(configs=[], threads=None), d, "abc")  # entries cached before stay found
    assert len({plain, entry_key(Grid(configs=[], threads=1), d, "abc"),
                entry_key(Grid(configs=[], threads=2), d, "abc")}) == 3
    two_pass = {**d, "true_sequential": False, "options": {"forward_dtype": "bf16"}}
    assert label_of(two_pass) == "gptq W3 g64 two-pass forward_dtype=bf16"


def test_seeds_run_the_grid_once_per_seed_and_report_the_spread(monkeypatch, tmp_path):
    from lopro import compare

    seen = []

    def fake_run_grid(grid, out_dir, propagate, progress, table_name):
        seen.append((grid.seed, [c if c == FP else c.seed for c in grid.configs], table_name))
        res = compare.GridResults(
            {"label": label_of({"method": FP} if c == FP else c.to_dict()), "effective_bits": 3.3,
             "ppl": {"wiki": 20.0 if c == FP else 60.0 + grid.seed}, "quant_seconds": 1.0} for c in grid.configs)
        res.failures = [{"label": "x", "error": "boom"}] if grid.seed == 2 else []
        return res

    monkeypatch.setattr(compare, "run_grid", fake_run_grid)
    grid = Grid(configs=[FP, QuantConfig(method="gptq", bits=3, group_size=64)], eval_data=("wiki",))
    results, rows = compare.run_seeds(grid, [0, 1, 2], tmp_path)
    assert seen == [(0, [FP, 0], "results-seed0"), (1, [FP, 1], "results-seed1"), (2, [FP, 2], "results-seed2")]
    assert len(results) == 6 and results.failures == [{"label": "x", "error": "boom"}]
    by = {r["label"]: r for r in rows}
    assert by["fp"]["ppl"]["wiki"]["std"] == 0.0
    g = by["gptq W3 g64"]["ppl"]["wiki"]
    assert (g["mean"], g["std"], g["min"], g["max"]) == (61.0, 1.0, 60.0, 62.0) and g["values"] == [60.0, 61.0, 62.0]
    table = compare.spread_table(rows, grid)
    assert "| gptq W3 g64 | 3.300 | 0,1,2 | 61.00 ± 1.00 (60.00-62.00) | 1 |" in table


def test_compare_refuses_bad_seeds_and_options_before_work(tmp_path):
    from lopro.cli import main

    assert main(["compare", "--methods", "gptq", "--seeds", "0,x", "--out", str(tmp_path / "a")]) == 2
    assert main(["compare", "--methods", "gptq", "--seeds", "1,1", "--out", str(tmp_path / "b")]) == 2
    assert main(["compare", "--methods", "gptq", "--option", "forward_dtype=fp16", "--out", str(tmp_path / "c")]) == 2
    assert not any(tmp_path.iterdir())
