"""Quantization cost of the methods side by side, in one run (issue 8: LoPRo <= 1.2x GPTQ; issue 5:
LoPRo_v <= 2x LoPRo).

SmolLM2 cut to its first ``--blocks`` blocks (every block has the same shapes, so the ratios are
the whole model's), the 128 x 512 `wiki` calibration (seed 0), the default pipeline (quantized
propagation, true-sequential). Every repeat runs each method once, in a rotated order so that no
method always runs first or last on a machine whose load drifts; the table gives medians and the
ratio of medians to GPTQ's. ``quant s`` is the whole `quantize` call (calibration forwards,
Hessians, solves); ``solve s`` the per-layer methods alone.

    python benchmarks/bench_cost.py --blocks 4 --bits 2 --repeats 3 --threads 2
    python benchmarks/bench_cost.py --table          # reprint the last run's table
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lopro import QuantConfig, quantize
from lopro.data.windows import calibration_windows, fingerprint, tokenize_split
from lopro.io.loading import load_model


def cut(model, blocks: int):
    model.model.layers = nn.ModuleList(model.model.layers[:blocks])
    model.config.num_hidden_layers = blocks
    return model


def run(a) -> dict:
    model, tok, _ = load_model(a.model, device=a.device or "cpu")
    model = cut(model, a.blocks)
    calib = calibration_windows(tokenize_split(tok, "wiki", "calib"), a.nsamples, a.seqlen, 0)
    methods = a.methods.split(",")
    times: dict[str, list] = {m: [] for m in methods}
    solves: dict[str, list] = {m: [] for m in methods}
    bits: dict[str, float] = {}
    for rep in range(a.repeats):
        order = methods[rep % len(methods):] + methods[:rep % len(methods)]
        for m in order:
            cfg = QuantConfig(method=m, bits=a.bits, group_size=a.group_size, rank=a.rank)
            work = copy.deepcopy(model)
            t0 = time.perf_counter()
            _, report = quantize(work, cfg, calib, device=a.device, progress=False)
            times[m].append(time.perf_counter() - t0)
            solves[m].append(report.summary["solve_seconds"])
            bits[m] = report.summary["effective_bits"]
            logging.info("repeat %d %s: %.1f s (solve %.1f s)", rep, m, times[m][-1], solves[m][-1])
    rows = [{"method": m, "bits": a.bits, "effective_bits": bits[m], "quant_s": statistics.median(times[m]),
             "solve_s": statistics.median(solves[m]), "runs": times[m]} for m in methods]
    return {"model": a.model, "blocks": a.blocks, "calibration": [a.nsamples, a.seqlen], "group_size": a.group_size,
            "rank": a.rank, "repeats": a.repeats, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "calib_sha256": fingerprint(calib), "rows": rows}


def table(res: dict) -> str:
    """Ratios of medians to the first row and to the row above (e.g. lopro-v / lopro)."""
    rows = res["rows"]
    lines = [f"SmolLM2 first {res['blocks']} blocks, calibration {res['calibration'][0]} x {res['calibration'][1]}, "
             f"W{rows[0]['bits']} g{res['group_size']} rank {res['rank']}, {res['repeats']} repeats, "
             f"{res['threads']} threads; medians, ratios of medians.\n",
             f"| method | eff. bits | quant s | / {rows[0]['method']} | / row above | solve s | solve / "
             f"{rows[0]['method']} | solve / row above |", "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        prev = rows[max(i - 1, 0)]
        lines.append(f"| {r['method']} | {r['effective_bits']:.3f} | {r['quant_s']:.1f} | "
                     f"{r['quant_s'] / rows[0]['quant_s']:.2f} | {r['quant_s'] / prev['quant_s']:.2f} | "
                     f"{r['solve_s']:.1f} | {r['solve_s'] / rows[0]['solve_s']:.2f} | "
                     f"{r['solve_s'] / prev['solve_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--methods", default="gptq,lopro,lopro-v", help="the first is the reference of the ratios")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "cost.json"))
    p.add_argument("--table", action="store_true", help="print the table of an earlier run's --out JSON")
    a = p.parse_args(argv)
    if a.table:
        sys.stdout.write(table(json.loads(Path(a.out).read_text())))
        return
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lopro.pipeline.run").setLevel(logging.WARNING)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = run(a)
    sys.stdout.write(table(res))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
