"""Perplexity benchmarks on SmolLM2 (issue 2's RTN/GPTQ table, issue 8's LoPRo ablation ladder).

Every configuration runs through `lopro.compare.run_grid`: the fp model's per-layer statistics
(128 x 512 calibration tokens from `wiki`) are computed once and shared (propagate="fp"), each
configuration is quantized and evaluated on the `wiki` and `news` evaluation splits, and finished
entries are cached in benchmarks/results/smollm2/results.json (shared by the suites, so a
configuration that two suites need runs once), so a rerun only adds what is missing.

    python benchmarks/bench_ppl.py foundation
    python benchmarks/bench_ppl.py ladder
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from lopro import QuantConfig
from lopro.compare import FP, Grid, markdown_table, run_grid


def q(method, bits, group_size, **kw) -> QuantConfig:
    return QuantConfig(method=method, bits=bits, group_size=group_size, **kw)


def foundation():
    configs = [FP]
    for bits, g in ((4, -1), (3, 64), (2, 64)):
        configs += [q("rtn", bits, g), q("gptq", bits, g)]
    return configs


LADDER = ("gptq", "lowrank-rtn", "lowrank-gptq", "lowrank-gptq-hadamard", "lopro", "lqer")


def ladder():
    configs = [FP]
    for bits in (2, 3):
        configs += [q(m, bits, 64, rank=16, rank_dtype="fp8") for m in LADDER]
        # equal-effective-bits neighbours: rank 16 fp8 costs ~0.5 bits on 576-wide layers
        configs += [q("gptq", bits, 32)]
    # "3-bit accuracy from 2-bit weights": LoPRo W2 is read against the W3 gptq row above
    return configs


# GPTVQ with smaller codebook groups, at about lopro-v's effective bits (its rank 16 costs ~0.4 bits):
# 16 codewords x 2 x 8 bits per 512 weights = +0.5 bits at 2 bits, 64 x 2 x 8 per 2048 at 3 bits
VQ_EQUAL_BITS = {2: 512, 3: 2048}


def vq():
    configs = [FP]
    for bits in (2, 3):
        configs += [q("gptq", bits, 64), q("lopro", bits, 64, rank=16), q("gptvq", bits, 64),
                    q("lopro-v", bits, 64, rank=16),
                    q("gptvq", bits, 64, options={"vq_group_size": VQ_EQUAL_BITS[bits]})]
    return configs


def default_mode():
    """GPTQ and LoPRo as `lopro quantize` runs them by default (quantized propagation, true-sequential)."""
    return [q("gptq", 3, 64), q("gptq", 2, 64), q("lopro", 2, 64, rank=16)]


def merged_results(grid: Grid, root: Path, propagate: str) -> list[dict]:
    """The suite's entries, found in any results folder under `root` (same keys as run_grid)."""
    from lopro.compare import entry_key
    from lopro.data.windows import calibration_windows, fingerprint, tokenize_split
    from lopro.io.loading import load_tokenizer

    tok, _ = load_tokenizer(grid.model)
    sha = fingerprint(calibration_windows(tokenize_split(tok, grid.calib_data, "calib"), grid.nsamples,
                                          grid.seqlen, grid.seed))
    entries = {}
    for path in root.glob("smollm2*/results.json"):
        entries.update(json.loads(path.read_text())["entries"])
    out = []
    for cfg in grid.configs:
        d = {"method": FP} if cfg == FP else {**cfg.to_dict(), "propagate": propagate}
        key = entry_key(grid, d, sha)
        if key in entries:
            out.append(entries[key])
    return out


def ladder_default():
    """The ladder in the order to run it in the default mode (~12-20 min a row on a 2-core CPU): the
    rows the paper's ordering is read from first, then the equal-bits neighbours, then the rest."""
    r = dict(rank=16, rank_dtype="fp8")
    return [q("gptq", 2, 64), q("lopro", 2, 64, **r), q("lowrank-gptq", 2, 64, **r), q("lopro", 3, 64, **r),
            q("lowrank-gptq", 3, 64, **r), q("gptq", 2, 32), q("gptq", 3, 32), q("lqer", 2, 64, **r),
            q("lowrank-gptq-hadamard", 2, 64, **r), q("lowrank-rtn", 2, 64, **r), q("lqer", 3, 64, **r),
            q("lowrank-gptq-hadamard", 3, 64, **r), q("lowrank-rtn", 3, 64, **r), q("gptq", 4, -1)]


def forwards():
    """Issue 15's trade-offs, run with --propagate quantized --nsamples 32 (the README table's setting): the
    calibration and propagation forwards in fp32 or bf16 (autocast), true-sequential or llm-compressor's
    two passes per block (every layer calibrated at once, then one propagation)."""
    configs = []
    for method, bits in (("gptq", 3), ("lopro", 2), ("lopro", 3)):
        r = {"rank": 16} if method == "lopro" else {}
        for fwd in ("fp32", "bf16"):
            configs.append(q(method, bits, 64, **r, options={"forward_dtype": fwd}))
        configs.append(q(method, bits, 64, **r, true_sequential=False, options={"forward_dtype": "bf16"}))
    return configs


def spread():
    """Issue 16's spread over calibration seeds and thread counts, default settings (run once per --threads)."""
    return [q("gptq", 3, 64), q("lopro", 2, 64, rank=16), q("lopro", 3, 64, rank=16)]


SUITES = {"foundation": foundation, "forwards": forwards, "spread": spread, "ladder": ladder, "vq": vq, "default-mode": default_mode,
          "ladder-default": ladder_default}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("suite", choices=sorted(SUITES))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=16, help="evaluation windows per corpus (0 = the whole split)")
    p.add_argument("--propagate", default="fp", choices=["fp", "quantized"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="run every N-th configuration from the K-th (0-based) in its own results folder, "
                        "so N processes can share the machine; --table merges them")
    p.add_argument("--skip-suite", default=None, help="leave out the configurations of this suite")
    p.add_argument("--table", action="store_true", help="print the suite's table from all result folders")
    p.add_argument("--seeds", default=None, help="comma list: run the suite per calibration seed, report the spread")
    p.add_argument("--grid-threads", type=int, default=None,
                   help="threads recorded in each entry's key (a 1-thread entry is not a 2-thread one)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    configs = SUITES[a.suite]()
    if a.skip_suite:
        skip = SUITES[a.skip_suite]()
        configs = [c for c in configs if c not in skip]
    if a.shard:
        k, n = (int(x) for x in a.shard.split("/"))
        configs = configs[k::n]
    grid = Grid(model=a.model, configs=configs, nsamples=a.nsamples, seqlen=a.seqlen, eval_windows=a.windows or None,
                threads=a.grid_threads)
    root = Path(__file__).parent / "results"
    out = Path(a.out or root / ("smollm2" + (f"-shard{a.shard.replace('/', 'of')}" if a.shard else "")))
    if a.seeds:  # the spread over calibration seeds (lopro compare --seeds)
        from lopro.compare import run_seeds, spread_table

        _, rows = run_seeds(grid, [int(x) for x in a.seeds.split(",")], out, propagate=a.propagate)
        table = spread_table(rows, grid)
        sys.stdout.write(table)
        name = f"{a.suite}-seeds" + (f"-threads{a.grid_threads}" if a.grid_threads else "")
        (out / f"{name}.md").write_text(table)
        (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
        return
    if a.table:
        results = merged_results(grid, root, a.propagate)
    else:
        results = run_grid(grid, out, propagate=a.propagate, table_name=a.suite)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results, grid)
    sys.stdout.write(table)
    (out / f"{a.suite}.json").write_text(json.dumps(
        [{"label": r["label"], "effective_bits": r["effective_bits"], "ppl": r["ppl"],
          "quant_seconds": r["quant_seconds"], "solve_seconds": r.get("solve_seconds")} for r in results],
        indent=1))


if __name__ == "__main__":
    main()
