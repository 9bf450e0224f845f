"""Exported checkpoints against the lopro checkpoint they came from, on SmolLM2 (issue 20).

For each configuration: quantize with `lopro quantize` (small calibration), export with
`lopro.export.export`, reload the export with an outside reader, and compare perplexity on the same
windows (`lopro.jobs.evaluate_ppl`):

- GGUF through transformers' own GGUF loader (`from_pretrained(dir, gguf_file=...)`, which
  dequantizes into an fp32 model);
- LoRA exports (LQER): the GGUF base through the same loader, the PEFT adapter merged by hand;
- optionally llama.cpp (`--llama-python`: a Python with `llama_cpp` installed, e.g. a separate venv):
  perplexity on the same token windows and greedy decode tokens/s, beside lopro's packed model.

The lopro side is evaluated twice: with the reference backend (fp32, the weights exactly as stored:
the yardstick for an exact export) and with `lopro.load`'s default backend.

    python benchmarks/bench_export.py --work /tmp/lopro-export --llama-python /tmp/llamacpp/venv/bin/python
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import lopro
from lopro.data.windows import eval_windows, tokenize_split
from lopro.export import export, load_exact
from lopro.jobs import evaluate_ppl

DEFAULT_CONFIGS = "gptq:4:64,rtn:3:64,lqer:3:64"
RESULTS = Path(__file__).parent / "results" / "export"

LLAMA_PROBE = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama

args = json.loads(sys.argv[1])
windows = np.load(args["windows"])
kw = dict(n_ctx=windows.shape[1], n_batch=windows.shape[1], n_threads=args["threads"], verbose=False)
if args.get("lora"):
    kw["lora_path"] = args["lora"]
llm = Llama(args["model"], logits_all=True, **kw)
nll, count = 0.0, 0
t = time.time()
for win in windows:
    llm.reset()
    llm.eval(win.tolist())
    logits = np.asarray(llm.scores[: len(win) - 1], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    nll -= logp[np.arange(len(win) - 1), win[1:]].sum()
    count += len(win) - 1
ppl_seconds = time.time() - t
out = {"ppl": float(np.exp(nll / count)), "tokens": count, "ppl_seconds": ppl_seconds}
del llm
llm = Llama(args["model"], logits_all=False, **kw)
prompt = args["prompt"]
times = []
for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
    times.append(time.time())
    if len(times) == args["new_tokens"]:
        break
out["decode_tokens_per_s"] = (len(times) - 1) / (times[-1] - times[0])
print(json.dumps(out))
"""


def parse_configs(text: str) -> list[tuple[str, int, int]]:
    out = []
    for item in text.split(","):
        method, bits, gs = item.split(":")
        out.append((method, int(bits), int(gs)))
    return out


def quantize(model: str, method: str, bits: int, gs: int, folder: Path, a) -> float:
    if (folder / "config.json").exists():
        return 0.0
    t = time.time()
    cmd = [sys.executable, "-m", "lopro.cli", "quantize", "--model", model, "--method", method, "--bits", str(bits),
           "--group-size", str(gs), "--nsamples", str(a.nsamples), "--seqlen", str(a.calib_seqlen),
           "--out", str(folder)]
    subprocess.run(cmd, check=True)
    return time.time() - t


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".gguf"))


def gguf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32).eval()


def merge_adapter(model, adapter: Path) -> None:
    """W += (lora_alpha / r) B A for every target module of a PEFT adapter folder (by hand)."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    t = load_file(str(adapter / "adapter_model.safetensors"))
    for name in cfg["target_modules"]:
        A, B = t[f"base_model.model.{name}.lora_A.weight"], t[f"base_model.model.{name}.lora_B.weight"]
        scale = cfg["alpha_pattern"].get(name, cfg["lora_alpha"]) / cfg["rank_pattern"].get(name, cfg["r"])
        with torch.no_grad():
            model.get_submodule(name).weight += scale * (B @ A)


def ppl(model, tok, a) -> float:
    return evaluate_ppl(model, a.data, seqlen=a.seqlen, windows=a.windows, tokenizer=tok)["ppl"]


def lopro_decode(folder: Path, prompt: list[int], new_tokens: int) -> float:
    model = lopro.load(folder, device="cpu")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)  # warm up
        t0 = time.time()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        t1 = time.time()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        t2 = time.time()
    return (new_tokens - 1) / ((t2 - t1) - (t1 - t0))


def llama_cpp(python: str, gguf: Path, windows: np.ndarray, prompt: list[int], a, lora: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "w.npy", windows)
        args = {"model": str(gguf), "windows": str(Path(tmp) / "w.npy"), "threads": a.threads, "prompt": prompt,
                "new_tokens": a.new_tokens, "lora": str(lora) if lora else None}
        res = subprocess.run([python, "-c", LLAMA_PROBE, json.dumps(args)], capture_output=True, text=True)
    if res.returncode:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"rc {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(a) -> dict:
    from transformers import AutoTokenizer

    torch.set_num_threads(a.threads)
    work = Path(a.work)
    rows = []
    for method, bits, gs in parse_configs(a.configs):
        name = f"{method}-w{bits}-g{gs}"
        ck = work / name
        qs = quantize(a.model, method, bits, gs, ck, a)
        tok = AutoTokenizer.from_pretrained(ck)
        windows = eval_windows(tokenize_split(tok, a.data, "eval"), a.seqlen, a.windows)
        prompt = windows[0, : a.prompt_tokens].tolist()
        ref = ppl(load_exact(ck), tok, a)
        default = ppl(lopro.load(ck, device="cpu"), tok, a) if a.default_backend else None
        variants = [("lora", {})] if method in ("lqer", "flrq") else [("gguf", {}), ("gguf", {"bit_exact": True})]
        for fmt, kw in variants:
            if kw and bits != 4:
                continue  # bit_exact only changes 4-bit asymmetric layers
            out = work / f"{name}.{fmt}{'-bitexact' if kw else ''}"
            t = time.time()
            rep = export(ck, fmt, out, overwrite=True, **kw)
            export_s = time.time() - t
            model = gguf_model(out)
            if fmt == "lora":
                merge_adapter(model, out / "adapter")
            got = ppl(model, tok, a)
            del model
            types = sorted({e["type"] for e in rep["layers"].values()})
            row = {"config": name, "format": fmt + (" bit_exact" if kw else ""), "types": types,
                   "exact": rep["exact"], "max_abs_weight_error": rep["max_abs_error"],
                   "lopro_ppl_reference": ref, "lopro_ppl_default_backend": default, "export_ppl": got,
                   "ppl_rel_diff": got / ref - 1, "export_seconds": export_s, "quantize_seconds": qs,
                   "lopro_bytes": folder_bytes(ck), "export_bytes": folder_bytes(out)}
            if a.llama_python and not kw:
                lora = out / "adapter.gguf" if fmt == "lora" else None
                row["llama_cpp"] = llama_cpp(a.llama_python, out / "model.gguf", windows.numpy(), prompt, a, lora)
                if "ppl" in row["llama_cpp"]:
                    row["llama_cpp"]["ppl_rel_diff"] = row["llama_cpp"]["ppl"] / ref - 1
                row["lopro_decode_tokens_per_s"] = lopro_decode(ck, prompt, a.new_tokens)
            rows.append(row)
            print_row(row)
    return {"model": a.model, "data": a.data, "seqlen": a.seqlen, "windows": a.windows, "nsamples": a.nsamples,
            "calib_seqlen": a.calib_seqlen, "threads": a.threads, "rows": rows}


def print_row(r: dict) -> None:
    ll = r.get("llama_cpp") or {}
    extra = ""
    if "ppl" in ll:
        extra = (f" | llama.cpp {ll['ppl']:.3f} ({100 * ll['ppl_rel_diff']:+.3f}%) "
                 f"{ll['decode_tokens_per_s']:.1f} tok/s vs lopro {r['lopro_decode_tokens_per_s']:.1f}")
    elif ll:
        extra = f" | llama.cpp failed: {ll.get('error')}"
    sys.stdout.write(f"{r['config']:<16} {r['format']:<14} {','.join(r['types']):<10} "
                     f"lopro {r['lopro_ppl_reference']:.3f} "
                     f"export {r['export_ppl']:.3f} ({100 * r['ppl_rel_diff']:+.4f}%) "
                     f"max|dW| {r['max_abs_weight_error']:.1e} {r['export_bytes'] / 2**20:.1f} MiB{extra}\n")
    sys.stdout.flush()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="method:bits:group_size, comma separated")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--data", default="wiki")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--default-backend", action="store_true",
                   help="also evaluate lopro.load's default (kernel) backend, beside the fp32 reference")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--llama-python", default=None, help="a Python with llama_cpp installed (separate venv)")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lopro-export-bench"),
                   help="checkpoints and exports (large: keep outside the repository)")
    p.add_argument("--out", default=str(RESULTS / "smollm2.json"))
    a = p.parse_args(argv)
    res = run(a)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, a.out)
    sys.stdout.write(f"wrote {a.out}\n")


if __name__ == "__main__":
    main()
