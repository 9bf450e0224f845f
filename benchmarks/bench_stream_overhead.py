"""What streaming costs on a model that fits in memory: SmolLM2 quantized by the streamed pipeline
(`quantize_to_folder`: blocks read from disk, written as shards, merged) against the in-memory path
(load the whole model, `quantize`, `save`), alternated, same calibration, same process.

    python benchmarks/bench_stream_overhead.py --rounds 2 --nsamples 16

Prints a table (median wall and quantization seconds per path, their ratio) and whether the two
checkpoints are byte-identical; writes JSON to benchmarks/results/scale/stream_overhead.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.suffix == ".safetensors" or p.name == "config.json"}


def in_memory(model_name, cfg, out, a) -> dict:
    from lopro import quantize, save
    from lopro.data.windows import calibration_windows, tokenize_split
    from lopro.io.loading import load_model
    from lopro.model.surgery import packer

    t0 = time.perf_counter()
    model, tok, _ = load_model(model_name, device="cpu")
    calib = calibration_windows(tokenize_split(tok, a.calib_data, "calib"), a.nsamples, a.seqlen, cfg.seed)
    model, report = quantize(model, cfg, calib, batch_size=a.batch_size, device="cpu", on_layer=packer(model),
                             progress=False)
    save(model, out, config=cfg, report=report, tokenizer=tok, overwrite=True)
    return {"wall_s": time.perf_counter() - t0, "quant_s": report.summary["quant_seconds"],
            "peak_rss_bytes": report.summary["peak_rss_bytes"]}


def streamed(model_name, cfg, out, a) -> dict:
    from lopro.jobs import quantize_to_folder

    t0 = time.perf_counter()
    s = quantize_to_folder(model_name, cfg, out, calib_data=a.calib_data, nsamples=a.nsamples, seqlen=a.seqlen,
                           batch_size=a.batch_size, device="cpu", overwrite=True, offload="ram")
    return {"wall_s": time.perf_counter() - t0, "quant_s": s["quant_seconds"], "peak_rss_bytes": s["peak_rss_bytes"],
            "profile_seconds": s["profile_seconds"]}


def main(argv=None) -> int:
    from lopro import QuantConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="gptq")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--calib-data", default="wiki")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/scale/stream_overhead.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = QuantConfig(method=a.method, bits=a.bits, group_size=a.group_size)
    work = Path(tempfile.mkdtemp(prefix="lopro-overhead-"))
    rows = {"in_memory": [], "streamed": []}
    same = []
    try:
        for r in range(a.rounds):  # alternate, so drift in the machine's load hits both paths alike
            order = ("in_memory", "streamed") if r % 2 == 0 else ("streamed", "in_memory")
            for path in order:
                fn = in_memory if path == "in_memory" else streamed
                rows[path].append(fn(a.model, cfg, work / path, a))
                print(f"round {r} {path}: {rows[path][-1]['quant_s']:.1f} s", file=sys.stderr, flush=True)
            same.append(digest(work / "in_memory") == digest(work / "streamed"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("wall_s", "quant_s", "peak_rss_bytes")}
           for k, v in rows.items()}
    result = {"config": vars(a), "rows": rows, "median": med, "byte_identical": all(same),
              "ratio_quant_s": med["streamed"]["quant_s"] / med["in_memory"]["quant_s"],
              "ratio_wall_s": med["streamed"]["wall_s"] / med["in_memory"]["wall_s"]}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print("| path | median quant s | median wall s | peak RSS MiB |\n|---|---|---|---|")
    for k, m in med.items():
        print(f"| {k} | {m['quant_s']:.1f} | {m['wall_s']:.1f} | {m['peak_rss_bytes'] / 2**20:.0f} |")
    print(f"streamed / in-memory: quantization {result['ratio_quant_s']:.3f}x, wall {result['ratio_wall_s']:.3f}x; "
          f"checkpoints byte-identical: {result['byte_identical']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
