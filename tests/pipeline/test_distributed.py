"""torch.distributed (gloo, CPU): two processes quantize like one, and a dead rank ends the job with an error.

The processes are started here as torchrun would start them (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
environment) and run the CLI's quantize; rank 0 writes the folder. With fp64 Hessians the bytes are
identical; with the default fp32 accumulation one process adds its batches in fp32 while two sum fp32
partials in fp64, so a few fp16 scales can differ in their last bit (measured: 2 of 9 tensors here, codes
identical).
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import socket
import time
from pathlib import Path

import pytest

from conftest import tiny_llama

VOCAB = 49152


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, argv: list[str], result: str, die: bool, crash_after: int | None) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LOPRO_DIST_TIMEOUT="30", OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    if die:  # join the group, then vanish as a crashed or OOM-killed rank would
        from lopro.pipeline.distributed import Dist

        Dist.from_env(torch.device("cpu"))
        os._exit(17)
    if crash_after is not None:  # the whole job dies (SIGKILL, OOM) once this block is written
        from lopro.io.stream import StreamedRun

        finish = StreamedRun.finish_block

        def finish_then_die(self, i, *a, **kw):
            finish(self, i, *a, **kw)
            if i == crash_after:
                self.dist.barrier()
                os._exit(9)

        StreamedRun.finish_block = finish_then_die
    from lopro.cli import main

    t0 = time.perf_counter()
    rc = main(argv)
    Path(result).write_text(f"{rc} {time.perf_counter() - t0:.1f}")


def launch(world: int, argv: list[str], tmp: Path, die_rank: int | None = None, timeout: float = 240,
           crash_after: int | None = None):
    ctx = mp.get_context("spawn")
    port = _free_port()
    for r in range(world):
        (tmp / f"rc{r}").unlink(missing_ok=True)
    procs = [ctx.Process(target=_worker, args=(r, world, port, argv, str(tmp / f"rc{r}"), r == die_rank,
                                                crash_after)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        assert not p.is_alive(), "a rank hung past the timeout"
    return [(tmp / f"rc{r}").read_text().split() if (tmp / f"rc{r}").exists() else None for r in range(world)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_path):
    from transformers import AutoTokenizer

    from lopro.data.corpora import load_corpus

    root = tmp_path_factory.mktemp("dist")
    tiny_llama(layers=2, vocab=VOCAB).save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(smollm2_path).save_pretrained(root / "model")
    (root / "text.txt").write_text(load_corpus("wiki").split("eval")[:20_000])
    return root


def args(root: Path, out: Path, method: str) -> list[str]:
    return ["quantize", "--model", str(root / "model"), "--method", method, "--bits", "3", "--group-size", "32",
            "--rank", "4", "--block-identity", "16", "--block-hadamard", "16", "--nsamples", "8", "--seqlen", "32",
            "--batch-size", "2", "--calib-data", str(root / "text.txt"), "--device", "cpu", "--out", str(out),
            "--option", "hessian_dtype=fp64"]


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("method", ["gptq", "lopro"])
def test_two_processes_write_the_bytes_one_process_writes(setup, tmp_path, method):
    from lopro.cli import main

    assert main(args(setup, tmp_path / "one", method)) == 0
    rcs = launch(2, args(setup, tmp_path / "two", method), tmp_path)
    assert [r[0] for r in rcs] == ["0", "0"]
    assert digest(tmp_path / "two") == digest(tmp_path / "one")


def test_a_dead_rank_ends_the_job_with_an_error(setup, tmp_path):
    t0 = time.perf_counter()
    rcs = launch(2, args(setup, tmp_path / "out", "gptq"), tmp_path, die_rank=1, timeout=120)
    assert rcs[1] is None and rcs[0] is not None and rcs[0][0] != "0"
    assert time.perf_counter() - t0 < 120 and not (tmp_path / "out").exists()


def test_resume_under_torchrun_continues_with_the_same_bytes(setup, tmp_path):
    out = tmp_path / "out"
    rcs = launch(2, args(setup, out, "gptq"), tmp_path, crash_after=0)
    assert rcs == [None, None] and not out.exists()  # both ranks died after block 0 was written
    rcs = launch(2, [*args(setup, out, "gptq"), "--resume"], tmp_path)
    assert [r[0] for r in rcs] == ["0", "0"]
    from lopro.cli import main

    assert main(args(setup, tmp_path / "one", "gptq")) == 0
    assert digest(out) == digest(tmp_path / "one")
    import json

    assert json.loads((out / "report.json").read_text())["summary"]["resumed_from_block"] == 1
