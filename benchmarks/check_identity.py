"""Are two versions of lopro the same library? Quantize SmolLM2 with every method (small calibration,
CLI's streamed path) and record each checkpoint's SHA-256 and its perplexity, so that a refactor can be
shown to change no byte and no figure:

    git worktree add /tmp/before <old-commit>
    PYTHONPATH=/tmp/before/src python benchmarks/check_identity.py --out /tmp/before.json
    python benchmarks/check_identity.py --out /tmp/after.json --against /tmp/before.json

With --against it prints, per method, whether the hashes and perplexities match, and exits 1 if any
differ. One thread by default (the codes depend on the thread count: see the README).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = {  # name -> QuantConfig fields beyond the method
    "rtn": {"bits": 3, "group_size": 64},
    "gptq": {"bits": 3, "group_size": 64},
    "gptvq": {"bits": 2, "group_size": 64},
    "lqer": {"bits": 3, "group_size": 64, "rank": 16},
    "flrq": {"bits": 3, "group_size": 64, "rank_dtype": "fp16"},
    "lopro": {"bits": 3, "group_size": 64, "rank": 16},
    "lopro-v": {"bits": 2, "group_size": 64, "rank": 16},
    "lowrank-gptq-hadamard": {"bits": 3, "group_size": 64, "rank": 16},
}


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.suffix == ".safetensors"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--against", help="a JSON written by an earlier run: compare and exit 1 on a difference")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import lopro

    rows = {}
    for name in a.methods.split(","):
        cfg = lopro.QuantConfig(method=name, **METHODS[name])
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "ckpt"
            t0 = time.perf_counter()
            lopro.quantize_to_folder("smollm2-135m", cfg, out, nsamples=a.nsamples, seqlen=a.seqlen, device="cpu")
            seconds = time.perf_counter() - t0
            ppl = lopro.evaluate_ppl(str(out), "wiki", seqlen=256, windows=a.windows, device="cpu")["ppl"]
            rows[name] = {"sha256": digest(out), "ppl": ppl, "seconds": round(seconds, 1)}
        print(f"{name:24s} ppl {ppl:10.4f}  {seconds:6.1f} s  {next(iter(rows[name]['sha256'].values()))[:16]}",
              flush=True)
        Path(a.out).write_text(json.dumps({"threads": a.threads, "nsamples": a.nsamples, "seqlen": a.seqlen,
                                           "rows": rows}, indent=1))
    if not a.against:
        return 0
    before = json.loads(Path(a.against).read_text())["rows"]
    bad = 0
    print(f"\n{'method':24s} {'bytes':>9s} {'ppl before':>12s} {'ppl after':>12s}")
    for name, row in rows.items():
        old = before.get(name)
        same = old is not None and old["sha256"] == row["sha256"]
        bad += not (same and old["ppl"] == row["ppl"])
        print(f"{name:24s} {'same' if same else 'DIFFER':>9s} {old['ppl'] if old else float('nan'):12.4f} "
              f"{row['ppl']:12.4f}")
    print("identical" if not bad else f"{bad} method(s) differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
