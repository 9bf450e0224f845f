"""Several processes on one quantization, through torch.distributed (launched by torchrun).

Data parallel: each rank holds a contiguous share of the calibration windows and their activations,
accumulates its share of every layer's X^T X, and the sums are all-reduced in fp64 (so that the order of
the reduction moves the fp32 Hessian by at most its last bit). The layers of a stage are owned by ranks
(largest solve first, in_features^2 x out_features, to the least loaded rank), solved there in parallel,
and each result is broadcast from its owner; every rank then propagates its own windows through the
quantized block. Every rank reads the same block from the checkpoint; only rank 0 writes.

A single process (no torchrun) gets ``Dist()`` (rank 0 of 1), for which every call below is a no-op.
NCCL on CUDA, gloo on CPU; the code is the same, only the backend and the device differ. Collectives
time out after ``LOPRO_DIST_TIMEOUT`` seconds (default 1800, longer than any block's solve), so a rank
that dies or hangs ends the job with an error instead of a silent hang.
"""
from __future__ import annotations

import datetime
import logging
import os
import time

import torch

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800


class Dist:
    """Rank, world size and the collectives the pipeline needs."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None):
        self.rank, self.world = rank, world
        self.device = device or torch.device("cpu")
        self.comm_seconds = 0.0  # time spent in collectives (waiting for other ranks included)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> "Dist":
        """The process group torchrun describes in the environment (WORLD_SIZE > 1), or a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            timeout = datetime.timedelta(seconds=float(os.environ.get("LOPRO_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
            if device.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend, timeout=timeout)
        rank = dist.get_rank()
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        log.info("rank %d of %d (%s)", rank, dist.get_world_size(), dist.get_backend())
        return cls(rank, dist.get_world_size(), device)

    # ------------------------------------------------------------------ data
    def shard(self, calibration: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's contiguous share of the calibration windows."""
        if calibration is None or not self.enabled:
            return calibration
        if calibration.shape[0] < self.world:
            raise ValueError(f"{calibration.shape[0]} calibration windows cannot be shared by {self.world} "
                             "processes: use at least one window per process")
        return calibration.tensor_split(self.world)[self.rank]

    def reduce_accumulators(self, acc: dict, make) -> None:
        """Sum every rank's X^T X, |x| sums and token counts into each rank's accumulators (in place).

        `make(key)` creates an empty accumulator for a key another rank has (an MoE expert this rank's
        tokens never reached), so that every rank reduces the same tensors in the same order."""
        if not self.enabled:
            return
        import torch.distributed as dist

        t0 = time.perf_counter()
        keys = self.gather_objects(sorted(acc))
        for key in sorted(set().union(*keys)):
            if key not in acc:
                acc[key] = make(key)
        for key in sorted(acc):
            a = acc[key]
            for name in ("xtx", "abssum"):
                t = getattr(a, name)
                wide = t.to(self.device, torch.float64)
                dist.all_reduce(wide)
                setattr(a, name, wide.to(t.device, t.dtype))
            counts = torch.tensor([float(a.tokens), float(a.weight)], dtype=torch.float64, device=self.device)
            dist.all_reduce(counts)
            a.tokens, a.weight = int(round(counts[0].item())), counts[1].item()
        self.comm_seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ work
    def owners(self, names: list[str], cost: dict[str, float]) -> dict[str, int]:
        """Largest solve first, each to the least loaded rank (ties: the lowest rank)."""
        if not self.enabled:
            return {n: 0 for n in names}
        load = [0.0] * self.world
        out = {}
        for n in sorted(names, key=lambda n: (-cost[n], names.index(n))):
            r = min(range(self.world), key=lambda k: (load[k], k))
            out[n] = r
            load[r] += cost[n]
        return out

    def broadcast(self, obj, src: int, map_location=None):
        """`obj` from rank `src` on every rank: serialized by torch.save (tensors exact, bit for bit) and
        loaded onto `map_location` (default: the CPU); rank `src` keeps its own object."""
        if not self.enabled:
            return obj
        import io

        import torch.distributed as dist

        t0 = time.perf_counter()
        comm = self.device if self.device.type == "cuda" else torch.device("cpu")
        if self.rank == src:
            buf = io.BytesIO()
            torch.save(obj, buf)
            data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        size = size.to(comm)
        dist.broadcast(size, src)
        payload = data.to(comm) if self.rank == src else torch.empty(int(size.item()), dtype=torch.uint8, device=comm)
        dist.broadcast(payload, src)
        self.comm_seconds += time.perf_counter() - t0
        if self.rank == src:
            return obj
        return torch.load(io.BytesIO(payload.cpu().numpy().tobytes()), map_location=map_location or "cpu",
                          weights_only=False)

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank."""
        if not self.enabled:
            return flag
        return all(self.gather_objects(bool(flag)))

    def gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
