"""Side-by-side comparisons: quantize a grid of configurations, evaluate each, cache every entry.

Each entry is keyed by (model, method config, calibration fingerprint, evaluation settings, library
version), so an interrupted or extended run computes only what is missing; a failure is recorded
apart and never overwrites a finished entry.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lopro._version import __version__
from lopro.device import resolve_device
from lopro.io.atomic import atomic_write
from lopro.config import QuantConfig
from lopro.data.assets import cache_dir
from lopro.data.windows import calibration_windows, eval_windows, fingerprint, tokenize_split
from lopro.methods import get_method
from lopro.io.loading import load_model, load_tokenizer
from lopro.pipeline.run import quantize

log = logging.getLogger(__name__)

FP = "fp"


@dataclass
class Grid:
    model: str = "smollm2-135m"
    configs: list = field(default_factory=list)  # QuantConfig, or the string "fp" for the unquantized model
    calib_data: str = "wiki"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    eval_data: tuple[str, ...] = ("wiki", "news")
    eval_seqlen: int = 512
    eval_windows: int | None = 32
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None
    batch_size: int = 8
    device: str | None = None
    threads: int | None = None  # torch threads while the grid runs (None: as set); part of the key when set


def entry_key(grid: Grid, cfg: dict, calib_sha: str) -> str:
    payload = {"model": grid.model, "config": cfg, "calib": calib_sha if cfg["method"] != FP else None,
               "eval": [grid.eval_data, grid.eval_seqlen, grid.eval_windows, grid.tasks, grid.task_limit,
                        grid.seed], "version": __version__}
    if grid.threads is not None:  # fp32 results move with the thread count: a 1-thread entry is another entry
        payload["threads"] = grid.threads
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


class ResultStore:
    """results.json with {key: entry}; rewritten atomically after every entry.

    Every write re-reads the file under a lock and merges, so several `lopro compare` processes can
    share one output folder (e.g. one per method on a many-core machine) without losing entries.
    """

    def __init__(self, out_dir: Path):
        self.path = out_dir / "results.json"
        self.lock = out_dir / "results.lock"
        out_dir.mkdir(parents=True, exist_ok=True)
        self.data = self._read()

    def _read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.exists() else {"entries": {}, "failures": {}}

    def done(self, key: str) -> bool:
        self.data = self._read()  # another process sharing the folder may have finished it
        return key in self.data["entries"]

    def put(self, key: str, entry: dict) -> None:
        with _locked(self.lock):
            self.data = self._read()
            self.data["entries"][key] = entry
            self.data["failures"].pop(key, None)
            self._write()

    def fail(self, key: str, label: str, error: str) -> None:
        with _locked(self.lock):
            self.data = self._read()
            if key not in self.data["entries"]:  # a finished entry is never replaced by a failure
                self.data["failures"][key] = {"label": label, "error": error}
            self._write()

    def _write(self) -> None:
        atomic_write(self.path, json.dumps(self.data, indent=1, default=str))


@contextmanager
def _locked(path: Path):
    """An exclusive advisory lock (POSIX); elsewhere a no-op, where one process per folder is the rule."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def label_of(cfg: dict) -> str:
    if cfg["method"] == FP:
        return "fp"
    g = "pc" if cfg["group_size"] == -1 else f"g{cfg['group_size']}"
    s = f"{cfg['method']} W{cfg['bits']} {g}"
    if cfg.get("rank") and get_method(cfg["method"]).lowrank:
        s += f" r{cfg['options'].get('rank_mode', cfg['rank'])}"
    if not cfg.get("true_sequential", True):
        s += " two-pass"
    extra = {k: v for k, v in cfg.get("options", {}).items() if k != "rank_mode"}
    return s + "".join(f" {k}={v}" for k, v in sorted(extra.items()))


class GridResults(list):
    """The finished entries in grid order; `.failures`: {"label", "error"} of the entries that failed."""

    failures: list[dict]


def run_grid(grid: Grid, out_dir: str | Path, propagate: str = "fp", progress: bool = True,
             table_name: str = "results") -> GridResults:
    """Evaluate every configuration of `grid`; returns the finished entries in grid order, with the failed
    ones in `.failures` (the others are kept: a rerun computes only what is missing)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir())
                                                       and not (out_dir / "results.json").exists())):
        raise FileExistsError(f"--out {out_dir} exists and is not a lopro compare folder (no results.json); "
                              "choose another --out: compare adds its entries to a folder it made")
    store = ResultStore(out_dir)
    threads = torch.get_num_threads()
    if grid.threads is not None:
        torch.set_num_threads(grid.threads)
    try:
        return _run_grid(grid, out_dir, store, propagate, progress, table_name)
    finally:
        torch.set_num_threads(threads)


def _run_grid(grid: Grid, out_dir: Path, store: "ResultStore", propagate: str, progress: bool,
              table_name: str) -> GridResults:
    tok, path = load_tokenizer(grid.model)
    calib = calibration_windows(tokenize_split(tok, grid.calib_data, "calib"), grid.nsamples, grid.seqlen, grid.seed)
    calib_sha = fingerprint(calib)
    evals = {d: eval_windows(tokenize_split(tok, d, "eval"), grid.eval_seqlen, grid.eval_windows)
             for d in grid.eval_data}
    stats_dir = cache_dir() / "stats" / f"{Path(path).name}-{calib_sha[:16]}"
    todo = []
    for cfg in grid.configs:
        d = {"method": FP} if cfg == FP else {**cfg.to_dict(), "propagate": propagate}
        todo.append((entry_key(grid, d, calib_sha), d))
    results = []
    bar = tqdm(todo, desc="compare", disable=not progress, unit="config")
    for key, d in bar:
        label = label_of(d)
        bar.set_postfix_str(label)
        if not store.done(key):
            try:
                store.put(key, _run_one(grid, d, label, calib, evals, stats_dir, tok, progress))
            except Exception as exc:  # keep going; the failure is summarised at the end
                log.exception("%s failed", label)
                store.fail(key, label, f"{type(exc).__name__}: {exc}")
        if store.done(key):
            results.append(store.data["entries"][key])
    failures = [f for k, f in store.data["failures"].items() if k in dict(todo)]
    for f in failures:
        log.error("FAILED %s: %s", f["label"], f["error"])
    write_table(results, grid, out_dir, table_name)
    out = GridResults(results)
    out.failures = failures
    return out


def _run_one(grid: Grid, d: dict, label: str, calib, evals, stats_dir, tok, progress: bool = False) -> dict:
    from lopro.eval.perplexity import perplexity

    device = resolve_device(grid.device)
    model, _, _ = load_model(grid.model, device=device)
    entry = {"label": label, "config": d, "model": grid.model}
    if d["method"] == FP:
        entry.update(effective_bits=16.0, quant_seconds=0.0, peak_memory_bytes=None)
    else:
        cfg = QuantConfig.from_dict(d)
        t0 = time.perf_counter()
        used = calib if get_method(cfg.method).needs_calibration else None  # RTN: no forwards for statistics it ignores
        _, report = quantize(model, cfg, used, batch_size=grid.batch_size, device=device,
                             stats_cache=stats_dir if cfg.propagate == "fp" else None, progress=progress)
        s = report.summary
        entry.update(effective_bits=s["effective_bits"], quant_seconds=time.perf_counter() - t0,
                     solve_seconds=s["solve_seconds"], peak_memory_bytes=s["peak_memory_bytes"],
                     calibration=s["calibration"], ranks=[r.get("rank") for r in report.layers])
    entry["ppl"] = {name: perplexity(model, w, batch_size=grid.batch_size)["ppl"] for name, w in evals.items()}
    entry["eval"] = {"seqlen": grid.eval_seqlen, "windows": {n: w.shape[0] for n, w in evals.items()}}
    if grid.tasks:
        from lopro.eval.zeroshot import evaluate_tasks

        zs = evaluate_tasks(model, tok, list(grid.tasks), limit=grid.task_limit, seed=grid.seed,
                            batch_size=grid.batch_size)
        entry["zeroshot"] = zs
    log.info("%s: bits %.3f ppl %s", label, entry["effective_bits"], entry["ppl"])
    return entry


def run_seeds(grid: Grid, seeds: list[int], out_dir: str | Path, propagate: str = "fp", progress: bool = True
              ) -> tuple[GridResults, list[dict]]:
    """`run_grid` once per seed (the calibration windows' draw and every method's own seed); returns every
    entry (failures of all seeds in `.failures`) and one row per configuration with each perplexity's
    mean, sample standard deviation, minimum and maximum over the seeds that finished."""
    everything = GridResults()
    everything.failures = []
    by_label: dict[str, list[dict]] = {}
    for seed in seeds:
        g = dataclasses.replace(grid, seed=seed, configs=[
            c if c == FP else dataclasses.replace(c, seed=seed) for c in grid.configs])
        res = run_grid(g, out_dir, propagate=propagate, progress=progress, table_name=f"results-seed{seed}")
        everything.extend(res)
        everything.failures.extend(res.failures)
        for r in res:
            by_label.setdefault(r["label"], []).append({**r, "seed": seed})
    rows = []
    for label, runs in by_label.items():
        ppl = {}
        for corpus in grid.eval_data:
            v = [r["ppl"][corpus] for r in runs]
            ppl[corpus] = {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                           "min": min(v), "max": max(v), "values": v}
        rows.append({"label": label, "effective_bits": runs[0]["effective_bits"], "seeds": [r["seed"] for r in runs],
                     "ppl": ppl, "quant_seconds": statistics.fmean(r["quant_seconds"] for r in runs)})
    return everything, rows


def spread_table(rows: list[dict], grid: Grid) -> str:
    corpora = list(grid.eval_data)
    head = ["method", "eff. bits", "seeds"] + [f"ppl {c}: mean ± sd (min-max)" for c in corpora] + ["quant s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        row = [r["label"], f"{r['effective_bits']:.3f}", ",".join(map(str, r["seeds"]))]
        row += [f"{p['mean']:.2f} ± {p['std']:.2f} ({p['min']:.2f}-{p['max']:.2f})"
                for p in (r["ppl"][c] for c in corpora)]
        row.append(f"{r['quant_seconds']:.0f}")
        lines.append("| " + " | ".join(row) + " |")
    note = (f"\nModel {grid.model}; each seed draws its own {grid.nsamples} x {grid.seqlen} calibration tokens of "
            f"`{grid.calib_data}` and seeds the method; perplexity at seqlen {grid.eval_seqlen} on the same "
            f"evaluation windows ({grid.eval_windows or 'all'}); sd is the sample standard deviation"
            + (f"; {grid.threads} thread(s)" if grid.threads else "") + ".\n")
    return "\n".join(lines) + "\n" + note


def markdown_table(results: list[dict], grid: Grid) -> str:
    corpora = list(grid.eval_data)
    tasks = list(grid.tasks)
    head = ["method", "bits", "eff. bits"] + [f"ppl {c}" for c in corpora] + [f"{t} acc" for t in tasks]
    head += (["avg acc"] if tasks else []) + ["quant s", "peak GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cfg = r["config"]
        row = [r["label"], "16" if cfg["method"] == FP else str(cfg["bits"]), f"{r['effective_bits']:.3f}"]
        row += [f"{r['ppl'][c]:.2f}" for c in corpora]
        if tasks:
            zs = r.get("zeroshot", {})
            row += [f"{100 * zs[t]['acc']:.1f}" if t in zs else "-" for t in tasks]
            row += [f"{100 * zs['average']:.1f} ± {100 * _average_stderr(zs, tasks):.1f}" if "average" in zs else "-"]
        row += [f"{r['quant_seconds']:.0f}",
                f"{r['peak_memory_bytes'] / 2**30:.2f}" if r.get("peak_memory_bytes") else "-"]
        lines.append("| " + " | ".join(row) + " |")
    note = (f"\nModel {grid.model}; calibration {grid.nsamples} x {grid.seqlen} tokens of `{grid.calib_data}` "
            f"(seed {grid.seed}); perplexity at seqlen {grid.eval_seqlen} on the evaluation split "
            f"({grid.eval_windows or 'all'} windows)"
            + (f"; zero-shot acc on {grid.task_limit or 'all'} examples per task (seed {grid.seed}), "
               "avg ± its standard error" if tasks else "") + ".\n")
    return "\n".join(lines) + "\n" + note


def _average_stderr(zs: dict, tasks: list[str]) -> float:
    """Standard error of the mean accuracy over tasks (independent tasks)."""
    return sum(zs[t]["acc_stderr"] ** 2 for t in tasks) ** 0.5 / len(tasks)


def write_table(results: list[dict], grid: Grid, out_dir: Path, name: str = "results") -> None:
    (out_dir / f"{name}.md").write_text(markdown_table(results, grid))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no plots (pip install 'lopro[plot]')")
        return
    for corpus in grid.eval_data:
        _plot(plt, results, lambda r: r["ppl"][corpus], f"perplexity ({corpus}, seqlen {grid.eval_seqlen})",
              out_dir / f"{name}_ppl_{corpus}.png", log_y=True)
    if grid.tasks:
        _plot(plt, [r for r in results if "zeroshot" in r], lambda r: 100 * r["zeroshot"]["average"],
              f"mean zero-shot accuracy, % ({len(grid.tasks)} tasks, ± 1 s.e.)", out_dir / f"{name}_acc.png",
              log_y=False, error=lambda r: 100 * _average_stderr(r["zeroshot"], list(grid.tasks)))


def _plot(plt, results: list[dict], value, ylabel: str, path: Path, log_y: bool, error=None) -> None:
    """One line per method through its (effective bits, value[, error]) points; fp as a dashed line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    by_method: dict[str, list] = {}
    for r in results:
        if r["config"]["method"] == FP:
            ax.axhline(value(r), color="gray", ls="--", label="fp")
        else:
            by_method.setdefault(r["config"]["method"], []).append(
                (r["effective_bits"], value(r), error(r) if error else 0.0))
    for m, pts in by_method.items():
        x, y, e = zip(*sorted(pts))
        ax.errorbar(x, y, yerr=e if error else None, marker="o", capsize=3, label=m)
    ax.set_xlabel("effective bits per weight")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
