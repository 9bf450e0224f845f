"""Models larger than memory: a LLaMA-2-7B-shaped fp32 checkpoint (27 GB, more than this machine's RAM)
quantized end to end by the streaming pipeline, then reloaded, evaluated and generated from.

    python benchmarks/bench_scale.py --scratch /scratch/lopro-7b                 # build + GPTQ W4 + LoPRo W2
    python benchmarks/bench_scale.py --scratch DIR --runs gptq --resume-check    # + SIGKILL / --resume bytes
    python benchmarks/bench_scale.py --scratch DIR --layers 2 --runs gptq        # a cut model, same width

The model has random weights with a decaying singular spectrum in every matrix (a rank-32 part with
falling scales above a Gaussian bulk), so Hessians, the low rank and GPTQ do real work; its perplexity
means nothing, its memory, time and bytes do. Each run is a separate `lopro quantize` process; its peak
RSS is the kernel's high-water mark for that process (getrusage of the child), beside the pipeline's own
sampled peak. JSON is rewritten after every step (benchmarks/results/scale/). Delete --scratch after.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "rtn": ["--method", "rtn", "--bits", "4", "--group-size", "128"],
    "gptq": ["--method", "gptq", "--bits", "4", "--group-size", "128"],
    "lopro": ["--method", "lopro", "--bits", "2", "--group-size", "64", "--rank", "16"],
}


def build(folder: Path, layers: int, seed: int = 0) -> None:
    """LLaMA-2-7B shapes (vocab: SmolLM2's tokenizer's 49152), written block by block as fp32 shards."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from lopro.data.assets import resolve_builtin_model

    if (folder / "model.safetensors.index.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=49152, max_position_embeddings=4096, tie_word_embeddings=False,
                      torch_dtype="float32")
    cfg.save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_builtin_model("smollm2-135m")).save_pretrained(folder)
    shapes = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
              "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
              "mlp.down_proj": (4096, 11008)}
    weight_map, total = {}, 0

    def matrix(m, n, g):
        W = torch.randn(m, n, generator=g) * 0.02                     # bulk: top singular value ~0.02 (sqrt m + sqrt n)
        U = torch.randn(m, 32, generator=g) / m ** 0.5
        V = torch.randn(32, n, generator=g) / n ** 0.5
        s = 10 * 0.02 * (m ** 0.5 + n ** 0.5) / torch.arange(1, 33).float() ** 0.5  # all 32 above the bulk
        return W.addmm_(U * s, V)

    def write(name, tensors):
        nonlocal total
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * 4 for t in tensors.values())

    nfiles = layers + 1
    for i in range(layers):
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        t = {f"model.layers.{i}.{k}.weight": matrix(m, n, g) for k, (m, n) in shapes.items()}
        t[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(4096)
        t[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(4096)
        write(f"model-{i + 1:05d}-of-{nfiles:05d}.safetensors", t)
        print(f"built block {i}", flush=True)
    g = torch.Generator().manual_seed(seed * 100_003 + 99_999)
    write(f"model-{nfiles:05d}-of-{nfiles:05d}.safetensors",
          {"model.embed_tokens.weight": torch.randn(49152, 4096, generator=g) * 0.02,
           "model.norm.weight": torch.ones(4096), "lm_head.weight": torch.randn(49152, 4096, generator=g) * 0.02})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def lopro(*args, env=None, kill_after_blocks: int | None = None, work: Path | None = None) -> dict:
    """Run `python -m lopro.cli ARGS` as its own process; its wall time, peak RSS and exit code."""
    cmd = [sys.executable, "-m", "lopro.cli", *args]
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = False
    if kill_after_blocks is not None:  # SIGKILL once that many blocks are in the manifest, plus a random delay
        rng = random.Random(kill_after_blocks)
        while proc.poll() is None:
            if _blocks_done(work) >= kill_after_blocks:
                time.sleep(rng.uniform(0, 2.0))
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.5)
    out, err = proc.communicate()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    res = {"cmd": " ".join(["lopro", *args]), "rc": proc.returncode, "wall_s": time.perf_counter() - t0,
           "peak_rss_child_bytes": peak * 1024 if peak > before else None, "killed": killed,
           "stderr_tail": err[-1500:]}
    if out.strip().startswith("{"):
        res["json"] = json.loads(out)
    return res


def _blocks_done(work: Path) -> int:
    try:
        return len(json.loads((work / "manifest.json").read_text())["body"]["blocks"])
    except (OSError, ValueError, KeyError):
        return 0


def block_shards(folder: Path) -> dict[int, str]:
    """Block index -> SHA-256 over its tensors' names and bytes (whatever file holds them)."""
    from safetensors import safe_open

    h: dict[int, "hashlib._Hash"] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for name in sorted(fh.keys()):
                if name.startswith("model.layers."):
                    k = int(name.split(".")[2])
                    t = fh.get_tensor(name).contiguous().reshape(-1).view(torch.uint8)
                    h.setdefault(k, hashlib.sha256()).update(name.encode() + t.numpy().tobytes())
    return {k: v.hexdigest() for k, v in h.items()}


def shard_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def check_partial(dest: Path, reference: str | None, out: Path) -> int:
    """Per-block profiles and byte equality of the blocks an unfinished (stopped) run has written."""
    work = dest.parent / f".{dest.name}.partial"
    body = json.loads((work / "manifest.json").read_text())["body"]
    mine = block_shards(work)
    res = {"work": str(work), "blocks_finished": len(body["blocks"]), "profiles": [b["profile"] for b in body["blocks"]],
           "shard_bytes": [b["bytes"] for b in body["blocks"]]}
    if reference:
        theirs = block_shards(Path(reference.format(name=dest.name.split("-")[1])))
        done = [b["index"] for b in body["blocks"]]
        common = [k for k in done if k in theirs]
        res["reference_check"] = {"reference": reference, "blocks_compared": common,
                                  "byte_identical": bool(common) and all(mine[k] == theirs[k] for k in common)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    for prof in res["profiles"]:
        print("block {block}: read {read_s:.1f} s, forwards {forwards_s:.1f} s, solves {solve_s:.1f} s, "
              "propagation {propagate_s:.1f} s, write {write_s:.1f} s".format(**prof))
    print("reference check:", res.get("reference_check"))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scratch", required=True, help="folder outside the repo for the 27 GB model and the outputs")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--runs", default="gptq,lopro", help=f"comma list of {sorted(RUNS)}")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume-check", action="store_true", help="also SIGKILL a GPTQ run mid-way and --resume it")
    p.add_argument("--kill-after-blocks", type=int, default=None,
                   help="SIGKILL each main run once this many blocks are finished (plus a random delay), then "
                        "rerun it with --resume: the resumed run is the one measured")
    p.add_argument("--reference", default=None,
                   help="an output folder of the same model cut to fewer layers (same seeds, so the same first "
                        "blocks): each of its block shards must equal this run's, byte for byte")
    p.add_argument("--eval-windows", type=int, default=2)
    p.add_argument("--fp-eval", action="store_true", help="also the streamed perplexity of the fp model")
    p.add_argument("--check-partial", default=None, metavar="RUN",
                   help="no new run: read the unfinished folder of RUN (its manifest's per-block profiles) and, "
                        "with --reference, compare its finished blocks' tensors to the reference's")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/scale/bench_scale.json"))
    a = p.parse_args(argv)
    if a.check_partial:
        return check_partial(Path(a.scratch) / f"out-{a.check_partial}-{a.layers}l", a.reference, Path(a.out))
    scratch = Path(a.scratch)
    model = scratch / f"llama7b-shape-{a.layers}l"
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    results = {"layers": a.layers, "nsamples": a.nsamples, "seqlen": a.seqlen, "threads": a.threads,
               "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "runs": {}}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def dump():
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out)

    t0 = time.perf_counter()
    build(model, a.layers)
    results["model_bytes_on_disk"] = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    results["build_s"] = time.perf_counter() - t0
    dump()
    common = ["--model", str(model), "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--calib-data", "wiki",
              "--device", "cpu", "--json"]
    if a.fp_eval:
        results["fp_eval"] = lopro("eval", "--model", str(model), "--windows", str(a.eval_windows), "--seqlen",
                                   str(a.seqlen), "--device", "cpu", "--json", env=env)
        dump()
    for name in a.runs.split(","):
        dest = scratch / f"out-{name}-{a.layers}l"
        args = [*common, *RUNS[name], "--out", str(dest)]
        if a.kill_after_blocks:
            killed = lopro("quantize", *args, "--overwrite", env=env, kill_after_blocks=a.kill_after_blocks,
                           work=dest.parent / f".{dest.name}.partial")
            run = {"killed": killed, "quantize": lopro("quantize", *args, "--resume", env=env)}
        else:
            run = {"quantize": lopro("quantize", *args, "--overwrite", env=env)}
        results["runs"][name] = run
        dump()
        if run["quantize"]["rc"] != 0:
            print(run["quantize"]["stderr_tail"], file=sys.stderr)
            continue
        report = json.loads((dest / "report.json").read_text())
        run["blocks"] = report["blocks"]
        run["summary"] = report["summary"]
        run["checkpoint_bytes"] = sum(f.stat().st_size for f in dest.glob("*.safetensors"))
        if a.reference:
            ref = Path(a.reference.format(name=name))
            mine, theirs = block_shards(dest), block_shards(ref)
            common_blocks = sorted(set(mine) & set(theirs))
            run["reference_check"] = {"reference": str(ref), "blocks_compared": common_blocks,
                                      "byte_identical": bool(common_blocks) and all(mine[b] == theirs[b]
                                                                                    for b in common_blocks)}
        run["eval"] = lopro("eval", "--model", str(dest), "--windows", str(a.eval_windows), "--seqlen", str(a.seqlen),
                            "--device", "cpu", "--json", env=env)
        run["generate"] = lopro("generate", "--model", str(dest), "--prompt", "The capital of France is",
                                "--max-new-tokens", "4", "--device", "cpu", "--json", env=env)
        dump()
        if a.resume_check and name == "gptq":
            cut = scratch / f"out-{name}-{a.layers}l-resumed"
            work = cut.parent / f".{cut.name}.partial"
            k = max(1, a.layers // 3)
            first = lopro("quantize", *common, *RUNS[name], "--out", str(cut), "--overwrite", env=env,
                          kill_after_blocks=k, work=work)
            second = lopro("quantize", *common, *RUNS[name], "--out", str(cut), "--resume", env=env)
            same = second["rc"] == 0 and shard_hashes(cut) == shard_hashes(dest)
            run["resume"] = {"killed_after_blocks": k, "first": first, "second": second, "byte_identical": same}
            dump()
    for name, run in results["runs"].items():
        q = run["quantize"]
        s = run.get("summary", {})
        print(f"{name:6s} rc={q['rc']} wall {q['wall_s']:.0f} s  peak RSS {(q['peak_rss_child_bytes'] or 0) / 2**30:.2f} "
              f"GiB  read {s.get('bytes_read', 0) / 2**30:.1f} GiB  written {s.get('bytes_written', 0) / 2**30:.2f} GiB  "
              f"eval ppl {run.get('eval', {}).get('json', {}).get('ppl')}  resume identical "
              f"{run.get('resume', {}).get('byte_identical')}")
    dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
