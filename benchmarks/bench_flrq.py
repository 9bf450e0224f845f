"""FLRQ on SmolLM2: flexible rank (R1-FLR) versus fixed rank at equal effective bits, BLC on/off,
and `lopro --rank auto` versus `lopro --rank 16` (issue 4).

For each setting (``--settings``; default W4 per-channel, W3 per-channel, W3 g64), with ``--lean``
only the first, fourth, second and seventh of these:

- ``flrq``: flexible rank, BLC on (the defaults: fp16 factors, FLRQ symmetric RTN grid);
- ``flrq blc-off``: the same rank selection, no clip search and no refits;
- ``flrq blc-first``: BLC whose refits keep the ranks chosen on ``W`` (the bits of blc-off);
- ``flrq r=R``: fixed uniform rank ``R``, BLC on, with ``R`` the uniform rank whose effective bits are
  closest to the flexible run's (isolates the rank choice);
- ``flrq fill``: every layer's rank filling the flexible run's bits (``bits_budget``, fixed mode);
- ``lowrank-rtn r=R``: the plain alpha-scaled low rank + min-max RTN residual at rank ``R`` (fp16);
- ``gptq``: reference without low rank.

Then ``lopro`` (W2 and W3, g64, fp8 factors) at rank 16, with ``--rank auto`` (R1-FLR ranks), with
``--rank auto`` capped at rank 16's bits (``bits_budget``), and at the uniform rank matched to auto's bits.

Statistics of the fp model (128 x 512 calibration tokens of ``wiki``, seed 0) are computed once and
shared by every run (propagate="fp"; the same cache as ``lopro compare``). Perplexity is token-level
at seqlen 512 on ``--windows`` windows of the ``wiki`` and ``news`` evaluation splits. Each finished
run is cached in ``<out>/results.json``: a rerun only computes what is missing. Writes
``<out>/results.md`` (tables, rank-selection time share, per-layer rank profiles) and, with
matplotlib, ``<out>/ranks_*.png``.

    python benchmarks/bench_flrq.py [--quick] [--out benchmarks/results/flrq] [--threads N]
    python benchmarks/bench_flrq.py --settings 4:-1,3:64 --lopro-bits 3 --lean --windows 16   # ~1 h on 2 cores
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

from lopro import QuantConfig
from lopro.data.assets import cache_dir
from lopro.data.windows import calibration_windows, eval_windows, fingerprint, tokenize_split
from lopro.eval.perplexity import perplexity
from lopro import formats
from lopro.compare import ResultStore
from lopro.methods.rank import base_bits as default_base_bits
from lopro.device import default_device
from lopro.io.loading import load_model
from lopro.pipeline.run import quantize

log = logging.getLogger("bench_flrq")

LAYER_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def gname(g: int) -> str:
    return "pc" if g == -1 else f"g{g}"


class Bench:
    def __init__(self, a):
        self.a = a
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "results.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        if old and "entries" not in old:  # results of the earlier {label: entry} layout, kept
            path.write_text(json.dumps({"entries": {e["key"]: e for e in old.values()}, "failures": {}}, indent=1))
        self.store = ResultStore(self.out)  # lopro compare's cache: one key per configuration
        self.device = torch.device(a.device) if a.device else default_device()
        model, self.tok, path = load_model(a.model, device="cpu")
        del model
        self.calib = calibration_windows(tokenize_split(self.tok, "wiki", "calib"), a.nsamples, a.seqlen, 0)
        sha = fingerprint(self.calib)
        self.stats_dir = cache_dir() / "stats" / f"{Path(path).name}-{sha[:16]}"
        self.evals = {d: eval_windows(tokenize_split(self.tok, d, "eval"), 512, a.windows or None) for d in ("wiki", "news")}
        self.calib_sha = sha

    def fp(self) -> dict:
        key = json.dumps({"config": "fp", "windows": self.a.windows})
        hit = self.store.data["entries"].get(key)
        if hit is None:
            model, _, _ = load_model(self.a.model, device=self.device)
            hit = {"label": "fp", "key": key,
                   "ppl": {n: perplexity(model, w, batch_size=8)["ppl"] for n, w in self.evals.items()}}
            self.store.put(key, hit)
        return hit

    def run(self, label: str, cfg: QuantConfig) -> dict:
        d = {**cfg.to_dict(), "propagate": "fp"}
        key = json.dumps({"config": d, "calib": self.calib_sha, "windows": self.a.windows}, sort_keys=True)
        hit = self.store.data["entries"].get(key)
        if hit is not None:
            return hit
        log.info("running %s", label)
        cfg = QuantConfig.from_dict(d)
        model, _, _ = load_model(self.a.model, device=self.device)
        t0 = time.perf_counter()
        _, report = quantize(model, cfg, self.calib, batch_size=8, device=self.device, stats_cache=self.stats_dir,
                             progress=False)
        seconds = time.perf_counter() - t0
        layers = [{k: r.get(k) for k in ("block", "name", "shape", "effective_bits", "proxy_loss",
                                         "rel_output_error", "rank", "stop_rule", "rank_seconds", "seconds")}
                  for r in report.layers]
        entry = {"label": label, "key": key, "config": d, "effective_bits": report.summary["effective_bits"],
                 "quant_seconds": seconds, "solve_seconds": report.summary["solve_seconds"],
                 "rank_seconds": (sum(r["rank_seconds"] for r in report.layers)
                                  if all("rank_seconds" in r for r in report.layers) else None),
                 "proxy_loss": sum(r["proxy_loss"] for r in report.layers),
                 "mean_rel_output_error": sum(r["rel_output_error"] for r in report.layers) / len(layers),
                 "ppl": {n: perplexity(model, w, batch_size=8)["ppl"] for n, w in self.evals.items()},
                 "layers": layers, "device": str(self.device)}
        self.store.put(key, entry)
        log.info("%s: bits %.3f ppl %s (%.0f s)", label, entry["effective_bits"], entry["ppl"], seconds)
        return entry


def matched_rank(entry: dict, cfg: QuantConfig, target_bits: float, max_rank: int = 256) -> tuple[int, float]:
    """The uniform rank whose mean effective bits under `cfg` is closest to `target_bits` (ties: lower)."""
    shapes = [tuple(r["shape"]) for r in entry["layers"]]
    base = [default_base_bits(m, n, cfg) for m, n in shapes]
    total = sum(m * n for m, n in shapes)

    def bits(r):
        return sum(b + formats.lowrank_bits(m, n, min(r, m, n), cfg.rank_dtype) for b, (m, n) in zip(base, shapes)) / total

    best = min(range(max_rank + 1), key=lambda r: (abs(bits(r) - target_bits), r))
    return best, bits(best)


def flrq_cfg(bits, g, **options):
    # the FLRQ grid is symmetric: count its storage (no zeros) with sym=True
    return QuantConfig(method="flrq", bits=bits, group_size=g, sym=True, rank_dtype="fp16", options=options)


def suite(b: Bench, settings, lopro_bits, lean: bool = False) -> dict:
    """Row groups; in each FLRQ group rows[0] is the flexible run and rows[1] the fixed-rank one at
    its bits (BLC on). `lean` keeps those two, BLC off, and low rank + RTN at the matched rank."""
    groups = {}
    for bits, g in settings:
        tag = f"W{bits} {gname(g)}"
        fl = b.run(f"flrq {tag}", flrq_cfg(bits, g))
        target = fl["effective_bits"]
        fixed = flrq_cfg(bits, g, rank_mode="fixed")
        r, _ = matched_rank(fl, fixed, target)
        rows = [fl, b.run(f"flrq {tag} r={r}", dataclasses.replace(fixed, rank=r)),
                b.run(f"flrq {tag} blc-off", flrq_cfg(bits, g, blc=False))]
        if not lean:
            rows.append(b.run(f"flrq {tag} blc-first", flrq_cfg(bits, g, blc_rank="first")))
            rows.append(b.run(f"flrq {tag} r={r} blc-off", dataclasses.replace(
                fixed, rank=r, options={"rank_mode": "fixed", "blc": False})))
            rows.append(b.run(f"flrq {tag} fill {target:.3f}",
                              flrq_cfg(bits, g, rank_mode="fixed", bits_budget=target)))
        lr_cfg = QuantConfig(method="lowrank-rtn", bits=bits, group_size=g, rank_dtype="fp16")
        r_lr, _ = matched_rank(fl, lr_cfg, target)
        rows.append(b.run(f"lowrank-rtn {tag} r={r_lr}", dataclasses.replace(lr_cfg, rank=r_lr)))
        if not lean:
            rows.append(b.run(f"gptq {tag}", QuantConfig(method="gptq", bits=bits, group_size=g)))
        groups[f"FLRQ {tag}"] = rows
    for bits in lopro_bits:
        tag = f"W{bits} g64"
        base = QuantConfig(method="lopro", bits=bits, group_size=64, rank=16, rank_dtype="fp8")
        r16 = b.run(f"lopro {tag} r=16", base)
        auto = b.run(f"lopro {tag} auto", dataclasses.replace(base, options={"rank_mode": "auto"}))
        capped = b.run(f"lopro {tag} auto<={r16['effective_bits']:.3f}", dataclasses.replace(
            base, options={"rank_mode": "auto", "bits_budget": r16["effective_bits"]}))
        r, _ = matched_rank(auto, base, auto["effective_bits"])
        rows = [r16, auto, capped]
        if r != 16:
            rows.append(b.run(f"lopro {tag} r={r}", dataclasses.replace(base, rank=r)))
        groups[f"LoPRo {tag}"] = rows
    return groups


def rank_profile(entry: dict) -> str:
    by_block: dict[int, dict[str, int]] = {}
    for r in entry["layers"]:
        by_block.setdefault(r["block"], {})[r["name"].split(".")[-1]] = r["rank"]
    names = [n for n in LAYER_ORDER if any(n in v for v in by_block.values())]
    names += sorted({n for v in by_block.values() for n in v} - set(names))
    lines = ["| block | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for i in sorted(by_block):
        lines.append(f"| {i} | " + " | ".join(str(by_block[i].get(n, "-")) for n in names) + " |")
    rules: dict[str, int] = {}
    for r in entry["layers"]:
        rules[r["stop_rule"]] = rules.get(r["stop_rule"], 0) + 1
    ranks = [r["rank"] for r in entry["layers"]]
    return (f"\n**{entry['label']}**: mean rank {sum(ranks) / len(ranks):.1f}, min {min(ranks)}, max {max(ranks)}; "
            f"stop rules {rules}\n\n" + "\n".join(lines) + "\n")


def plot_profiles(entries: list[dict], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for e in entries:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        by_name: dict[str, list] = {}
        for r in e["layers"]:
            by_name.setdefault(r["name"].split(".")[-1], []).append((r["block"], r["rank"]))
        for name, pts in by_name.items():
            pts.sort()
            ax.plot(*zip(*pts), marker=".", label=name)
        ax.set_xlabel("block")
        ax.set_ylabel("rank")
        ax.set_title(e["label"])
        ax.legend(fontsize=7, ncol=4)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"ranks_{e['label'].replace(' ', '_').replace('<=', 'le')}.png", dpi=110)
        plt.close(fig)


def report(b: Bench, groups: dict) -> str:
    a = b.a
    out = [f"# FLRQ on {a.model}\n",
           f"Calibration {a.nsamples} x {a.seqlen} tokens of `wiki` (seed 0), fp statistics shared by every run; "
           f"token-level perplexity at seqlen 512 on {a.windows or 'all'} windows per corpus; device {b.device}.\n",
           "`proxy loss` is the sum over layers of tr(dW H dW^T); `quant s` is the wall time of the whole "
           "quantization (the first run also computes the shared statistics), `solve s` the time in the "
           "per-layer methods; `rank s` is the time spent choosing and extracting the low rank (R1-FLR, all "
           "BLC epochs), `share` = rank s / solve s.\n",
           "FP16 perplexity: wiki {wiki:.2f}, news {news:.2f}.\n".format(**b.fp()["ppl"])]
    head = "| run | eff. bits | ppl wiki | ppl news | proxy loss | mean rank | quant s | solve s | rank s | share |"
    for name, rows in groups.items():
        out += [f"\n## {name}\n", head, "|" + "---|" * 10]
        for e in rows:
            ranks = [r["rank"] for r in e["layers"] if r.get("rank") is not None]
            mean_rank = f"{sum(ranks) / len(ranks):.1f}" if ranks else "-"
            out.append(f"| {e['label']} | {e['effective_bits']:.3f} | {e['ppl']['wiki']:.2f} | "
                       f"{e['ppl']['news']:.2f} | {e['proxy_loss']:.4g} | {mean_rank} | {e['quant_seconds']:.0f} | "
                       f"{e['solve_seconds']:.0f} | " + ("- | - |" if e["rank_seconds"] is None else
                                                          f"{e['rank_seconds']:.1f} | "
                                                          f"{e['rank_seconds'] / e['solve_seconds']:.1%} |"))
        if name.startswith("FLRQ"):  # rows: flexible, fixed r at its bits (BLC on), ...
            flex, fixed = rows[0], rows[1]
            out.append(f"\nR1-FLR selection overhead over fixed-rank extraction ({fixed['label']}): "
                       f"{flex['rank_seconds'] - fixed['rank_seconds']:.1f} s = "
                       f"{(flex['rank_seconds'] - fixed['rank_seconds']) / flex['solve_seconds']:.1%} of "
                       f"{flex['label']}'s solve time.")
    flexible = [rows[0] for name, rows in groups.items() if name.startswith("FLRQ")]
    flexible += [e for name, rows in groups.items() if name.startswith("LoPRo") for e in rows[1:2]]
    out.append("\n## Per-layer ranks chosen by R1-FLR\n")
    out += [rank_profile(e) for e in flexible]
    plot_profiles(flexible, b.out)
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=32, help="evaluation windows per corpus (0 = the whole split)")
    p.add_argument("--quick", action="store_true", help="W4 per-channel and lopro W2 only, 16 x 256 calibration")
    p.add_argument("--settings", default="4:-1,3:-1,3:64", help="FLRQ settings, BITS:GROUP comma list")
    p.add_argument("--lopro-bits", default="2,3", help="bits of the lopro --rank auto rows ('' for none)")
    p.add_argument("--lean", action="store_true",
                   help="per setting only flexible, fixed rank at its bits, BLC off and low rank + RTN")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.nsamples, a.seqlen, a.windows = 16, 256, 4
    a.out = a.out or str(Path(__file__).parent / "results" / ("flrq-quick" if a.quick else "flrq"))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lopro").setLevel(logging.WARNING)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    b = Bench(a)
    settings = [tuple(int(v) for v in t.split(":")) for t in a.settings.split(",") if t]
    lopro_bits = [int(v) for v in a.lopro_bits.split(",") if v]
    if a.quick:
        settings, lopro_bits = settings[:1], lopro_bits[:1]
    groups = suite(b, settings, lopro_bits, a.lean)
    text = report(b, groups)
    (b.out / "results.md").write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
