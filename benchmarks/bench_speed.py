"""Quantization time side by side: lopro's GPTQ against llm-compressor's, LoPRo against lopro's GPTQ, LoPRo_v
against LoPRo; same model (SmolLM2 cut to its first --blocks blocks, fp32), same calibration windows, same
thread count, each job in its own process, the jobs alternated round by round so drift hits all alike.

    python -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 && \\
        /tmp/llmc/bin/pip install llmcompressor==0.14.0.1 torch==2.13.0   # not a dependency of lopro
    python benchmarks/bench_speed.py --llmc-python /tmp/llmc/bin/python --rounds 3

Quantization time is the seconds inside `lopro.quantize(..., pack=True)` (capture, forwards, Hessians, solves,
propagation, packing) and inside llm-compressor's `oneshot()` (sequential pipeline, the same steps). Prints a
table of medians and ratios; writes JSON to benchmarks/results/speed/speed.json after every job.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lopro.device import has_native_bf16

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

# name -> QuantConfig fields (group size from --group-size); "gptq-w3" is compared with llm-compressor's GPTQ W3
LOPRO_JOBS = {
    "gptq-w3": {"method": "gptq", "bits": 3},
    "gptq-w2": {"method": "gptq", "bits": 2},
    "lopro-w2": {"method": "lopro", "bits": 2, "rank": 16},
    "lopro-v-w2": {"method": "lopro-v", "bits": 2, "rank": 16},
    "gptq-w3-fp32": {"method": "gptq", "bits": 3, "options": {"forward_dtype": "fp32"}},
    "gptq-w3-two-pass": {"method": "gptq", "bits": 3, "true_sequential": False},
    "gptq-w3-h64": {"method": "gptq", "bits": 3, "options": {"hessian_dtype": "fp64"}},
}
RATIOS = [  # (numerator, denominator, the limit)
    ("gptq-w3", "llmc-gptq-w3", 0.8),
    ("lopro-w2", "gptq-w2", 1.10),
    ("lopro-v-w2", "lopro-w2", 1.5),
    ("gptq-w3-fp32", "llmc-gptq-w3", None),
    ("gptq-w3-fp32", "gptq-w3", None),
    ("gptq-w3-two-pass", "gptq-w3", None),
    ("gptq-w3-h64", "gptq-w3", None),
]


def cut_model(work: Path, blocks: int) -> Path:
    """SmolLM2's first `blocks` blocks saved as an fp32 folder (bench_distributed uses it too)."""
    from lopro.io.loading import load_model

    model, tok, _ = load_model("smollm2-135m", device="cpu")
    model.model.layers = model.model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    folder = work / f"smollm2-{blocks}blocks"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def prepare(work: Path, blocks: int, nsamples: int, seqlen: int, seed: int) -> tuple[Path, Path]:
    """SmolLM2's first `blocks` blocks saved as an fp32 folder, and the calibration windows as a tensor."""
    from lopro.data.windows import calibration_windows, tokenize_split
    from lopro.io.loading import load_tokenizer

    folder = cut_model(work, blocks)
    tok, _ = load_tokenizer(str(folder))
    calib = calibration_windows(tokenize_split(tok, "wiki", "calib"), nsamples, seqlen, seed)
    torch.save(calib, work / "calib.pt")
    return folder, work / "calib.pt"


def lopro_job(name: str, folder: str, calib_path: str, group: int, batch: int, threads: int) -> dict:
    """One lopro run in this process (called by the child)."""
    torch.set_num_threads(threads)
    from lopro import QuantConfig, quantize
    from lopro.io.loading import load_model

    model, _, _ = load_model(folder, device="cpu")
    calib = torch.load(calib_path)
    cfg = QuantConfig(group_size=group, **LOPRO_JOBS[name])
    t0 = time.perf_counter()
    _, report = quantize(model, cfg, calib, batch_size=batch, device="cpu", pack=True, progress=False)
    seconds = time.perf_counter() - t0
    s = report.summary
    return {"quant_s": seconds, "profile_seconds": s["profile_seconds"], "effective_bits": s["effective_bits"],
            "config": cfg.to_dict()}


def run_child(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llmc-python", default=None, help="python of a venv with llmcompressor (omit: lopro only)")
    p.add_argument("--jobs", default=",".join(LOPRO_JOBS), help="comma list of lopro jobs")
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results/speed/speed.json"))
    p.add_argument("--child", nargs=4, metavar=("JOB", "FOLDER", "CALIB", "-"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(lopro_job(a.child[0], a.child[1], a.child[2], a.group_size, a.batch_size, a.threads)))
        return 0
    jobs = [j for j in a.jobs.split(",") if j]
    unknown = [j for j in jobs if j not in LOPRO_JOBS]
    if unknown:
        p.error(f"unknown jobs {unknown}; choose from {sorted(LOPRO_JOBS)}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lopro-speed-") as tmp:
        folder, calib = prepare(Path(tmp), a.blocks, a.nsamples, a.seqlen, a.seed)
        runs: dict[str, list[dict]] = {}
        result = {"settings": {k: v for k, v in vars(a).items() if k != "child"}, "runs": runs,
                  "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                              "native_bf16": has_native_bf16("cpu"), "torch": torch.__version__}}
        for r in range(a.rounds):
            order = jobs + (["llmc-gptq-w3"] if a.llmc_python else [])
            order = order[r % len(order):] + order[:r % len(order)]  # rotate who goes first
            for job in order:
                if job.startswith("llmc"):
                    cmd = [a.llmc_python, str(HERE / "_llmc_gptq.py"), str(folder), str(calib), "3",
                           str(a.group_size), str(a.batch_size), str(a.threads)]
                else:
                    cmd = [sys.executable, __file__, "--group-size", str(a.group_size), "--batch-size",
                           str(a.batch_size), "--threads", str(a.threads), "--child", job, str(folder), str(calib), "-"]
                row = run_child(cmd)
                row["round"] = r
                runs.setdefault(job, []).append(row)
                print(f"round {r} {job}: {row['quant_s']:.1f} s", flush=True)
                out.write_text(json.dumps(result, indent=1))
        med = {job: statistics.median(x["quant_s"] for x in rows) for job, rows in runs.items()}
        result["median_quant_s"] = med
        result["ratios"] = [{"job": n, "against": d, "ratio": med[n] / med[d], "limit": lim}
                            for n, d, lim in RATIOS if n in med and d in med]
        out.write_text(json.dumps(result, indent=1))
    print("\n| job | median s | runs (s) | forwards / Hessians / solves / propagation (s, median run) |")
    print("|---|---|---|---|")
    for job, rows in runs.items():
        mid = sorted(rows, key=lambda x: x["quant_s"])[len(rows) // 2]
        prof = mid.get("profile_seconds")
        parts = (" / ".join(f"{prof[k]:.1f}" for k in ("forwards_s", "hessian_s", "solve_s", "propagate_s"))
                 if prof else "(llm-compressor: not split)")
        each = ", ".join(f"{x['quant_s']:.1f}" for x in rows)
        print(f"| {job} | {med[job]:.1f} | {each} | {parts} |")
    print()
    for r in result["ratios"]:
        verdict = "" if r["limit"] is None else (" (holds)" if r["ratio"] <= r["limit"] else " (does NOT hold)")
        print(f"{r['job']} / {r['against']}: {r['ratio']:.2f}x" + (f", limit {r['limit']}x{verdict}" if r["limit"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
