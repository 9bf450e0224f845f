"""Generation speed of packed models with the kernel backends (lopro.nn.backends), on CPU or CUDA.

Two parts, side by side in one run, every variant timed round-robin (one call each per round, so that
load changes hit all alike), medians of the repeats:

- ``layer``: one 4096x4096 layer at 1 token (decode) and 512 tokens (prefill): fp32 and bf16 dense
  ``nn.Linear``, packed GPTQ W2/W3/W4 g128 and LoPRo W2 g128 (rank 16 fp8, alpha, permutation,
  block rotation b_I = b_H = 128) under ``auto``, and the same GPTQ W2 / LoPRo layers on today's
  ``reference`` path for context. Then the int4-kernel / bf16-GEMM crossover: int4pack and dense
  at 1-256 tokens for W2/W3/W4 (what ``backends.INT4_MAX_TOKENS`` is set from).
- ``e2e``: SmolLM2-135M, a 512-token prompt (prefill) then 128 new tokens, greedy, with the KV cache
  (decode), for the fp32 and bf16 models and packed GPTQ W4 g64, GPTQ W2 g64, LoPRo W2 g64 r16 and
  LoPRo_v W2 (GPTVQ 2-D, 2 bits), all under ``auto``. SmolLM2's hidden size 576 is not a multiple of
  128, so the "W4 g128" row uses g64. The packed models are built from synthetic results (random
  codes and grids on SmolLM2's shapes: speed does not depend on the values), saved and reloaded with
  ``lopro.load``; ``--checkpoints DIR`` uses real folders ``DIR/<name>`` instead where they exist.
  RSS (after load, after one generation, peak) is measured in a fresh process per model.

  ``--e2e-model 7b --e2e-blocks N``: the same on a LLaMA-2-7B-shaped model (hidden 4096, intermediate 11008,
  vocab 32000, random weights) cut to N blocks so that its fp32 copy fits in memory, with GPTQ W4 at g128.

Run:  python benchmarks/bench_generate.py --threads 2 [--part layer|e2e|all] [--repeats 5]
      [--out benchmarks/results/generate/cpu.json]      (--table FILE reprints a result)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from lopro.linalg import BlockRotation, LowRank
from lopro.methods.base import LayerResult
from lopro.nn import backends as bk
from lopro.nn.qlinear import QuantLinear
from lopro.quant.rtn import ScalarQuant

LAYER = (4096, 4096)
CROSSOVER_TOKENS = (1, 16, 32, 64, 96, 128, 192, 256)
E2E_MODELS = {"smollm2": ("fp32", "bf16", "gptq-w4-g64", "gptq-w2-g64", "lopro-w2-g64-r16", "lopro-v-w2"),
              "7b": ("fp32", "bf16", "gptq-w4-g128", "gptq-w2-g64", "lopro-w2-g64-r16", "lopro-v-w2")}
VOCAB = {"smollm2": 49152, "7b": 32000}
E2E_CONFIGS = {"gptq-w4-g64": dict(kind="scalar", bits=4, group=64, lopro=False),
               "gptq-w4-g128": dict(kind="scalar", bits=4, group=128, lopro=False),
               "gptq-w2-g64": dict(kind="scalar", bits=2, group=64, lopro=False),
               "lopro-w2-g64-r16": dict(kind="scalar", bits=2, group=64, lopro=True),
               "lopro-v-w2": dict(kind="vq", bits=2, group=None, lopro=True)}


# --------------------------------------------------------------------------- synthetic layers

def synthetic_result(m: int, n: int, bits: int, group: int | None, lopro: bool, kind: str = "scalar",
                     rank: int = 16, block: int = 128, seed: int = 0) -> LayerResult:
    """Random codes and grids with the parts a method would produce (LoPRo: low rank, alpha, perm, rotation)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "scalar":
        G = -(-n // group)
        parts: dict = {"residual": ScalarQuant(torch.randint(0, 2**bits, (m, n), dtype=torch.uint8, generator=g),
                                            (torch.rand(m, G, generator=g) * 0.02 + 1e-3).half().float(),
                                            torch.randint(0, 2**bits, (m, G), generator=g).float(),
                                            torch.arange(n) // group, bits, False)}
    else:
        from lopro.quant.gptvq import VQConfig, VQLayout, VQResult

        cfg = VQConfig.for_bits(bits, n)
        lay = VQLayout.make(m, n, cfg)
        k = 2 ** (bits * lay.dim)
        parts = {"residual": VQResult(torch.zeros(m, n), torch.randint(0, k, (m, lay.n_pad // lay.dim), generator=g).to(
            torch.uint8 if k <= 256 else torch.int16),
            torch.randint(-127, 128, (lay.num_codebooks, k, lay.dim), generator=g).to(torch.int8),
            (torch.rand(lay.num_codebooks, generator=g) * 1e-3 + 1e-4).half(), lay, bits)}
    if lopro:
        parts["lowrank"] = LowRank((torch.randn(m, rank, generator=g) * 0.1).to(torch.float8_e4m3fn),
                                   (torch.rand(rank, generator=g) + 0.5).half(),
                                   (torch.randn(rank, n, generator=g) * 0.1).to(torch.float8_e4m3fn), "fp8")
        parts["alpha"] = (torch.rand(n, generator=g) + 0.5).half().float()
        parts["perm"] = torch.randperm(n, generator=g)
        parts["rotation"] = BlockRotation(n, block, block)
    return LayerResult(torch.zeros(m, n), **parts)


def packed_layer(m, n, bits, group, lopro, backend="auto", kind="scalar", device="cpu", seed=0) -> QuantLinear:
    layer = QuantLinear.from_result(synthetic_result(m, n, bits, group, lopro, kind, seed=seed)).to(device)
    holder = nn.Sequential(layer)
    bk.set_backend(holder, backend)
    return layer


# --------------------------------------------------------------------------- timing

def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def round_robin(fns: dict, repeats: int, device: str, budget_s: float) -> dict[str, float]:
    """Median seconds of each fn(), calls interleaved across fns."""
    for f in fns.values():  # warm up (kernel layouts, allocations, caches)
        f()
        f()
    sync(device)
    t0 = time.perf_counter()
    for f in fns.values():
        f()
    sync(device)
    one_round = time.perf_counter() - t0
    reps = int(max(repeats, min(200, budget_s / max(one_round, 1e-9))))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            sync(device)
            t = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_layer(a) -> dict:
    m, n = LAYER
    dev = a.device
    g = torch.Generator().manual_seed(0)
    dense32 = nn.Linear(n, m, bias=False).to(dev)
    dense16 = nn.Linear(n, m, bias=False).to(dev).to(torch.bfloat16)
    layers = {"fp32 dense": (dense32, torch.float32), "bf16 dense": (dense16, torch.bfloat16)}
    for bits in (2, 3, 4):
        layers[f"gptq W{bits} g128"] = (packed_layer(m, n, bits, 128, False, device=dev), torch.bfloat16)
    layers["lopro W2 g128 r16"] = (packed_layer(m, n, 2, 128, True, device=dev), torch.bfloat16)
    layers["gptq W2 g128 (reference fp32)"] = (packed_layer(m, n, 2, 128, False, "reference", device=dev),
                                               torch.float32)
    layers["lopro W2 g128 r16 (reference fp32)"] = (packed_layer(m, n, 2, 128, True, "reference", device=dev),
                                                    torch.float32)
    rows: dict[str, dict] = {k: {} for k in layers}
    with torch.inference_mode():
        for tokens in (1, 512):
            xs = {dt: torch.randn(tokens, n, generator=g).to(dev, dt) for dt in (torch.float32, torch.bfloat16)}
            fns = {k: (lambda mod=mod, x=xs[dt]: mod(x)) for k, (mod, dt) in layers.items()}
            med = round_robin(fns, a.repeats, dev, a.budget if tokens == 1 else 4 * a.budget)
            for k, t in med.items():
                rows[k][f"ms_{tokens}"] = t * 1e3
        cross: dict[str, dict] = {}
        for bits in (2, 3, 4):
            lay = packed_layer(m, n, bits, 128, False, device=dev)
            int4 = bk.Kernel("int4pack", torch.bfloat16)
            dense = bk.Kernel("dense", torch.bfloat16)
            res = {}
            for tokens in CROSSOVER_TOKENS:
                x = torch.randn(tokens, n, generator=g).to(dev, torch.bfloat16)
                med = round_robin({"int4pack": lambda: int4(lay, x), "dense": lambda: dense(lay, x)},
                                  a.repeats, dev, a.budget)
                res[tokens] = {k: v * 1e3 for k, v in med.items()}
            faster = [t for t in CROSSOVER_TOKENS if res[t]["dense"] < res[t]["int4pack"]]
            cross[f"W{bits}"] = {"ms": res, "dense_faster_from": faster[0] if faster else None}
    ref = rows["fp32 dense"]
    for k, r in rows.items():
        r["x_fp32_1"] = r["ms_1"] / ref["ms_1"]
        r["x_fp32_512"] = r["ms_512"] / ref["ms_512"]
        r["x_bf16_512"] = r["ms_512"] / rows["bf16 dense"]["ms_512"]
    rows["lopro W2 g128 r16"]["x_gptq_w2_1"] = rows["lopro W2 g128 r16"]["ms_1"] / rows["gptq W2 g128"]["ms_1"]
    return {"shape": list(LAYER), "rows": rows, "crossover": cross,
            "max_int4_tokens": bk.INT4_MAX_TOKENS.get(torch.device(dev).type)}


# --------------------------------------------------------------------------- end to end

def fp_model(dtype: torch.dtype, device: str, shape: str = "smollm2", blocks: int = 4):
    """SmolLM2-135M, or a LLaMA-2-7B-shaped model (hidden 4096, intermediate 11008, 32 heads, vocab 32000)
    cut to `blocks` blocks with seeded random weights (speed does not depend on the values)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from lopro.data.assets import resolve_builtin_model

    if shape == "smollm2":
        model = AutoModelForCausalLM.from_pretrained(resolve_builtin_model("smollm2-135m"), dtype=dtype)
        return model.eval().to(device)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=blocks, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=VOCAB["7b"], max_position_embeddings=4096,
                      tie_word_embeddings=False)
    torch.manual_seed(0)  # transformers' own initialisation, seeded
    return LlamaForCausalLM(cfg).eval().to(device=device, dtype=dtype)


def build_synthetic_checkpoint(name: str, folder: Path, shape: str = "smollm2", blocks: int = 4) -> Path:
    """The model with every block linear replaced by a synthetic packed layer, saved to folder/name."""
    from lopro.io import checkpoint as ck
    from lopro.model.surgery import get_submodule_parent

    out = folder / f"{shape}-{blocks}-{name}" if shape != "smollm2" else folder / name
    if (out / "config.json").exists():
        return out
    c = E2E_CONFIGS[name]
    model = fp_model(torch.float32, "cpu", shape, blocks)
    targets = [(full, mod) for full, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and ".layers." in f".{full}"]
    for i, (full, mod) in enumerate(targets):
        parent, attr = get_submodule_parent(model, full)
        setattr(parent, attr, QuantLinear.from_result(synthetic_result(
            mod.out_features, mod.in_features, c["bits"], c["group"], c["lopro"], c["kind"], seed=i)))
    ck.save(model, out, config={"method": name})
    return out


def model_source(name: str, a, scratch: Path) -> str:
    if name in ("fp32", "bf16"):
        return name
    if a.checkpoints and (Path(a.checkpoints) / name / "config.json").exists():
        return str(Path(a.checkpoints) / name)
    return str(build_synthetic_checkpoint(name, scratch, a.e2e_model, a.e2e_blocks))


def load_source(source: str, device: str, backend: str = "auto", shape: str = "smollm2", blocks: int = 4):
    import lopro

    if source in ("fp32", "bf16"):
        return fp_model(torch.float32 if source == "fp32" else torch.bfloat16, device, shape, blocks)
    return lopro.load(source, device=device, backend=backend)


def generate(model, ids: torch.Tensor, new_tokens: int, device: str) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, decode seconds for `new_tokens` tokens, the tokens), greedy with the KV cache."""
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        sync(device)
        t1 = time.perf_counter()
        past, got = out.past_key_values, [tok]
        for _ in range(new_tokens - 1):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            got.append(tok)
        sync(device)
        t2 = time.perf_counter()
    # the first new token comes from the prefill; decode time covers the other new_tokens - 1, scaled
    return t1 - t0, (t2 - t1) * new_tokens / max(new_tokens - 1, 1), torch.cat(got, 1)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def hiwater_mib() -> float:
    """This process's own peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries the parent's high-water
    mark across fork + exec into it, so every child reported at least the benchmark process's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_child(a) -> None:
    """One model in a fresh process: RSS after load, after one generation, and the peak."""
    torch.set_num_threads(a.threads)
    base = rss_mib()
    model = load_source(a.rss_child, a.device, shape=a.e2e_model, blocks=a.e2e_blocks)
    loaded = rss_mib()
    ids = torch.randint(0, VOCAB[a.e2e_model], (1, a.prompt_tokens), generator=torch.Generator().manual_seed(0)).to(a.device)
    generate(model, ids, a.new_tokens, a.device)
    after = rss_mib()
    peak = hiwater_mib()
    sys.stdout.write(json.dumps({"rss_base_mib": base, "rss_load_mib": loaded, "rss_gen_mib": after,
                                 "rss_peak_mib": peak}) + "\n")


def bench_e2e(a) -> dict:
    scratch = Path(a.scratch or tempfile.mkdtemp(prefix="bench-generate-"))
    scratch.mkdir(parents=True, exist_ok=True)
    sources = {name: model_source(name, a, scratch) for name in E2E_MODELS[a.e2e_model]}
    models = {name: load_source(src, a.device, shape=a.e2e_model, blocks=a.e2e_blocks) for name, src in sources.items()}
    plans = {name: dict(sorted(_count(bk.backend_choices(m)).items())) for name, m in models.items()
             if name not in ("fp32", "bf16")}
    ids = torch.randint(0, VOCAB[a.e2e_model], (1, a.prompt_tokens),
                        generator=torch.Generator().manual_seed(0)).to(a.device)
    for m in models.values():  # warm up: kernel layouts, allocator, caches
        generate(m, ids[:, :64], 4, a.device)
    times: dict[str, dict[str, list]] = {k: {"prefill": [], "decode": []} for k in models}
    for _ in range(a.e2e_repeats):
        for name, m in models.items():
            p, d, _ = generate(m, ids, a.new_tokens, a.device)
            times[name]["prefill"].append(p)
            times[name]["decode"].append(d)
    rows = {}
    for name in models:
        p, d = statistics.median(times[name]["prefill"]), statistics.median(times[name]["decode"])
        rows[name] = {"source": "real" if a.checkpoints and sources[name].startswith(str(a.checkpoints))
                      else ("fp" if name in ("fp32", "bf16") else "synthetic"),
                      "prefill_s": p, "decode_s": d, "prefill_tok_s": a.prompt_tokens / p,
                      "decode_tok_s": a.new_tokens / d, "backends": plans.get(name)}
    del models
    for name, src in sources.items():
        if a.no_rss:
            break
        cmd = [sys.executable, __file__, "--rss-child", src, "--threads", str(a.threads), "--device", a.device,
               "--e2e-model", a.e2e_model, "--e2e-blocks", str(a.e2e_blocks),
               "--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[name].update(json.loads(res.stdout.strip().splitlines()[-1]))
    for r in rows.values():
        r["decode_x_fp32"] = r["decode_tok_s"] / rows["fp32"]["decode_tok_s"]
        r["prefill_x_fp32"] = r["prefill_tok_s"] / rows["fp32"]["prefill_tok_s"]
    model = "smollm2-135m" if a.e2e_model == "smollm2" else f"7B-shaped, {a.e2e_blocks} blocks (random weights)"
    return {"model": model, "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
            "repeats": a.e2e_repeats, "rows": rows}


def _count(choices: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in choices.values():
        out[c] = out.get(c, 0) + 1
    return out


# --------------------------------------------------------------------------- report

def table(res: dict) -> str:
    lines = []
    lay = res.get("layer")
    if lay:
        lines += [f"\nlayer {lay['shape'][0]}x{lay['shape'][1]} ({res['threads']} threads, {res['device']}), "
                  "medians, ms", "", "| layer | 1 token | x fp32 | 512 tokens | x fp32 | x bf16 |",
                  "|---|---:|---:|---:|---:|---:|"]
        for k, r in lay["rows"].items():
            lines.append(f"| {k} | {r['ms_1']:.3f} | {r['x_fp32_1']:.3f} | {r['ms_512']:.1f} | "
                         f"{r['x_fp32_512']:.3f} | {r['x_bf16_512']:.2f} |")
        lo = lay["rows"]["lopro W2 g128 r16"]
        lines.append(f"\nLoPRo W2 / packed GPTQ W2 at 1 token: {lo['x_gptq_w2_1']:.3f}x")
        lines += ["", "crossover (ms, int4pack / dense):", "",
                  "| bits | " + " | ".join(str(t) for t in CROSSOVER_TOKENS) + " | dense faster from |",
                  "|---|" + "---:|" * (len(CROSSOVER_TOKENS) + 1)]
        for b, c in lay["crossover"].items():
            ms = c["ms"]
            lines.append(f"| {b} | " + " | ".join(f"{v['int4pack']:.2f} / {v['dense']:.2f}" for v in ms.values())
                         + f" | {c['dense_faster_from']} |")
    e2e = res.get("e2e")
    if e2e:
        lines += [f"\n{e2e['model']} end to end: {e2e['prompt_tokens']}-token prefill, {e2e['new_tokens']} new "
                  f"tokens greedy with KV cache ({res['threads']} threads, medians of {e2e['repeats']})", "",
                  "| model | weights | prefill tok/s | decode tok/s | decode x fp32 | RSS load / gen / peak MiB |",
                  "|---|---|---:|---:|---:|---:|"]
        for k, r in e2e["rows"].items():
            rss = (f"{r['rss_load_mib']:.0f} / {r['rss_gen_mib']:.0f} / {r['rss_peak_mib']:.0f}"
                   if "rss_load_mib" in r else "-")
            lines.append(f"| {k} | {r['source']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                         f"{r['decode_x_fp32']:.2f} | {rss} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["layer", "e2e", "all"], default="all")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=7, help="least rounds of each per-layer timing")
    p.add_argument("--budget", type=float, default=3.0, help="seconds per per-layer timing group (1 token)")
    p.add_argument("--e2e-repeats", type=int, default=3)
    p.add_argument("--e2e-model", choices=["smollm2", "7b"], default="smollm2",
                   help="e2e on SmolLM2-135M or on a LLaMA-2-7B-shaped model cut to --e2e-blocks blocks")
    p.add_argument("--e2e-blocks", type=int, default=4, help="blocks of the 7B-shaped model (fp32 must fit in RAM)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--checkpoints", default=None, help="folder of real packed checkpoints named as in E2E_MODELS")
    p.add_argument("--scratch", default=None, help="where the synthetic checkpoints are written (default: a temp dir)")
    p.add_argument("--no-rss", action="store_true", help="skip the per-model RSS processes")
    p.add_argument("--out", default="benchmarks/results/generate/cpu.json")
    p.add_argument("--table", default=None, help="reprint the table of a result file")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.table:
        sys.stdout.write(table(json.loads(Path(a.table).read_text())))
        return
    if a.rss_child:
        rss_child(a)
        return
    torch.set_num_threads(a.threads)
    res: dict = {"threads": a.threads, "device": a.device, "torch": torch.__version__,
                 "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
                 "busy_flag": os.path.exists("/tmp/lopro-busy"), "command": " ".join(sys.argv)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write():  # after each part, so that a part that finished is kept
        res["busy_flag_end"] = os.path.exists("/tmp/lopro-busy")
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1, default=str))
        os.replace(tmp, out)

    if a.part in ("layer", "all"):
        res["layer"] = bench_layer(a)
        write()
        sys.stdout.write(table({**res, "e2e": None}))
        sys.stdout.flush()
    if a.part in ("e2e", "all"):
        res["e2e"] = bench_e2e(a)
        write()
        sys.stdout.write(table({**res, "layer": None}))


if __name__ == "__main__":
    main()
