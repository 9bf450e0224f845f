"""Command line: `lopro quantize | eval | methods`."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

log = logging.getLogger("lopro")


class _TqdmHandler(logging.Handler):
    """Log lines that do not break the progress bars."""

    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stderr)


def _setup_logging(verbose: bool) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("lopro")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    root.propagate = False


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    from lopro.config import QuantConfig

    d = QuantConfig()
    p.add_argument("--method", default=d.method)
    p.add_argument("--bits", type=int, default=d.bits)
    p.add_argument("--group-size", type=int, default=d.group_size, help="-1 = per output channel")
    p.add_argument("--sym", action="store_true")
    p.add_argument("--desc-act", action="store_true", help="GPTQ act-order")
    p.add_argument("--mse", action="store_true", help="clipping search for each group's grid")
    p.add_argument("--damp-percent", type=float, default=d.damp_percent)
    p.add_argument("--no-true-sequential", dest="true_sequential", action="store_false")
    p.add_argument("--propagate", choices=["quantized", "fp"], default=d.propagate,
                   help="feed each block the quantized (default) or the fp model's activations")
    p.add_argument("--rank", type=_rank_arg, default=d.rank, help="an integer, or 'auto' for per-layer ranks (R1-FLR)")
    p.add_argument("--rank-dtype", choices=["fp8", "fp16", "fp32"], default=None,
                   help=f"low-rank factor storage (default: fp16 for flrq, {d.rank_dtype} otherwise)")
    p.add_argument("--bits-budget", type=float, default=None,
                   help="effective bits per weight each layer may spend; the low-rank ranks are chosen to fit")
    p.add_argument("--lowrank-solver", choices=["r1svd", "svd"], default=d.lowrank_solver)
    p.add_argument("--power-iters", type=int, default=d.power_iters)
    p.add_argument("--block-identity", type=int, default=d.block_identity)
    p.add_argument("--block-hadamard", type=int, default=d.block_hadamard)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method-specific option (repeatable), e.g. --option hessian_dtype=fp64")
    p.add_argument("--seed", type=int, default=d.seed)


def parse_options(items: list[str]) -> dict:
    """KEY=VALUE strings (values as JSON where they parse) -> QuantConfig.options."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--option expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _rank_arg(v: str):
    return v if v == "auto" else int(v)


def _at_least(lo: int):
    """An argparse type: an integer >= lo, refused by argparse (exit 2, one line) otherwise."""
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {n}")
        return n
    parse.__name__ = f"integer >= {lo}"
    return parse


def _device_arg(v: str) -> str:
    from lopro.device import resolve_device

    try:
        resolve_device(v)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return v


class PartialFailure(RuntimeError):
    """Some of the work failed; what succeeded was written (exit code 1)."""


def config_from_args(a):
    from lopro.config import QuantConfig
    from lopro.methods import get_method

    spec = get_method(a.method)
    options = parse_options(a.option)
    if a.rank == "auto":
        options.setdefault("rank_mode", "auto")
    if a.bits_budget is not None:
        options.setdefault("bits_budget", a.bits_budget)
    rank_dtype = a.rank_dtype or spec.default_rank_dtype
    return QuantConfig(method=a.method, bits=a.bits, group_size=a.group_size, sym=a.sym, desc_act=a.desc_act,
                       mse=a.mse, damp_percent=a.damp_percent, true_sequential=a.true_sequential,
                       propagate=a.propagate, rank=QuantConfig.rank if a.rank == "auto" else a.rank,
                       rank_dtype=rank_dtype,
                       lowrank_solver=a.lowrank_solver, power_iters=a.power_iters,
                       block_identity=a.block_identity, block_hadamard=a.block_hadamard,
                       options=options, seed=a.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lopro", description="Post-training low-bit quantization of LLMs")
    p.add_argument("-v", "--verbose", action="store_true", help="per-module log lines")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and write it to --out")
    q.add_argument("--model", required=True, help="built-in name (smollm2-135m) or a local model folder")
    _add_quant_args(q)
    q.add_argument("--calib-data", default="wiki", help="wiki, news, or a .txt/.jsonl path")
    q.add_argument("--nsamples", type=_at_least(1), default=128)
    q.add_argument("--seqlen", type=_at_least(2), default=512)
    q.add_argument("--batch-size", type=_at_least(1), default=8)
    q.add_argument("--stats-cache", default=None, help="folder to reuse fp statistics (with --propagate fp)")
    q.add_argument("--device", type=_device_arg, default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    q.add_argument("--out", required=True)
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    q.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same command after its last finished block")
    q.add_argument("--offload", choices=["auto", "ram", "disk"], default="auto",
                   help="where calibration activations live: RAM, files beside --out, or auto (disk when they "
                        "would not fit in free memory)")
    q.add_argument("--fp-dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="storage of the unquantized tensors (embeddings, norms); auto = narrowest exact dtype")
    q.add_argument("--fake", action="store_true",
                   help="write the fake-quantized fp model (dense dequantized weights) instead of the packed checkpoint")
    q.add_argument("--json", action="store_true", help="print a JSON summary on stdout")

    e = sub.add_parser("eval", help="perplexity of a model on a corpus")
    e.add_argument("--model", required=True)
    e.add_argument("--data", default="wiki", help="wiki, news, or a .txt/.jsonl path")
    e.add_argument("--seqlen", type=_at_least(2), default=512)
    e.add_argument("--windows", type=_at_least(1), default=None, help="number of windows (default: all)")
    e.add_argument("--bos", action="store_true", help="put BOS first in each window")
    e.add_argument("--batch-size", type=_at_least(1), default=4)
    e.add_argument("--device", type=_device_arg, default=None)
    _add_backend_arg(e)
    e.add_argument("--json", action="store_true")

    c = sub.add_parser("compare", help="quantize and evaluate a grid of methods x bits; cached per entry")
    c.add_argument("--model", default="smollm2-135m")
    c.add_argument("--methods", default="fp,rtn,gptq,lopro", help="comma list of methods, 'fp' = unquantized")
    c.add_argument("--bits", default="2,3", help="comma list")
    c.add_argument("--group-size", type=int, default=64)
    c.add_argument("--rank", default="16", help="an integer, or 'auto' for per-layer ranks (R1-FLR)")
    c.add_argument("--rank-dtype", choices=["fp8", "fp16", "fp32"], default=None,
                   help="low-rank factor storage (default: fp16 for flrq, fp8 otherwise)")
    c.add_argument("--data", default="wiki,news", help="evaluation corpora, comma list")
    c.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,winogrande,hellaswag",
                   help="zero-shot tasks, comma list ('' = none)")
    c.add_argument("--limit", type=int, default=100,
                   help="examples per task, a seeded subset (0 = the whole task; 100 keeps a grid to minutes on CPU)")
    c.add_argument("--calib-data", default="wiki")
    c.add_argument("--nsamples", type=_at_least(1), default=128)
    c.add_argument("--seqlen", type=_at_least(2), default=512)
    c.add_argument("--windows", type=_at_least(0), default=32, help="evaluation windows per corpus (0 = the whole split)")
    c.add_argument("--propagate", choices=["fp", "quantized"], default="quantized",
                   help="fp: share the fp model's statistics across all entries (fast); quantized: GPTQ-style")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--seeds", default=None, help="comma list: run the grid once per calibration seed and report "
                   "each perplexity's mean and standard deviation (overrides --seed)")
    c.add_argument("--threads", type=_at_least(1), default=None, help="torch threads (recorded in each entry's key)")
    c.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="option for every configuration (repeatable), e.g. --option forward_dtype=fp32")
    c.add_argument("--device", type=_device_arg, default=None)
    c.add_argument("--out", default="compare-results")

    g = sub.add_parser("generate", help="greedy generation from a model or packed checkpoint")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", required=True, action="append", help="repeatable")
    g.add_argument("--max-new-tokens", type=_at_least(1), default=64)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--device", type=_device_arg, default=None)
    _add_backend_arg(g)
    g.add_argument("--json", action="store_true")

    i = sub.add_parser("info", help="config, effective bits and size of a packed checkpoint")
    i.add_argument("folder")
    i.add_argument("--verify", action="store_true",
                   help="also check every file's SHA-256 and every scale and factor for NaN/inf")
    _add_backend_arg(i)
    i.add_argument("--json", action="store_true")

    _add_export_parser(sub)
    sub.add_parser("demo", help="LoPRo W3 beside GPTQ W3 and FP on the built-in SmolLM2 (small calibration, minutes)")
    sub.add_parser("methods", help="list the registered methods")
    return p


def cmd_quantize(a) -> dict:
    from lopro.jobs import quantize_to_folder

    cfg = config_from_args(a)
    if a.stats_cache and cfg.propagate != "fp":
        raise ValueError("--stats-cache reuses the fp model's statistics, so it needs --propagate fp "
                         "(the default, quantized, recomputes them after every quantized block)")
    summary = quantize_to_folder(a.model, cfg, a.out, calib_data=a.calib_data, nsamples=a.nsamples,
                                 seqlen=a.seqlen, batch_size=a.batch_size, device=a.device,
                                 overwrite=a.overwrite, stats_cache=a.stats_cache, packed=not a.fake,
                                 fp_dtype=a.fp_dtype, resume=a.resume, offload=a.offload)
    prof = summary["profile_seconds"]
    log.warning("wrote %s: effective bits %.3f, %.1f s (capture %.1f, read %.1f, forwards %.1f, Hessians %.1f, "
                "solves %.1f, propagation %.1f, write %.1f), peak RSS %.2f GiB%s", a.out, summary["effective_bits"],
                summary["quant_seconds"], prof["capture_s"], prof["read_s"], prof["forwards_s"], prof["hessian_s"],
                prof["solve_s"], prof["propagate_s"], prof["write_s"],
                summary["peak_rss_bytes"] / 2**30,
                f", peak GPU {summary['peak_gpu_bytes'] / 2**30:.2f} GiB" if summary["peak_gpu_bytes"] else "")
    return summary


def _add_backend_arg(p: argparse.ArgumentParser) -> None:
    from lopro.nn.backends import BACKENDS

    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="kernels of a packed checkpoint's layers (auto: int4 kernel for decode, bf16 GEMM for "
                        "prefill, in bf16; reference: the dequantizing path in fp32)")


def _load_for_inference(name: str, device, backend: str):
    """(model, tokenizer): a packed checkpoint loads with `backend`, any other model as load_model does."""
    from lopro.io.checkpoint import is_lopro_checkpoint, load
    from lopro.device import default_device
    from lopro.io.loading import load_model, load_tokenizer

    tok, path = load_tokenizer(name)
    if is_lopro_checkpoint(path):
        return load(path, device=device or default_device(), dtype=torch.float32, backend=backend), tok
    model, tok, _ = load_model(name, device=device)
    return model, tok


def cmd_eval(a) -> dict:
    from lopro.jobs import evaluate_ppl

    from lopro.io.checkpoint import is_lopro_checkpoint
    from lopro.io.loading import resolve_model_path

    if is_lopro_checkpoint(resolve_model_path(a.model)):
        model, tok = _load_for_inference(a.model, a.device, a.backend)
    else:  # an fp model is streamed block by block from its folder: any size fits
        model, tok = a.model, None
    res = evaluate_ppl(model, a.data, seqlen=a.seqlen, windows=a.windows, bos=a.bos,
                       batch_size=a.batch_size, device=a.device, tokenizer=tok)
    log.warning("perplexity on %s (seqlen %d, %d tokens): %.3f", res["data"], res["seqlen"], res["tokens"],
                res["ppl"])
    return res


def cmd_generate(a) -> dict:
    model, tok = _load_for_inference(a.model, a.device, a.backend)
    device = next(model.parameters()).device
    outputs = []
    for prompt in a.prompt:
        text = prompt
        if a.chat:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
        ids = tok(text, return_tensors="pt").to(device)
        out = model.generate(**ids, max_new_tokens=a.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        completion = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        outputs.append({"prompt": prompt, "completion": completion})
    return {"model": a.model, "outputs": outputs}


def cmd_info(a) -> dict:
    from lopro.io.checkpoint import checkpoint_info, verify_folder

    from lopro.nn.backends import plan_specs
    from lopro.io.checkpoint import read_quantization_config
    from lopro.device import default_device

    info = checkpoint_info(a.folder)
    info["backend"] = plan_specs(read_quantization_config(a.folder)["modules"], a.backend,
                                 device=default_device())
    if a.verify:
        verify_folder(a.folder, data=True)
        info["verified"] = True
    return info


def _print_info(info: dict) -> None:
    mib = 1024**2
    lines = [f"{info['folder']}: packed {info['method']} W{info['bits']} g{info['group_size']}"
             + (f" rank {info['rank']} {info['rank_dtype']}" if info.get("rank") else ""),
             f"  effective bits   {info['effective_bits']:.4f} (stored bytes x 8 / quantized params)",
             f"  quantized        {info['quantized_layers']} layers, {info['quantized_params']:,} params, "
             f"{info['quantized_bytes'] / mib:.2f} MiB",
             f"  unquantized      {info['unquantized_bytes'] / mib:.2f} MiB (embeddings, norms, head)",
             f"  on disk          {info['weights_bytes'] / mib:.2f} MiB weights, {info['folder_bytes'] / mib:.2f} MiB folder",
             f"  lopro {info['lopro_version']}, calibration sha256 {info['calibration_sha256']}",
             f"  hadamard {info['hadamard_convention']}" + ("  [verified]" if info.get("verified") else ""),
             "  config " + json.dumps(info["quant_config"], sort_keys=True)]
    b = info.get("backend")
    if b:
        lines.insert(-1, f"  backend          {b['backend']} on {b['device']} ({b['dtype']}): "
                     + ", ".join(f"{k} {v}" for k, v in sorted(b["layers"].items()))
                     + (f" (int4 kernel up to {b['max_int4_tokens']} tokens a call)"
                        if "int4pack+dense" in b["layers"] else "")
                     + "".join(f"; not int4: {v} x {k}" for k, v in b["fallback_reasons"].items()))
    sys.stdout.write("\n".join(lines) + "\n")


def _grid_from_args(a):
    from lopro.compare import FP, Grid
    from lopro.config import QuantConfig
    from lopro.methods import get_method

    configs = []
    for method in a.methods.split(","):
        if method == FP:
            configs.append(FP)
            continue
        for bits in (int(b) for b in a.bits.split(",")):
            spec = get_method(method)
            options = parse_options(a.option)
            if a.rank == "auto" and spec.takes("rank_mode"):
                options.setdefault("rank_mode", "auto")
            configs.append(QuantConfig(method=method, bits=bits, group_size=a.group_size,
                                       rank=16 if a.rank == "auto" else int(a.rank),
                                       rank_dtype=a.rank_dtype or spec.default_rank_dtype,
                                       seed=a.seed, options=options))
    return Grid(model=a.model, configs=configs, calib_data=a.calib_data, nsamples=a.nsamples, seqlen=a.seqlen,
                seed=a.seed, eval_data=tuple(a.data.split(",")), eval_windows=a.windows or None,
                tasks=tuple(t for t in a.tasks.split(",") if t), task_limit=a.limit or None, device=a.device,
                threads=a.threads)


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds expects a comma list of integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs distinct integers, got {text!r}")
    return seeds


def cmd_compare(a) -> dict:
    from lopro.compare import markdown_table, run_grid, run_seeds, spread_table

    grid = _grid_from_args(a)
    if a.seeds is not None:
        seeds = _seed_list(a.seeds)
        results, rows = run_seeds(grid, seeds, a.out, propagate=a.propagate)
        table = spread_table(rows, grid)
        (Path(a.out) / "spread.md").write_text(table)
        (Path(a.out) / "spread.json").write_text(json.dumps(rows, indent=1))
        sys.stdout.write(table)
    else:
        results = run_grid(grid, a.out, propagate=a.propagate)
        sys.stdout.write(markdown_table(results, grid))
    if results.failures:
        raise PartialFailure(f"{len(results.failures)} of {len(grid.configs)} entries failed (the others are in "
                             f"{a.out}): " + "; ".join(f"{f['label']}: {f['error']}" for f in results.failures))
    return {"out": a.out, "entries": len(results)}


DEMO = ["--methods", "fp,gptq,lopro", "--bits", "3", "--nsamples", "16", "--seqlen", "256", "--windows", "6",
        "--tasks", ""]
FULL = ("lopro compare --methods fp,rtn,gptq,lqer,flrq,lopro,lopro-v --bits 2,3 --nsamples 128 --seqlen 512 "
        "--windows 0 --out compare-full")


def cmd_demo(_a) -> dict:
    """A few minutes on a 2-core CPU: W3, where GPTQ is usable and LoPRo clearly better, on a small calibration."""
    from lopro.data.assets import cache_dir

    a = build_parser().parse_args(["compare", *DEMO, "--out", str(cache_dir() / "demo")])
    log.warning("demo: LoPRo W3 g64 rank 16 vs GPTQ W3 g64 vs FP on smollm2-135m (16 x 256 calibration tokens, "
                "6 x 512 evaluation tokens per corpus); results cached in %s", a.out)
    out = cmd_compare(a)
    log.warning("the full-size comparison (every method, W2 and W3, 128 x 512 calibration, whole evaluation "
                "splits): %s", FULL)
    return out


def _add_export_parser(sub) -> None:
    x = sub.add_parser("export", help="write a packed checkpoint as GGUF (llama.cpp), GPTQ format or a LoRA adapter")
    x.add_argument("folder", help="a packed lopro checkpoint")
    x.add_argument("--format", required=True, choices=["gguf", "gptq", "lora"])
    x.add_argument("--out", required=True, help="output folder (model.gguf / a GPTQ folder / base + adapter)")
    x.add_argument("--overwrite", action="store_true")
    x.add_argument("--lossy", choices=["q8_0", "q5_1", "q4_1", "f16"], default=None,
                   help="GGUF: re-quantize layers that cannot be exact (rotations, VQ) instead of refusing")
    x.add_argument("--base", choices=["auto", "gguf", "gptq"], default="auto", help="lora: the base's format")
    x.add_argument("--checkpoint-format", choices=["auto", "gptq", "gptq_v2"], default="auto",
                   help="GPTQ zeros: stored minus one (gptq) or as they are (gptq_v2); auto: gptq unless impossible")
    x.add_argument("--bit-exact", action="store_true",
                   help="GGUF: 4-bit asymmetric as Q5_0 (bit-exact) instead of Q4_1 (fp16 rounding of m)")
    x.add_argument("--no-tokenizer", dest="tokenizer", action="store_false", help="GGUF: weights only")
    x.add_argument("--json", action="store_true")


def cmd_export(a) -> dict:
    from lopro.export import export

    rep = export(a.folder, a.format, a.out, overwrite=a.overwrite, lossy=a.lossy, base=a.base,
                 checkpoint_format=a.checkpoint_format, tokenizer=a.tokenizer, bit_exact=a.bit_exact)
    kinds = sorted({e["type"] for e in rep["layers"].values()})
    log.warning("wrote %s (%s: %s; %s, max |dW| %.2e)", a.out, a.format, ", ".join(kinds),
                "exact" if rep["exact"] else "not bit-exact", rep["max_abs_error"])
    return {k: v for k, v in rep.items() if k != "layers"}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    torch.set_grad_enabled(False)
    try:
        if args.command == "methods":
            from lopro.methods import available_methods

            out = {"methods": available_methods()}
            sys.stdout.write("\n".join(out["methods"]) + "\n")
            return 0
        out = {"quantize": cmd_quantize, "eval": cmd_eval, "compare": cmd_compare,
               "demo": cmd_demo, "generate": cmd_generate, "info": cmd_info,
               "export": cmd_export}[args.command](args)
    except PartialFailure as exc:
        log.error("%s", exc)
        return 1
    except (ValueError, OSError, RuntimeError, KeyError, ArithmeticError) as exc:  # bad input, I/O, numerics
        log.error("%s", exc)
        if args.verbose:
            log.exception("traceback")
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; an unfinished quantization continues with the same command and --resume")
        return 130
    except Exception as exc:  # a bug: one line, the traceback with -v
        log.error("internal error %s: %s. Rerun with -v for the traceback and report it with the command line "
                  "at the lopro issue tracker", type(exc).__name__, exc)
        if args.verbose:
            log.exception("traceback")
        return 3
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n")
    elif args.command == "eval":
        sys.stdout.write(f"{out['data']} seqlen={out['seqlen']} ppl={out['ppl']:.4f}\n")
    elif args.command == "generate":
        sys.stdout.write("".join(f"> {o['prompt']}\n{o['completion']}\n\n" for o in out["outputs"]))
    elif args.command == "info":
        _print_info(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
