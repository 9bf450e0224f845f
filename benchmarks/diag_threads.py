"""Do 1 and 2 threads give the same GPTQ codes? One 512-wide random Llama block, quantized twice per
Hessian dtype (fp32, fp64 accumulation), compared layer by layer (fraction of codes that differ):

    python benchmarks/diag_threads.py [--out F.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import tiny_llama  # noqa: E402

from lopro import QuantConfig, quantize  # noqa: E402


def codes(hessian_dtype: str, threads: int) -> dict[str, torch.Tensor]:
    torch.set_num_threads(threads)
    model = tiny_llama(layers=1, hidden=512, inter=1024, vocab=256)
    ids = torch.randint(0, 256, (16, 128), generator=torch.Generator().manual_seed(0))
    got = {}
    quantize(model, QuantConfig(method="gptq", bits=3, group_size=64, options={"hessian_dtype": hessian_dtype}),
             ids, on_layer=lambda b, name, m, r: got.__setitem__(name, r.residual.codes.clone()), progress=False)
    return got


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    res = {}
    for hd in ("fp32", "fp64"):
        one, two = codes(hd, 1), codes(hd, 2)
        res[hd] = {k: (one[k] != two[k]).float().mean().item() for k in one}
        print(hd, {k: f"{v:.5f}" for k, v in res[hd].items()}, flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
