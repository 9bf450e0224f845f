"""Perplexity of packed checkpoints across backends: bf16 kernels (auto, int4pack, dense) vs the fp32 reference.

For every folder given (or a built-in model name: its fp32 and bf16 runs are the floor), the same evaluation windows are scored with ``lopro.load(DIR, backend=B)``
for each backend B; ``reference`` loads in fp32 (today's path), the others compute in bf16. Under
``auto`` an evaluation call carries ``batch x seqlen`` tokens, so it takes the dense bf16 path;
``int4pack`` forces PyTorch's int4 kernel at every token count, so its numerics are scored too.

Run:  python benchmarks/bench_backend_ppl.py DIR [DIR ...] [--windows 16] [--threads 2]
      [--out benchmarks/results/generate/ppl_backends.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

BACKENDS = ("reference", "auto", "int4pack", "dense")


def main() -> None:
    import lopro
    from lopro.data.windows import eval_windows, tokenize_split
    from lopro.eval.perplexity import perplexity
    from lopro.io.checkpoint import is_lopro_checkpoint
    from lopro.io.loading import load_model, load_tokenizer, resolve_model_path

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+")
    p.add_argument("--data", default="wiki")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--out", default="benchmarks/results/generate/ppl_backends.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    rows: dict[str, dict] = {}
    for folder in a.folders:
        tok, _ = load_tokenizer(folder)
        windows = eval_windows(tokenize_split(tok, a.data, "eval"), a.seqlen, a.windows)
        row: dict = {}
        packed = is_lopro_checkpoint(resolve_model_path(folder))
        for backend in a.backends.split(",") if packed else ("reference", "bf16"):
            if packed:
                model = lopro.load(resolve_model_path(folder), device="cpu", backend=backend)
            else:  # the unquantized model: fp32 ("reference") and bf16, the floor of any bf16 run
                model, _, _ = load_model(folder, device="cpu")
                if backend == "bf16":
                    model.to(torch.bfloat16)
            t = time.perf_counter()
            res = perplexity(model, windows, batch_size=a.batch_size)
            row[backend] = {"ppl": res["ppl"], "seconds": time.perf_counter() - t}
            del model
        ref = row.get("reference", {}).get("ppl")
        for r in row.values():
            r["rel_to_fp32"] = r["ppl"] / ref - 1 if ref else None
        rows[Path(folder).name] = row
        sys.stdout.write(f"{Path(folder).name}: " + ", ".join(
            f"{b} {r['ppl']:.3f} ({100 * r['rel_to_fp32']:+.2f}%)" for b, r in row.items()) + "\n")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"data": a.data, "seqlen": a.seqlen, "windows": a.windows, "threads": a.threads,
                               "busy_flag": os.path.exists("/tmp/lopro-busy"), "command": " ".join(sys.argv),
                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
