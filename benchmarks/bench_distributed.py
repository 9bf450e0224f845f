"""One quantization on several processes (torch.distributed, gloo on CPU) against one process.

    python benchmarks/bench_distributed.py [--nsamples 16] [--seqlen 512] [--configs gptq:3:64,lopro:2:64] [--blocks N]

For each configuration: `lopro quantize` on SmolLM2 in one process with one thread, then the same command
under `torchrun --nproc-per-node 2` with one thread per process, alternated, `--rounds` times. Prints a
table (median wall seconds, speed-up, the pipeline's own breakdown: forwards, solves, propagation,
communication) and whether the checkpoints are byte-identical (codes, then every tensor); when they are
not, both perplexities. JSON: benchmarks/results/distributed/bench_distributed.json (rewritten as it goes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_speed import cut_model  # noqa: E402  (SmolLM2 cut to N blocks, saved as a folder)


def tensors_equal(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    codes = [k for k in ta if k.endswith((".qweight", ".qzeros"))]
    differ = sorted(k for k in ta if not (ta[k].shape == tb[k].shape and bool((ta[k] == tb[k]).all())))
    return {"files_identical": hashlib.sha256((a / "model.safetensors").read_bytes()).digest()
            == hashlib.sha256((b / "model.safetensors").read_bytes()).digest(),
            "codes_identical": not any(k in differ for k in codes), "tensors_differing": differ[:20],
            "n_tensors_differing": len(differ)}


def run(cmd: list[str], env: dict, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    s = json.loads((out / "report.json").read_text())["summary"]
    return {"wall_s": wall, "quant_s": s["quant_seconds"], "profile": s["profile_seconds"],
            "communication_s": s.get("communication_seconds", 0.0), "processes": s.get("processes", 1)}


def ppl(folder: Path, env: dict) -> float:
    p = subprocess.run([sys.executable, "-m", "lopro", "eval", "--model", str(folder), "--windows", "16",
                        "--device", "cpu", "--json"], env=env, capture_output=True, text=True, check=True)
    return json.loads(p.stdout)["ppl"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="gptq:3:64,lopro:2:64")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=0, help="SmolLM2 cut to its first N blocks (0: all 30)")
    ap.add_argument("--option", action="append", default=[], help="passed to lopro quantize, e.g. hessian_dtype=fp64")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/distributed/bench_distributed.json"))
    a = ap.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    scratch = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    results = {"nsamples": a.nsamples, "seqlen": a.seqlen, "procs": a.procs, "threads_per_process": 1,
               "options": a.option, "rows": []}
    try:
        model = "smollm2-135m" if not a.blocks else str(cut_model(scratch, a.blocks))
        results["blocks"] = a.blocks or 30
        for item in a.configs.split(","):
            method, bits, gs = item.split(":")
            base = ["quantize", "--model", model, "--method", method, "--bits", bits, "--group-size", gs,
                    "--rank", "16", "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--device", "cpu",
                    *[x for o in a.option for x in ("--option", o)]]
            one, many = scratch / f"{item}-1", scratch / f"{item}-{a.procs}"
            cmds = {1: ([sys.executable, "-m", "lopro", *base, "--out", str(one)], one),
                    a.procs: ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc-per-node={a.procs}", "-m", "lopro", *base, "--out", str(many)], many)}
            timings = {k: [] for k in cmds}
            for _ in range(a.rounds):
                for k, (cmd, out) in cmds.items():
                    timings[k].append(run(cmd, env, out))
            row = {"config": item, "options": a.option, "runs": timings, **tensors_equal(one, many)}
            med = {k: statistics.median(t["wall_s"] for t in v) for k, v in timings.items()}
            row["median_wall_s"] = med
            row["speedup"] = med[1] / med[a.procs]
            if not row["files_identical"]:
                row["ppl"] = {1: ppl(one, env), a.procs: ppl(many, env)}
            results["rows"].append(row)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(results, indent=1, default=str))
            p1, pn = timings[1][-1]["profile"], timings[a.procs][-1]["profile"]
            print(f"{item:14s} 1 proc {med[1]:7.1f} s | {a.procs} procs {med[a.procs]:7.1f} s | speed-up "
                  f"{row['speedup']:.2f}x | forwards {p1['forwards_s']:.0f}->{pn['forwards_s']:.0f} s, solves "
                  f"{p1['solve_s']:.0f}->{pn['solve_s']:.0f} s, propagation {p1['propagate_s']:.0f}->"
                  f"{pn['propagate_s']:.0f} s, communication {timings[a.procs][-1]['communication_s']:.1f} s | "
                  f"files identical {row['files_identical']}, codes identical {row['codes_identical']}"
                  + (f", ppl {row['ppl'][1]:.3f} vs {row['ppl'][a.procs]:.3f}" if "ppl" in row else ""), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
