"""Per-layer proxy loss of RTN, GPTQ and LoPRo on calibration and on held-out activations.

Reads an fp statistics cache (``--stats-cache DIR`` of `lopro quantize --propagate fp`, or
bench_ppl.py's; by default the only one under $LOPRO_CACHE/stats for SmolLM2) and 4 held-out wiki
windows through the fp model; prints one line per layer and writes JSON with --out:

    python benchmarks/diag_heldout_loss.py --bits 4 --group-size -1 [--stats DIR] [--out F.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lopro.config import QuantConfig
from lopro.data.assets import cache_dir, resolve_builtin_model
from lopro.data.windows import eval_windows, tokenize_split
from lopro.methods import get_method
from lopro.methods.base import LayerStats
from lopro.quant.loss import layer_loss

BLOCKS = [0, 10, 20, 29]
NAMES = ["self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=-1)
    ap.add_argument("--stats", help="folder of block_NNN.pt fp statistics")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    found = sorted((cache_dir() / "stats").glob("smollm2-135m*")) if not a.stats else [Path(a.stats)]
    if len(found) != 1:
        sys.exit(f"need exactly one statistics folder, found {len(found)}: pass --stats DIR")
    root = found[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = resolve_builtin_model("smollm2-135m")
    m = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(p)
    win = eval_windows(tokenize_split(tok, "wiki", "eval"), 512, 4)
    Hs: dict = {}

    def hook(key):
        def f(mod, args, out):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            Hs[key] = Hs.get(key, 0) + 2 * x.T @ x
        return f

    for b in BLOCKS:
        for n in NAMES:
            m.model.layers[b].get_submodule(n).register_forward_hook(hook((b, n)))
    with torch.no_grad():
        m(win)
    rows = []
    for b in BLOCKS:
        d = torch.load(root / f"block_{b:03d}.pt", weights_only=False)
        for n in NAMES:
            st = LayerStats(**d["stats"][n])
            W = m.model.layers[b].get_submodule(n).weight.detach()
            held = (Hs[(b, n)] / win.numel()).float()
            row = {"block": b, "layer": n}
            for meth in ["rtn", "gptq", "lopro"]:
                r = get_method(meth)(W, st, QuantConfig(method=meth, bits=a.bits, group_size=a.group_size))
                row[meth] = {"calib": layer_loss(W, r.weight, st.H), "heldout": layer_loss(W, r.weight, held)}
            rows.append(row)
            print(b, f"{n:18s}", " | ".join(f"{k} in {v['calib']:.4g} out {v['heldout']:.4g}"
                                           for k, v in row.items() if isinstance(v, dict)), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"bits": a.bits, "group_size": a.group_size, "stats": str(root),
                                           "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
