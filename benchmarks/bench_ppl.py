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
    configs += [q("gptq", 3, 64)]  # "3-bit accuracy from 2-bit weights": LoPRo W2 next to GPTQ W3
    return configs


def vq():
    configs = [FP]
    for bits in (2, 3):
        configs += [q("gptq", bits, 64), q("lopro", bits, 64, rank=16), q("gptvq", bits, 64),
                    q("lopro-v", bits, 64, rank=16)]
    return configs


def default_mode():
    """GPTQ and LoPRo as `lopro quantize` runs them by default (quantized propagation, true-sequential)."""
    return [q("gptq", 3, 64), q("gptq", 2, 64), q("lopro", 2, 64, rank=16)]


SUITES = {"foundation": foundation, "ladder": ladder, "vq": vq, "default-mode": default_mode}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("suite", choices=sorted(SUITES))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=16, help="evaluation windows per corpus")
    p.add_argument("--propagate", default="fp", choices=["fp", "quantized"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    grid = Grid(model=a.model, configs=SUITES[a.suite](), nsamples=a.nsamples, seqlen=a.seqlen,
                eval_windows=a.windows)
    out = Path(a.out or Path(__file__).parent / "results" / "smollm2")
    results = run_grid(grid, out, propagate=a.propagate, table_name=a.suite)
    table = markdown_table(results, grid)
    sys.stdout.write(table)
    (out / f"{a.suite}.json").write_text(json.dumps(
        [{"label": r["label"], "effective_bits": r["effective_bits"], "ppl": r["ppl"],
          "quant_seconds": r["quant_seconds"], "solve_seconds": r.get("solve_seconds")} for r in results],
        indent=1))


if __name__ == "__main__":
    main()
