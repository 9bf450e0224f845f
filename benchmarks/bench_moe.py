"""MoE benchmark (issue 7): the SmolLM2 Mixtral made by sparse upcycling vs dense SmolLM2, same settings.

For each bit width, the dense model and its upcycle (4 copies of each MLP, random router, top-2) are
quantized end to end with `lopro` (rank 16, group 64 by default) on the same `wiki` calibration windows
and evaluated on `wiki`. The experts start identical, so the two perplexities should agree within a
few percent; a large gap means experts were mishandled. Listed per expert: calibration tokens, proxy
loss (sum over its three matrices) and whether it fell back to the weight-only path. Memory: each
quantization runs in a fresh process; the peak RSS during quantization (VmHWM reset just before) minus
the resident size before it, against one block's calibration activations and Hessians.

Defaults are sized for a CPU: 32 x 512 calibration tokens (not the paper's 128 x 2048) and all wiki
eval windows of 512. Quick run: --nsamples 16 --windows 8.

    python benchmarks/bench_moe.py --bits 3 2
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from lopro import QuantConfig, quantize
from lopro.cli import parse_options
from lopro.data.windows import calibration_windows, eval_windows, tokenize_split
from lopro.eval.perplexity import perplexity
from lopro.io.loading import load_model
from lopro.model.moe import expert_index, upcycle_smollm2


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where not supported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def block_bound_bytes(model, nsamples: int, seqlen: int, batch_size: int, moe: bool) -> dict:
    """An estimate (fp32) of one block's share: the stored calibration activations (the block's inputs
    and outputs), its Hessians (q/k/v shared, o, and per expert gate/up shared and down), and the working
    set of one batch through the block (sdpa scores and probabilities, MLP intermediates)."""
    c = model.config
    H, I, heads = c.hidden_size, c.intermediate_size, c.num_attention_heads
    attn_out = heads * (getattr(c, "head_dim", None) or H // heads)
    experts = c.num_local_experts if moe else 1
    parts = {"activations": 4 * 2 * nsamples * seqlen * H,
             "hessians": 4 * (H * H + attn_out * attn_out + experts * (H * H + I * I)),
             "forward": 4 * (2 * batch_size * heads * seqlen * seqlen + 4 * batch_size * seqlen * I)}
    parts["total"] = sum(parts.values())
    return parts


def per_expert(report) -> list[dict]:
    rows = {}
    for r in report.layers:
        e = expert_index(r["name"])
        if e is None:
            continue
        d = rows.setdefault((r["block"], e), {"block": r["block"], "expert": e, "tokens": r["tokens"],
                                              "proxy_loss": 0.0, "fallback": False})
        d["proxy_loss"] += r["proxy_loss"]
        d["fallback"] |= r["fallback"]
    return [rows[k] for k in sorted(rows)]


def run(kind: str, folder: str, cfg: QuantConfig, calib, windows, args) -> dict:
    """One quantization in a fresh process: load, make the weights resident (they load mmapped), reset the
    peak RSS, quantize, read the peak, evaluate."""
    if args.threads:
        torch.set_num_threads(args.threads)
    rss_runtime = _status_kb("VmRSS") * 1024
    model, _, _ = load_model(folder, device="cpu")
    for p in model.parameters():  # anonymous resident memory, as after any ordinary load
        p.data = p.data.clone()
    model.tie_weights()
    gc.collect()
    size = model_bytes(model)
    exact = reset_peak_rss()
    rss0 = _status_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    model, report = quantize(model, cfg, calib if cfg.method != "rtn" else None, batch_size=args.batch_size,
                             progress=False)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM") * 1024 if exact else report.summary["peak_memory_bytes"]
    ppl = perplexity(model, windows, batch_size=args.batch_size)["ppl"]
    out = {"model": kind, "method": cfg.method, "bits": cfg.bits, "ppl": ppl, "effective_bits": report.summary["effective_bits"],
           "quant_seconds": seconds, "model_bytes": size, "rss_runtime_bytes": rss_runtime,
           "rss_before_bytes": rss0, "peak_rss_bytes": peak, "peak_is_exact": exact, "overhead_bytes": peak - rss0,
           "block_bound_bytes": block_bound_bytes(model, calib.shape[0], calib.shape[1], args.batch_size,
                                                  kind == "moe"),
           "fallbacks": sum(r["fallback"] for r in report.layers)}
    if kind == "moe":
        out["experts"] = per_expert(report)
    return out


def isolated(fn, *args):
    """fn(*args) in a fresh interpreter, so that memory figures are not blurred by earlier runs."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def fp_ppl(args, windows, moe_folder: str) -> dict:
    dense, tok, _ = load_model(args.model, device="cpu")
    moe = upcycle_smollm2(dense, num_experts=args.experts, seed=args.seed, top_k=args.top_k)
    ids = windows[:2]
    with torch.no_grad():
        diff = (dense(ids).logits - moe(ids).logits).abs().max().item()
    res = {"dense": perplexity(dense, windows)["ppl"], "moe": perplexity(moe, windows)["ppl"], "max_logit_diff": diff}
    moe.save_pretrained(moe_folder)
    tok.save_pretrained(moe_folder)
    del dense, moe
    gc.collect()
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="lopro")
    p.add_argument("--bits", type=int, nargs="+", default=[3, 2])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2, help="experts per token (1: no averaging of expert copies)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=None, help="wiki eval windows (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="QuantConfig option for the main method (repeatable), e.g. starved_expert_hessian=diagonal")
    p.add_argument("--kinds", nargs="+", default=["dense", "moe"], choices=["dense", "moe"])
    p.add_argument("--rtn-control", type=int, default=3, help="also RTN at these bits (0: no control run)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe" / "results.json"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    _, tok, _ = load_model(a.model, device="cpu")
    calib = calibration_windows(tokenize_split(tok, "wiki", "calib"), a.nsamples, a.seqlen, a.seed)
    windows = eval_windows(tokenize_split(tok, "wiki", "eval"), a.seqlen, a.windows)
    moe_folder = tempfile.mkdtemp(prefix="lopro-upcycled-")
    try:
        result = {"settings": {k: v for k, v in vars(a).items() if k != "out"},
                  "fp": fp_ppl(a, windows, moe_folder), "runs": []}
        cfgs = [QuantConfig(method=a.method, bits=bits, group_size=a.group_size, rank=a.rank, seed=a.seed,
                            options=parse_options(a.option)) for bits in a.bits]
        if a.rtn_control:  # identical experts quantize identically without a Hessian: ppl must match dense
            cfgs.append(QuantConfig(method="rtn", bits=a.rtn_control, group_size=a.group_size))
        for cfg in cfgs:
            for kind, folder in (("dense", a.model), ("moe", moe_folder)):
                if kind in a.kinds:
                    result["runs"].append(isolated(run, kind, folder, cfg, calib, windows, a))
    finally:
        shutil.rmtree(moe_folder, ignore_errors=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    sys.stdout.write(summary(result))


def summary(result) -> str:
    fp = result["fp"]
    lines = [f"fp: dense ppl {fp['dense']:.3f}, upcycled ppl {fp['moe']:.3f}, max logit diff {fp['max_logit_diff']:.2e}",
             "", "| model | config | eff. bits | wiki ppl | vs dense | quant s | model MB | peak - before MB | block bound MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    dense = {(r["method"], r["bits"]): r["ppl"] for r in result["runs"] if r["model"] == "dense"}
    for r in result["runs"]:
        key = (r["method"], r["bits"])
        rel = r["ppl"] / dense[key] - 1 if key in dense else float("nan")
        lines.append(f"| {r['model']} | {r['method']} W{r['bits']} | {r['effective_bits']:.3f} | {r['ppl']:.3f} | {rel:+.2%} | "
                     f"{r['quant_seconds']:.0f} | {r['model_bytes'] / 2**20:.0f} | {r['overhead_bytes'] / 2**20:.0f} | "
                     f"{r['block_bound_bytes']['total'] / 2**20:.0f} |")
    for r in result["runs"]:
        if r["model"] != "moe" or r["method"] == "rtn":
            continue
        lines += ["", f"{r['method']} W{r['bits']} experts (block: tokens / proxy loss{' / FALLBACK' if r['fallbacks'] else ''}):"]
        by_block = {}
        for e in r["experts"]:
            by_block.setdefault(e["block"], []).append(
                f"{e['tokens']}/{e['proxy_loss']:.3g}{'/F' if e['fallback'] else ''}")
        lines += [f"  {b:2d}: " + "  ".join(v) for b, v in by_block.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
