"""A quantization run streamed from disk to disk, resumable after a crash.

The model is a :class:`~lopro.io.lazy.LazyModel`; each decoder block is read just before it is
quantized and, once done, written at once as one shard of the final checkpoint and freed. Until the
run finishes, everything lives in ``.<out>.partial/`` beside ``--out``:

- ``model-0000k-of-0000N.safetensors``: block k - 1's tensors, then one shard per tensor outside
  the blocks (embeddings, final norm, head: written one at a time, so that serialising them never
  holds more than one of them twice in memory);
- ``acts/<block>/batch-*.safetensors`` and ``acts/kwargs.pt``: the calibration activations entering
  the next block(s), saved verbatim (recomputing them would not give the same bits);
- ``manifest.json`` (and the previous one, ``manifest.prev.json``): the run's fingerprint (model
  config and tensor index, calibration SHA-256, the whole QuantConfig, run settings, library
  version) and, per finished block, its shard's SHA-256, report rows and module specs;
- ``lock``: held (flock) while a process works on the folder.

Under torchrun (lopro.pipeline.distributed) every rank streams the same blocks; rank 0 writes the
shards and the manifest, and each rank saves its own share of the activations (``acts/<block>/rank<r>/``,
``acts/kwargs-rank<r>.pt``), whose SHA-256 rank 0 gathers into the manifest, so a resume under the
same number of processes continues where they stopped.

``--resume`` checks the fingerprint (any difference is refused, naming it), keeps the longest prefix
of blocks whose shards match their SHA-256 and whose next inputs are intact, and continues from
there; a torn shard or manifest is detected and its block redone. The finished folder is moved to
``--out`` in one rename: a folder under ``--out`` is always complete.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from lopro.pipeline.activations import Activations, available_memory, estimate_bytes
from lopro.io.checkpoint import (DEFAULT_SHARD_BYTES, WEIGHTS_NAME, build_quantization_config, fp_storage,
                                tensors_to_save, write_index, write_metadata, write_tensors)
from lopro.pipeline.distributed import Dist
from lopro.pipeline.run import BlockIO, capture_activations
from lopro.model.surgery import quant_linear_specs
from lopro.io.atomic import atomic_write, check_unchanged, publish, sha256_file
from lopro.io.lazy import LazyModel

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PREV_MANIFEST = "manifest.prev.json"
MANIFEST_VERSION = 1
OFFLOAD = ("auto", "ram", "disk")
MERGE_BYTES = 1 << 30  # outputs up to this size become one model.safetensors (merging holds them twice in memory)


class ResumeError(ValueError):
    """A resume that cannot continue the run in the folder (another config, a damaged folder)."""


def work_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, default=str).encode()


def model_fingerprint(lazy: LazyModel) -> dict:
    index = sorted((k, str(v["dtype"]), list(v["shape"])) for k, v in lazy.found.items())
    return {"config_sha256": hashlib.sha256((lazy.folder / "config.json").read_bytes()).hexdigest(),
            "tensors_sha256": hashlib.sha256(_canonical(index)).hexdigest()}


def _differences(old, new, path="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _differences(old.get(k), new.get(k), f"{path}.{k}" if path else k)
        return out
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def estimate_output_bytes(lazy: LazyModel, bits: int, group_size: int, rank: int, act_bytes: int) -> int:
    """A generous size of the finished folder plus the run's scratch: packed codes with fp16 scales
    and zeros, fp16 low-rank factors, the other tensors as stored, two blocks' saved activations."""
    g = group_size if group_size > 0 else 4096
    total = 2 * act_bytes
    for name, info in lazy.found.items():
        shape = info["shape"]
        nbytes = torch.Size(shape).numel() * info["dtype"].itemsize
        if name.startswith(f"{lazy.blocks_name}.") and len(shape) >= 2:
            m, n = shape[-2], shape[-1]
            numel = torch.Size(shape).numel()
            total += int(numel * (bits + 32 / g) / 8) + rank * (m + n) * 2 * (numel // (m * n))
        else:
            total += nbytes
    return total


def choose_offload(offload: str, nsamples: int, seqlen: int, hidden: int) -> bool:
    """True when activations go to disk: asked for, or (auto) when three copies would not fit in half
    of the free memory (the block's inputs, its outputs, and the forward's own intermediates)."""
    if offload not in OFFLOAD:
        raise ValueError(f"offload must be one of {OFFLOAD}, got {offload!r}")
    if offload != "auto":
        return offload == "disk"
    free = available_memory()
    need = 3 * estimate_bytes(nsamples, seqlen, hidden)
    if free is not None and need > free // 2:
        log.warning("activations (%.1f GiB a copy) go to disk: %.1f GiB of memory is free",
                    need / 3 / 2**30, free / 2**30)
        return True
    return False


class StreamedRun(BlockIO):
    def __init__(self, lazy: LazyModel, out: str | Path, fingerprint: dict, *, packed: bool = True,
                 fp_dtype: str = "auto", resume: bool = False, overwrite: bool = False, offload: bool = False,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, need_bytes: int = 0, dist: Dist | None = None):
        self.dist = dist or Dist()
        self.writer = self.dist.is_writer
        self.lazy, self.out, self.packed, self.fp_dtype = lazy, Path(out), packed, fp_dtype
        self.work = work_folder(self.out)
        self.offload, self.max_shard_bytes = offload, max_shard_bytes
        self.n = len(lazy.blocks)
        self.outside = lazy.outside_blocks()
        total = self.n + len(self.outside)
        self.files = [f"model-{k:05d}-of-{total:05d}.safetensors" for k in range(1, total + 1)]
        self.fingerprint = fingerprint
        self.bytes_written = 0
        self.bytes_read = 0
        if not self.writer:  # rank 0 prepares the folder; this rank only reads and saves its activations
            self.manifest = None
            return
        self._prepare(resume, overwrite)
        free = shutil.disk_usage(self.work).free
        if need_bytes > free:  # checked before any block is computed; a disk filling later is caught at the write
            self.close()
            raise OSError(f"{self.work.parent} has {free / 2**30:.1f} GiB free but the run needs about "
                          f"{need_bytes / 2**30:.1f} GiB: free some space or choose another --out")

    # ---------------------------------------------------------------- folder, lock, manifest
    def _prepare(self, resume: bool, overwrite: bool) -> None:
        self.work.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(self.work.parent, os.W_OK):
            raise PermissionError(f"cannot write into {self.work.parent}: choose an --out in a writable folder")
        if self.work.exists() and not resume:
            if not overwrite:
                raise FileExistsError(f"an unfinished run for {self.out} is in {self.work}: pass --resume to continue "
                                      "it, or --overwrite to start again")
            if not (self.work / MANIFEST).exists() and not (self.work / PREV_MANIFEST).exists():
                raise FileExistsError(f"{self.work} is not a lopro run folder; move it away")
            self._lock_folder()
            shutil.rmtree(self.work)
        self.work.mkdir(exist_ok=True)
        self._lock_folder()
        self.manifest = self._read_manifest() if resume else None
        if resume and self.manifest is None:
            log.warning("nothing to resume in %s: starting from the first block", self.work)
        if self.manifest is not None:
            diff = _differences(self.manifest["fingerprint"], self.fingerprint)
            if diff:
                raise ResumeError(f"--resume refused: the run in {self.work} was started with other settings ("
                                  + "; ".join(diff[:6]) + "). Rerun with the original settings, or --overwrite "
                                  "to start again")
        else:
            self.manifest = {"version": MANIFEST_VERSION, "fingerprint": self.fingerprint, "outside": [],
                             "kwargs": None, "inputs": {}, "blocks": []}
            self._write_manifest()

    def _lock_folder(self) -> None:
        path = self.work / "lock"
        fh = open(path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            raise FileExistsError(f"another lopro process (pid {fh.read().strip() or '?'}) is writing {self.work}; "
                                  "wait for it or stop it") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._lock = fh

    def _read_manifest(self) -> dict | None:
        for name in (MANIFEST, PREV_MANIFEST):
            path = self.work / name
            try:
                doc = json.loads(path.read_text())
                body = doc["body"]
                if hashlib.sha256(_canonical(body)).hexdigest() == doc["sha256"]:
                    if name == PREV_MANIFEST:
                        log.warning("%s is damaged or missing; resuming from %s", MANIFEST, PREV_MANIFEST)
                    return body
            except (OSError, ValueError, KeyError, TypeError):
                pass
            if path.exists():
                log.warning("%s in %s is damaged (torn write?); ignored", name, self.work)
        return None

    def _write_manifest(self) -> None:
        body = self.manifest
        data = json.dumps({"body": body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()}, default=str)
        cur = self.work / MANIFEST
        tmp = self.work / f".{MANIFEST}.new"
        atomic_write(tmp, data)
        if cur.exists():
            os.replace(cur, self.work / PREV_MANIFEST)
        os.replace(tmp, cur)

    # ---------------------------------------------------------------- writing
    def _write(self, name: str, tensors: dict[str, torch.Tensor], quantized: set[str] = frozenset()) -> dict:
        path = self.work / name
        try:
            atomic_write(path, b"", writer=lambda tmp: write_tensors(tensors, tmp))
        except OSError as exc:
            raise OSError(f"writing {path} failed ({exc.strerror or exc}); the finished blocks are kept in "
                          f"{self.work}: fix the cause and rerun the same command with --resume") from exc
        size = path.stat().st_size
        self.bytes_written += size
        fp: dict[str, int] = {}  # elements per float dtype outside the packed modules (config.json's "dtype")
        for k, t in tensors.items():
            if t.is_floating_point() and k.rpartition(".")[0] not in quantized:
                key = str(t.dtype).removeprefix("torch.")
                fp[key] = fp.get(key, 0) + t.numel()
        return {"file": name, "sha256": sha256_file(path), "bytes": size,
                "tensors": {k: t.numel() * t.element_size() for k, t in tensors.items()}, "fp_numel": fp}

    def _fp(self, t: torch.Tensor) -> torch.Tensor:
        return fp_storage(t, self.fp_dtype) if self.packed else t.to(torch.float32)

    def _outside(self, assign: bool) -> None:
        """The tensors outside the blocks, each read once as stored (fp storage never widens it), written
        as its own shard unless already verified, and (`assign`) put in the model for the capture."""
        done = self._outside_verified() if self.writer else {}
        recs = []
        model = self.lazy.model
        head, inp = model.get_output_embeddings(), model.get_input_embeddings()
        tied = head is not None and inp is not None and head.weight is inp.weight
        head_names = set() if head is None or tied else {
            n for n, p in model.named_parameters(remove_duplicate=False) if any(p is q for q in head.parameters())}
        for j, name in enumerate(self.outside):
            t = self.lazy.read([name], copy=False)[name]  # mapped: written from the file's pages, copied only to assign
            self.bytes_read += t.numel() * t.element_size()
            rec = done.get(name)
            if rec is None and self.writer:
                rec = self._write(self.files[self.n + j], {name: self._fp(t).contiguous()})
            recs.append(rec)
            if assign and name not in head_names:  # capturing block 0's inputs never reaches the head
                self.lazy.assign({name: t.to(self.lazy.dtype, copy=True) if t.is_floating_point() else t.clone()})
            del t
        if self.writer:
            self.manifest["outside"] = recs

    def _outside_verified(self) -> dict[str, dict]:
        return {name: rec for rec in self.manifest["outside"] or [] if self._verified(rec) for name in rec["tensors"]}

    def _verified(self, rec: dict | None) -> bool:
        path = self.work / rec["file"] if rec else None
        return bool(rec) and path.exists() and sha256_file(path) == rec["sha256"]

    # ---------------------------------------------------------------- BlockIO
    def resume(self):
        d = self.dist
        m = self.manifest
        done = 0
        if self.writer:
            for rec in m["blocks"]:
                if rec["index"] != done or not self._verified(rec):
                    if rec["index"] == done:
                        log.warning("shard %s of block %d is damaged or missing: the block is redone", rec["file"],
                                    done)
                    break
                done += 1
        done, kw_rec, inputs_rec = d.broadcast((done, m["kwargs"], m["inputs"]) if self.writer else None, 0)
        kwargs = None
        mine = self._mine(kw_rec)
        if mine and (self.work / mine["file"]).exists() and sha256_file(self.work / mine["file"]) == mine["sha256"]:
            kwargs = torch.load(self.work / mine["file"], weights_only=False)
        start, inputs = done, None
        needs_inputs = self.fingerprint.get("calibration_sha256") is not None  # weight-only methods need none
        while needs_inputs:
            files = self._mine(inputs_rec.get(str(start)))
            got = None
            if kwargs is not None and files is not None:
                try:
                    got = Activations.load(self._acts_dir(start), kwargs, files, in_ram=not self.offload)
                except ValueError as exc:
                    log.warning("%s", exc)
            if d.all_true(got is not None):  # every rank has its share of this block's inputs
                inputs = got
                break
            if start == 0:
                break
            start -= 1
        if inputs is None and needs_inputs:
            start = 0
        if self.writer:
            if len(self._outside_verified()) != len(self.outside):
                self._outside(assign=False)
            m["blocks"] = m["blocks"][:start]
            m["inputs"] = {k: v for k, v in m["inputs"].items() if int(k) >= start}
            self._write_manifest()
            if start:
                log.warning("resuming %s after block %d (%d of %d blocks were finished)", self.out, start - 1, start,
                            self.n)
        self.resumed_from = start
        rows_profiles = ([r for rec in m["blocks"] for r in rec["rows"]], [rec["profile"] for rec in m["blocks"]]) \
            if self.writer else ([], [])
        return (start, inputs, *d.broadcast(rows_profiles, 0))

    def _mine(self, rec):
        """This rank's part of a manifest record (the whole record in a single process)."""
        if rec is None or not self.dist.enabled:
            return rec
        return rec.get(str(self.dist.rank))

    def _gathered(self, rec):
        """Every rank's `rec`, keyed by rank, on rank 0 (the record itself in a single process)."""
        if not self.dist.enabled:
            return rec
        return {str(r): v for r, v in enumerate(self.dist.gather_objects(rec))}

    def capture(self, model, first_block, batches) -> Activations:
        self._outside(assign=True)
        acts = capture_activations(model, first_block, batches)
        self.lazy.release_names(self.outside)
        name = "kwargs.pt" if not self.dist.enabled else f"kwargs-rank{self.dist.rank}.pt"
        kw = self.work / "acts" / name
        kw.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(kw, b"", writer=lambda tmp: torch.save(acts.kwargs, tmp))
        kw_rec = self._gathered({"file": str(kw.relative_to(self.work)), "sha256": sha256_file(kw)})
        if self.offload:
            disk = acts.like(self._acts_dir(0))
            for h, _ in acts:
                disk.append(h)
            acts = disk
        files = self._gathered(acts.save(self._acts_dir(0)))
        if self.writer:
            self.manifest["kwargs"] = kw_rec
            self.manifest["inputs"]["0"] = files
            self._write_manifest()
        return acts

    def _acts_dir(self, i: int) -> Path:
        base = self.work / "acts" / f"{i:05d}"
        return base / f"rank{self.dist.rank}" if self.dist.enabled else base

    def load_block(self, i, block) -> None:
        self.bytes_read += self.lazy.load(self.lazy.block_prefix(i))

    def next_activations(self, i, inputs):
        return inputs.like(self._acts_dir(i + 1) if self.offload else None)

    def finish_block(self, i, block, rows, next_inputs, profile) -> None:
        if not self.writer:  # this rank's share of the next inputs, for a resume; rank 0 records it
            if next_inputs is not None and i + 1 < self.n:
                self._gathered(next_inputs.save(self._acts_dir(i + 1)))
            for k in range(max(0, i - 1)):  # keep the inputs of the last two blocks
                shutil.rmtree(self._acts_dir(k), ignore_errors=True)
            self.lazy.release(block)
            return
        t0 = time.perf_counter()
        prefix = self.lazy.block_prefix(i)
        if self.packed:
            tensors = tensors_to_save(block, self.fp_dtype, prefix)
        else:
            tensors = {prefix + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in block.state_dict().items()}
        specs = {prefix + k: v for k, v in quant_linear_specs(block).items()}
        rec = self._write(self.files[i], tensors, set(specs))
        rec["index"] = i
        rec["rows"] = rows
        rec["specs"] = specs
        if next_inputs is not None and i + 1 < self.n:
            mine = next_inputs.save(self._acts_dir(i + 1))
            self.manifest["inputs"][str(i + 1)] = self._gathered(mine)
            self.bytes_written += sum((self._acts_dir(i + 1) / f).stat().st_size for f in mine)
        profile["write_s"] = time.perf_counter() - t0
        rec["profile"] = profile
        self.manifest["blocks"].append(rec)
        self._write_manifest()
        for k in [k for k in self.manifest["inputs"] if int(k) < i]:  # keep the inputs of the last two blocks
            del self.manifest["inputs"][k]
            shutil.rmtree(self.work / "acts" / f"{int(k):05d}", ignore_errors=True)
        self.lazy.release(block)

    # ---------------------------------------------------------------- the end
    def finalize(self, report, tokenizer=None) -> dict | None:
        """Index, config, tokenizer and report next to the shards, then the folder moves to --out."""
        m = self.manifest
        if len(m["blocks"]) != self.n:
            raise RuntimeError(f"only {len(m['blocks'])} of {self.n} blocks are finished in {self.work}")
        try:
            check_unchanged(self.out)  # before the manifest goes: the run stays resumable if this refuses
        except FileExistsError as exc:
            raise FileExistsError(f"{exc}; every block is kept in {self.work}: move the new files away and "
                                  "rerun the command with --resume") from None
        recs = m["blocks"] + m["outside"]
        weight_map = {name: rec["file"] for rec in recs for name in rec["tensors"]}
        total = sum(b for rec in recs for b in rec["tensors"].values())
        fp_sizes: dict[torch.dtype, int] = {}
        specs = {k: v for rec in m["blocks"] for k, v in rec["specs"].items()}
        for rec in recs:
            for name, numel in rec["fp_numel"].items():
                fp_sizes[getattr(torch, name)] = fp_sizes.get(getattr(torch, name), 0) + numel
        report.summary.update({"bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                               "resumed_from_block": getattr(self, "resumed_from", 0)})
        if total <= min(self.max_shard_bytes, MERGE_BYTES):  # small models: one file, as save() writes it
            from safetensors.torch import load_file

            merged = {}
            for rec in recs:
                merged.update(load_file(str(self.work / rec["file"])))
            write_tensors(dict(sorted(merged.items())), self.work / WEIGHTS_NAME)
            for rec in recs:
                (self.work / rec["file"]).unlink()
        else:
            write_index(self.work, weight_map, total)
        qc = build_quantization_config(specs, report.config, report.summary) if self.packed else None
        write_metadata(self.work, self.lazy.model, qc, fp_sizes,
                       tokenizer=tokenizer, tokenizer_from=None if tokenizer is not None else self.lazy.folder,
                       report=report)
        for name in (MANIFEST, PREV_MANIFEST, "lock"):
            (self.work / name).unlink(missing_ok=True)
        shutil.rmtree(self.work / "acts", ignore_errors=True)
        publish(self.work, self.out)
        return qc

    def close(self) -> None:
        if self.writer and getattr(self, "_lock", None) is not None and not self._lock.closed:
            self._lock.close()
