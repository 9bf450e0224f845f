"""The quantization pipeline: capture the first block's inputs, then quantize block by block.

Only one block's activations live on the compute device at a time; the rest wait on the CPU.
Each block's outputs (from the *quantized* block by default) feed the next block.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lopro.config import QuantConfig
from lopro.device import forward_dtype
from lopro.io.atomic import atomic_write
from lopro.methods import get_method
from lopro.methods.base import LayerResult, LayerStats
from lopro.pipeline.activations import Activations
from lopro.pipeline.calibrate import StatsCollector
from lopro.pipeline.distributed import Dist
from lopro.pipeline.memory import PeakMemory, release_free_memory
from lopro.model.moe import (expert_key, expert_stages, fallback_stats, find_fused_experts, refuse_experts,
                             starved_experts, unfuse_experts)
from lopro.model.walk import (StopForward, block_output, capture_block_inputs, check_finite, find_blocks,
                              find_linears, to_device)
from lopro.quant.loss import output_error

log = logging.getLogger(__name__)


@dataclass
class QuantReport:
    config: dict
    layers: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    blocks: list[dict] = field(default_factory=list)  # per block: seconds reading, forwards, solves, propagating, writing

    def to_dict(self) -> dict:
        return {"config": self.config, "summary": self.summary, "blocks": self.blocks, "layers": self.layers}


def validate(model, config: QuantConfig) -> None:
    """Every check that can fail, before anything is computed or written."""
    config.validate()
    check_finite(model)
    _, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        for name, lin in find_linears(block).items():
            config.check_width(lin.in_features, f"block {i} {name}")
        for name, lay in find_fused_experts(block).items():  # raises on fused experts lopro cannot unfuse
            config.check_width(min(lay.hidden, lay.inter), f"block {i} {name}")


class BlockIO:
    """Where blocks come from and where finished blocks go; this default is a model held in memory
    (nothing to read, nothing to write). A streamed run (lopro.io.stream.StreamedRun) reads each block
    from disk before it is quantized, writes it as a shard when it is done and can resume."""

    def resume(self) -> tuple[int, "Activations | None", list[dict], list[dict]]:
        """(first block to quantize, its input activations or None to capture them, report rows and
        block profiles so far)."""
        return 0, None, [], []

    def capture(self, model, first_block, batches) -> Activations:
        return capture_activations(model, first_block, batches)

    def load_block(self, i: int, block) -> None:
        pass

    def next_activations(self, i: int, inputs: Activations) -> Activations:
        """An empty store for the inputs of block i + 1."""
        return inputs.like()

    def finish_block(self, i: int, block, rows: list[dict], next_inputs: Activations | None, profile: dict) -> None:
        """Block i is quantized; `profile` (its timings) may be completed with "write_s"."""


def capture_activations(model, first_block, batches) -> Activations:
    captured = capture_block_inputs(model, first_block, batches)
    acts = Activations([kw for _, kw in captured])
    for hidden, _ in captured:
        acts.append(hidden)
    return acts


def quantize(model, config: QuantConfig, calibration: torch.Tensor | None, *, batch_size: int = 8,
             device=None, on_layer=None, stats_cache: str | Path | None = None,
             progress: bool = True, io: BlockIO | None = None, pack: bool = False, dist: Dist | None = None
             ) -> tuple[torch.nn.Module, QuantReport]:
    """Quantize `model` in place with `config.method`; returns (model, report).

    calibration: [nsamples, seqlen] token ids (may be None only for methods without a Hessian).
    on_layer(block_index, name, module, result): what to do with each result; default replaces the
    weight by the dequantized one (fake quantization); `pack=True` instead replaces each layer by its
    packed QuantLinear (what `lopro.save` writes). An `on_layer` with an ``end_block(block_index)``
    method has it called once the block's propagation is done (the packer swaps its layers in then).
    stats_cache: with propagate="fp", a folder where the fp model's statistics are reused across runs.
    io: where blocks are read from and written to (default: all in memory, see BlockIO).
    dist: the process group under torchrun (lopro.pipeline.distributed); `calibration` is then the whole
    set of windows, of which this rank takes its share.
    """
    io = io or BlockIO()
    dist = dist or Dist()
    if dist.enabled and stats_cache:
        raise ValueError("--stats-cache is not supported under torchrun: run the statistics once in one process")
    full_calibration, calibration = calibration, dist.shard(calibration)
    progress = progress and dist.is_writer
    validate(model, config)
    spec = get_method(config.method)
    method = spec.fn
    if calibration is None and spec.needs_calibration:
        raise ValueError(f"method {config.method!r} needs calibration data")
    params = [p for p in model.parameters() if p.device.type != "meta"]
    model_device = params[0].device if params else torch.device("cpu")
    device = torch.device(device) if device is not None else model_device
    weighted = config.pipeline_options.moe_weighted_hessian
    amp = forward_dtype(config.pipeline_options.forward_dtype, device)
    with PeakMemory(device) as mem:
        if pack and on_layer is not None:
            raise ValueError("pass either pack=True or on_layer, not both")
        if pack:
            from lopro.model.surgery import packer

            on_layer = packer(model)
        on_layer = on_layer or _replace_weight
        end_block = getattr(on_layer, "end_block", None)
        _, blocks = find_blocks(model)
        report = QuantReport(config.to_dict())
        t_start = time.perf_counter()

        start, inputs, rows, profiles = io.resume()
        report.layers.extend(rows)
        report.blocks.extend(profiles)
        cache = (_StatsCache(stats_cache, calibration) if stats_cache and config.propagate == "fp"
                 and calibration is not None else None)
        cached = cache is not None and cache.complete(len(blocks))  # every block's fp statistics on disk
        t_capture = time.perf_counter()
        if calibration is not None and not cached and inputs is None:
            inputs = io.capture(model, blocks[0], calibration.split(batch_size))
        capture_s = time.perf_counter() - t_capture

        known: dict = {}  # block signature -> its true-sequential stages (see _calibrate_block)
        bar = tqdm(range(start, len(blocks)), desc=f"{config.method} W{config.bits}", disable=not progress,
                   unit="block", initial=start, total=len(blocks))
        for i in bar:
            block = blocks[i]
            t0 = time.perf_counter()
            io.load_block(i, block)
            t1 = time.perf_counter()
            unfuse_experts(block, weighted)  # experts as nn.Linear
            home = next(block.parameters()).device
            block.to(device)
            linears = find_linears(block)
            if amp is not None and i == start and inputs is not None:
                amp = _probe_autocast(block, inputs, device, amp)
            stages: list[dict] = []  # per calibration forward: the layers it reached, its forward and Hessian seconds
            if calibration is None:
                stats, groups, done = {}, [[n] for n in linears], set()
            elif cached:
                stats, groups = cache.load(i)
                done = set()
            else:
                stats, groups, inputs, done = _calibrate_block(block, linears, inputs, device, amp, config, method,
                                                               on_layer, i, report, io, dist, stages, known)
                if cache:
                    cache.save(i, stats, groups, last=i == len(blocks) - 1)
            groups = expert_stages(groups, linears)  # adds layers no calibration token reached
            starved = _starved(linears, stats, config) if calibration is not None else {}
            _quantize_layers(i, [n for group in groups for n in group if n not in done], linears, stats, config,
                             method, on_layer, report, starved, dist)
            t2 = time.perf_counter()
            if inputs is not None and config.propagate == "quantized":
                inputs = _forward(block, inputs, device, amp, io.next_activations(i, inputs))
            if end_block is not None:
                end_block(i)
            t3 = time.perf_counter()
            refuse_experts(block)  # back to the fused layout unless experts were packed
            block.to(home)
            rows = [r for r in report.layers if r["block"] == i]
            solve = sum(r["seconds"] for r in rows)
            hessian = sum(s["hessian_s"] for s in stages)
            profile = {"block": i, "read_s": t1 - t0, "forwards_s": t2 - t1 - solve - hessian, "hessian_s": hessian,
                       "solve_s": solve, "propagate_s": t3 - t2, "peak_rss_bytes": mem.peak_rss,  # the run's so far
                       "stages": stages}
            io.finish_block(i, block, rows, inputs, profile)
            release_free_memory()
            report.blocks.append(profile)
            bar.set_postfix(bits=f"{_mean_bits(report):.3f}")
    report.summary = _summarise(report, time.perf_counter() - t_start, device, full_calibration, mem)
    report.summary["profile_seconds"]["capture_s"] = capture_s
    report.summary["forward_dtype"] = str(amp or torch.float32).removeprefix("torch.")  # what "auto" resolved to
    report.summary["processes"] = dist.world
    report.summary["communication_seconds"] = dist.comm_seconds
    return model, report


def _block_signature(linears: dict) -> tuple:
    return tuple((n, lin.in_features, lin.out_features) for n, lin in linears.items())


def _calibrate_block(block, linears, inputs, device, amp, config, method, on_layer, i, report, io, dist, stages,
                     known: dict):
    """Statistics for every linear of one block; in true-sequential mode, quantizes group by group.

    `known` maps a block's layers (names and shapes) to the stages found by a discovery forward of an earlier
    block with the same layers: a model's blocks call them in the same order with the same shared inputs,
    so only the first such block pays for that forward (blocks with MoE experts always discover theirs).

    Returns (stats, groups, next_inputs, quantized) where next_inputs are the fp outputs when
    propagate="fp" (computed in the same pass) and the unchanged inputs otherwise, and quantized the
    layers already quantized here (true-sequential: all of the block's stages).
    """
    dtype = torch.float64 if config.pipeline_options.hessian_dtype == "fp64" else torch.float32
    if config.propagate == "fp" or not config.true_sequential:
        outputs = io.next_activations(i, inputs) if config.propagate == "fp" else None
        stats, groups, _ = _collect(block, linears, inputs, device, amp, dtype, outputs=outputs, dist=dist,
                                    stages=stages)
        return stats, dist.broadcast(groups, 0), outputs if config.propagate == "fp" else inputs, set()
    groups = known.get(_block_signature(linears))
    if groups is None:
        # discover call order and shared inputs on the first batch only (one stage per expert matrix)
        _, groups, _ = _collect(block, linears, inputs.head(1), device, amp, dtype, stages=stages, label="discover")
        groups = dist.broadcast(expert_stages(groups, linears), 0)  # every rank runs rank 0's stages
        if not any(expert_key(n) for n in linears):  # blocks of the same layers run them alike: reuse
            known[_block_signature(linears)] = groups
    stats: dict[str, LayerStats] = {}
    for group in groups:
        members = {n: linears[n] for n in group}
        got, seen, _ = _collect(block, members, inputs, device, amp, dtype, stop_after=group, dist=dist,
                                stages=stages)
        if sorted(map(sorted, seen)) != [sorted(group)] and not any(expert_key(n) for n in group):
            raise RuntimeError(f"block {i}: layers {group} were expected to read one input, as in an earlier block "
                               f"with the same layers, but they read {seen}; quantize with true_sequential=False "
                               "and report this model")
        stats.update(got)
        _quantize_layers(i, group, linears, stats, config, method, on_layer, report, _starved(group, stats, config),
                         dist)
        for name in group:  # the group's Hessians are not needed again (a 7B down_proj's is 485 MB)
            if name in stats:
                stats[name] = dataclasses.replace(stats[name], H=None)
    return stats, groups, inputs, {n for group in groups for n in group}


def _autocast(device, amp: torch.dtype | None):
    """The forwards' matmuls in `amp` (bf16) where asked; hidden states between blocks keep their dtype.
    No weight cache: it would hold a bf16 copy of the whole block until the pass ends (0.4 GB at 7B shapes,
    where one batch is one call per layer anyway)."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=amp, cache_enabled=False)


def _probe_autocast(block, inputs: Activations, device, amp: torch.dtype) -> torch.dtype | None:
    """`amp`, or None (fp32 forwards, with a warning) when the block's code cannot run under autocast (a custom
    layer adding a bf16 result into an fp32 buffer in place, say): one batch through the first block."""
    hidden, kwargs = inputs.head(1)[0]
    try:
        with torch.no_grad(), _autocast(device, amp):
            block(hidden.to(device), **to_device(kwargs, device))
    except RuntimeError as exc:
        log.warning("this model's blocks do not run with %s forwards (%s); calibrating in fp32 instead "
                    "(--option forward_dtype=fp32 says so up front)", str(amp).removeprefix("torch."),
                    str(exc).splitlines()[0])
        return None
    return amp


def _collect(block, linears, inputs, device, amp, dtype, stop_after=None, outputs: Activations | None = None,
             dist: Dist | None = None, stages: list | None = None, label: str | None = None):
    """One calibration pass over `inputs` with hooks on `linears` (cut short after `stop_after`); its
    timings are appended to `stages` (under `label`, default the layers' names)."""
    t0 = time.perf_counter()
    with torch.no_grad(), _autocast(device, amp), StatsCollector(linears, dtype, stop_after) as col:
        for hidden, kwargs in inputs:
            col.new_batch()
            try:
                out = block(hidden.to(device), **to_device(kwargs, device))
                if outputs is not None:
                    outputs.append(block_output(out).to(hidden.dtype))
            except StopForward:
                pass
        if dist is not None:
            col.reduce(dist)  # every rank's share of the windows summed (fp64)
    if stages is not None:
        stages.append({"layers": label or sorted(linears),
                       "forward_s": time.perf_counter() - t0 - col.hessian_seconds,
                       "hessian_s": col.hessian_seconds})
    return col.finish(), col.groups(), outputs


def _forward(block, inputs: Activations, device, amp, outputs: Activations) -> Activations:
    with torch.no_grad(), _autocast(device, amp):
        for h, kw in inputs:
            outputs.append(block_output(block(h.to(device), **to_device(kw, device))).to(h.dtype))
    return outputs


def _starved(names, stats, config) -> dict[str, str]:
    o = config.pipeline_options
    return starved_experts(names, stats, o.min_expert_tokens_share, o.min_expert_tokens_per_input)


def _quantize_layers(i, names, linears, stats, config, method, on_layer, report, starved, dist) -> None:
    """Quantize the layers `names` of block `i` (one stage: independent of each other), record each in the
    report and hand it to `on_layer`. Under torchrun each layer is solved by its owner rank, all of a stage
    in parallel, and broadcast; alone, each is solved and applied in turn (one result alive at a time)."""
    if not dist.enabled:
        for name in names:
            _record(i, name, linears[name], stats.get(name), config, on_layer, report,
                    _solve(i, name, linears[name], stats.get(name), config, method, starved.get(name)), True)
        return
    cost = {n: float(linears[n].in_features) ** 2 * linears[n].out_features for n in names}
    owner = dist.owners(list(names), cost)
    mine = {n: _solve(i, n, linears[n], stats.get(n), config, method, starved.get(n))
            for n in names if owner[n] == dist.rank}
    for name in names:
        solved = dist.broadcast(mine.pop(name, None), owner[name], map_location=linears[name].weight.device)
        _record(i, name, linears[name], stats.get(name), config, on_layer, report, solved, dist.is_writer)


def _solve(i, name, module, stats, config, method, starved: str | None = None):
    """(result, seconds, fallback); `starved`: why this expert is quantized without its Hessian, if it is."""
    W = module.weight.detach().float()
    fallback = starved is not None or (stats is None and get_method(config.method).needs_calibration)
    if fallback:
        mode = config.pipeline_options.starved_expert_hessian
        used, how = fallback_stats(W.shape[1], stats, mode, W.device)
        log.warning("block %d %s: %s; quantized %s", i, name, starved or "no calibration token reached this layer",
                    how.format(method=config.method))
    t0 = time.perf_counter()
    result: LayerResult = method(W, used if fallback else stats, config)
    seconds = time.perf_counter() - t0
    if not torch.isfinite(result.weight).all():
        raise FloatingPointError(f"block {i} {name}: {config.method} produced NaN/inf weights (weights or "
                                 f"activations beyond what fp32 arithmetic holds? max |w| = {W.abs().max():.3g}); "
                                 "check the model's weights, or try --damp-percent 0.1")
    return result, seconds, fallback


def _record(i, name, module, stats, config, on_layer, report, solved, with_loss: bool) -> None:
    """The report's row of one quantized layer (its loss only where the report is written), then `on_layer`."""
    result, seconds, fallback = solved
    W = module.weight.detach().float()
    loss, rel, rows = (output_error(W, result.weight, stats.H) if stats is not None and with_loss
                       else (float("nan"),) * 2 + (0,))
    row = {"block": i, "name": name, "shape": list(W.shape), "effective_bits": result.effective_bits(),
           "proxy_loss": loss, "rel_output_error": rel, "loss_rows": rows, "seconds": seconds,
           "tokens": stats.tokens if stats is not None else 0, "fallback": fallback, **result.info}
    report.layers.append(row)
    log.info("block %d %-24s bits=%.3f loss=%.4g rel_err=%.4f %.2fs", i, name, row["effective_bits"], loss, rel,
             seconds)
    on_layer(i, name, module, result)


def _replace_weight(_i, _name, module, result: LayerResult) -> None:
    module.weight.data.copy_(result.weight.to(module.weight.dtype))


def _mean_bits(report: QuantReport) -> float:
    num = sum(r["effective_bits"] * r["shape"][0] * r["shape"][1] for r in report.layers)
    den = sum(r["shape"][0] * r["shape"][1] for r in report.layers)
    return num / den if den else float("nan")


def _summarise(report, seconds, device, calibration, mem: PeakMemory) -> dict:
    from lopro.data.windows import fingerprint

    return {
        "method": report.config["method"], "bits": report.config["bits"],
        "group_size": report.config["group_size"], "effective_bits": _mean_bits(report),
        "layers": len(report.layers),
        "quantized_params": sum(r["shape"][0] * r["shape"][1] for r in report.layers),
        "quant_seconds": seconds, "solve_seconds": sum(r["seconds"] for r in report.layers),
        "profile_seconds": {k: sum(b.get(k, 0.0) for b in report.blocks)
                            for k in ("read_s", "forwards_s", "hessian_s", "solve_s", "propagate_s", "write_s")},
        "peak_memory_bytes": mem.peak, "peak_rss_bytes": mem.peak_rss, "peak_gpu_bytes": mem.peak_gpu,
        "device": str(device),
        "calibration": None if calibration is None else {
            "nsamples": calibration.shape[0], "seqlen": calibration.shape[1],
            "sha256": fingerprint(calibration)},
    }


class _StatsCache:
    """fp-model statistics per block on disk, reusable by every method on the same calibration."""

    def __init__(self, folder, calibration: torch.Tensor):
        from lopro.data.windows import fingerprint

        self.folder = Path(folder)
        self.key = fingerprint(calibration)  # statistics of other calibration tokens are never reused
        self.folder.mkdir(parents=True, exist_ok=True)

    def complete(self, nblocks: int) -> bool:
        done = self.folder / "complete"
        blocks = len(list(self.folder.glob("block_*.pt")))
        return done.exists() and done.read_text() == self.key and blocks == nblocks

    def load(self, i):
        d = torch.load(self.folder / f"block_{i:03d}.pt", weights_only=False)
        return {k: LayerStats(**v) for k, v in d["stats"].items()}, d["groups"]

    def save(self, i, stats, groups, last: bool):
        path = self.folder / f"block_{i:03d}.pt"
        atomic_write(path, b"", writer=lambda tmp: torch.save(
            {"stats": {k: vars(v) for k, v in stats.items()}, "groups": groups}, tmp))
        if last:
            (self.folder / "complete").write_text(self.key)
