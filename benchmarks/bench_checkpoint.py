"""Packed checkpoint versus the in-memory fake-quantized model on SmolLM2 (issue 3).

Quantizes SmolLM2 with one method, keeps a fake-quantized copy, saves the packed checkpoint,
reloads it with `lopro.load`, and compares perplexity, logits and size on disk against effective
bits; then measures loading memory in a fresh process.

    python benchmarks/bench_checkpoint.py --method lopro --bits 3 --out /tmp/smollm2-lopro-w3
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import lopro
from lopro.data.windows import calibration_windows, eval_windows, tokenize_split
from lopro.eval.perplexity import perplexity
from lopro.io import checkpoint as ck
from lopro.io.loading import load_model
from lopro.model.surgery import packer
from lopro.model.walk import find_blocks

LOAD_PROBE = """
import json, sys, time
import lopro


def status(key):  # kB figures of /proc/self/status
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))


import torch
from transformers import AutoConfig, AutoModelForCausalLM

with torch.device("meta"):  # import the architecture's code first: the baseline holds the libraries
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
t = time.time()
model = lopro.load(sys.argv[1], device="cpu")
seconds = time.time() - t
loaded = {"load_seconds": seconds, "load_rss_increase_mib": (status("VmRSS") - base) / 1024,
          "load_peak_increase_mib": (status("VmHWM") - base) / 1024}
with torch.no_grad():  # memory-mapped tensors count once read: one 8-token forward reads them all
    model(torch.zeros(1, 8, dtype=torch.long))
loaded.update(forward_rss_increase_mib=(status("VmRSS") - base) / 1024,
              forward_peak_increase_mib=(status("VmHWM") - base) / 1024)
print(json.dumps(loaded))
"""


def load_probe(folder: str) -> dict:
    """Memory and time of `lopro.load` in a fresh process (current and peak RSS over the import)."""
    probe = subprocess.run([sys.executable, "-c", LOAD_PROBE, folder], capture_output=True, text=True, check=True)
    return json.loads(probe.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="lopro")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--out", required=True)
    p.add_argument("--json", default="benchmarks/results/checkpoint.json")
    p.add_argument("--probe-only", action="store_true", help="only measure loading the existing --out folder")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    if a.probe_only:
        res = json.loads(Path(a.json).read_text()) if Path(a.json).exists() else {}
        res.update(load_probe(a.out))
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
        sys.stdout.write(json.dumps(res, indent=1, default=str) + "\n")
        return
    model, tok, _ = load_model("smollm2-135m", device="cpu")
    fake = copy.deepcopy(model)
    cfg = lopro.QuantConfig(method=a.method, bits=a.bits, group_size=a.group_size, rank=16, rank_dtype="fp8")
    calib = calibration_windows(tokenize_split(tok, "wiki", "calib"), a.nsamples, a.seqlen, cfg.seed)
    kept = {}
    t0 = time.time()
    model, report = lopro.quantize(model, cfg, calib, on_layer=packer(model, keep_weights=kept), progress=False)
    res = {"method": a.method, "bits": a.bits, "group_size": a.group_size, "nsamples": a.nsamples,
           "seqlen": a.seqlen, "windows": a.windows, "quant_seconds": time.time() - t0}
    _, blocks = find_blocks(fake)
    for (i, name), w in kept.items():
        blocks[i].get_submodule(name).weight.data.copy_(w)
    report.summary["model"] = "smollm2-135m"
    ck.save(model, a.out, config=cfg, report=report, tokenizer=tok, overwrite=True)
    del model
    win = eval_windows(tokenize_split(tok, "wiki", "eval"), a.seqlen, a.windows)
    res["ppl_fake"] = perplexity(fake, win)["ppl"]
    ref = fake(win[:2]).logits
    del fake
    loaded = lopro.load(a.out, device="cpu")
    res["ppl_packed"] = perplexity(loaded, win)["ppl"]
    res["ppl_rel_diff"] = res["ppl_packed"] / res["ppl_fake"] - 1
    got = loaded(win[:2]).logits
    res["logits_rel_err"] = ((got - ref).norm() / ref.norm()).item()
    res["effective_bits_report"] = report.summary["effective_bits"]
    res["info"] = ck.checkpoint_info(a.out)
    res.update(load_probe(a.out))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    sys.stdout.write(json.dumps(res, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
