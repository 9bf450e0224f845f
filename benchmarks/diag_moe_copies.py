"""Why the upcycled SmolLM2 Mixtral can beat the dense model at W2: it averages differently quantized copies.

Every expert of the upcycled model is a copy of the block's MLP. With top-k = number of experts, every
expert sees every calibration token, yet each quantizes differently: tokens reach an expert in routing
slot order, so its Hessian differs from its siblings' by rounding, and the quantizer's discrete choices
(permutation order, roundings) amplify that into different codes (same proxy loss, different weights).
The MoE output is the router-weighted mean of the copies, so their errors partly cancel.

This quantizes the upcycled model with top-k = E and evaluates `wiki` perplexity (a) as routed (the
mean of E copies), (b) with each single copy alone (a fixed router sending every token to expert e),
beside the dense model quantized with the same settings, and how far apart the copies' weights are
(|Q_e - Q_0| / |Q_0 - W| per matrix, mean over blocks).

    python benchmarks/diag_moe_copies.py --bits 2 --nsamples 16 --windows 8
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path

import torch
from torch import nn

from lopro import QuantConfig, quantize
from lopro.data.windows import calibration_windows, eval_windows, tokenize_split
from lopro.eval.perplexity import perplexity
from lopro.io.loading import load_model
from lopro.model.moe import upcycle_smollm2


class FixedRouter(nn.Module):
    """Mixtral router stand-in: every token goes to expert `e` with weight 1."""

    def __init__(self, e: int, num_experts: int):
        super().__init__()
        self.e, self.num_experts = e, num_experts

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        n = x.shape[0]
        return (x.new_zeros(n, self.num_experts), x.new_ones(n, 1),
                torch.full((n, 1), self.e, dtype=torch.long, device=x.device))


def copies_distance(moe, fp_moe, tensor: str) -> float:
    """Mean over blocks and experts e > 0 of |Q_e - Q_0| / |Q_0 - W| for one fused expert tensor."""
    vals = []
    for blk, ref in zip(moe.model.layers, fp_moe.model.layers):
        Q, W = getattr(blk.mlp.experts, tensor).detach(), getattr(ref.mlp.experts, tensor).detach()
        err = (Q[0] - W[0]).norm()
        vals += [((Q[e] - Q[0]).norm() / err).item() for e in range(1, Q.shape[0])]
    return sum(vals) / len(vals)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="lopro")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--blocks", type=int, default=None, help="keep only the first N blocks (a quick check)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON path (default results/moe/copies_w<bits>.json)")
    a = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if a.threads:
        torch.set_num_threads(a.threads)

    dense, tok, _ = load_model(a.model)
    if a.blocks:
        dense.model.layers = dense.model.layers[:a.blocks]
        dense.config.num_hidden_layers = a.blocks
    calib = calibration_windows(tokenize_split(tok, "wiki", "calib"), a.nsamples, 512, seed=a.seed)
    windows = eval_windows(tokenize_split(tok, "wiki", "eval"), 512, a.windows)
    cfg = QuantConfig(method=a.method, bits=a.bits, group_size=a.group_size, rank=a.rank, seed=a.seed)
    fp_moe = upcycle_smollm2(dense, num_experts=a.experts, seed=a.seed, top_k=a.experts)
    moe, _ = quantize(copy.deepcopy(fp_moe), cfg, calib, progress=False)
    qdense, _ = quantize(dense, cfg, calib, progress=False)

    rows = [{"model": "dense", "routing": "-", "ppl": perplexity(qdense, windows)["ppl"]},
            {"model": "upcycled", "routing": f"all {a.experts} copies (router weights)",
             "ppl": perplexity(moe, windows)["ppl"]}]
    routers = [blk.mlp.gate for blk in moe.model.layers]
    for e in range(a.experts):
        for blk in moe.model.layers:
            blk.mlp.gate = FixedRouter(e, a.experts)
        rows.append({"model": "upcycled", "routing": f"copy {e} alone", "ppl": perplexity(moe, windows)["ppl"]})
    for blk, r in zip(moe.model.layers, routers):
        blk.mlp.gate = r
    dist = {t: copies_distance(moe, fp_moe, t) for t in ("gate_up_proj", "down_proj")}

    print(f"\n{a.method} W{a.bits}, {a.nsamples} x 512 calibration, {a.windows} wiki windows, top-{a.experts} "
          f"of {a.experts} at calibration\n")
    print("| model | evaluated as | wiki ppl |\n|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['routing']} | {r['ppl']:.1f} |")
    print("\n|Q_e - Q_0| / |Q_0 - W| (mean over blocks): "
          + ", ".join(f"{t} {v:.2f}" for t, v in dist.items()))
    out = Path(a.out or Path(__file__).parent / "results" / "moe" / f"copies_w{a.bits}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": vars(a), "rows": rows, "copies_distance": dist}, indent=1))
    tmp.replace(out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
