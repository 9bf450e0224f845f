"""GPTQ's inverse Hessian factor: the blocked, thread-invariant `upper_inverse_factor_` (what lopro uses) against
LAPACK's route of the reference code (cholesky, cholesky_inverse, cholesky again), side by side per size and
thread count: median time, relative error against the fp64 reference route, and whether the bits of 1 and N
threads agree.

    python benchmarks/bench_factor.py [--sizes 576,1536,4096,11008] [--threads 1,2] [--repeats 3] [--out F.json]

The matrices are damped sample covariances of 2n Gaussian tokens (seeded), as a calibration Hessian is.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lopro.quant.hessian import upper_inverse_factor_


def hessian(n: int, seed: int = 0) -> torch.Tensor:
    X = torch.randn(2 * n, n, generator=torch.Generator().manual_seed(seed))
    H = X.T @ X / (2 * n)
    H.diagonal().add_(0.01 * torch.diag(H).mean())
    return H


def lapack(H: torch.Tensor) -> torch.Tensor:
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def blocked(H: torch.Tensor) -> torch.Tensor:
    A = H.clone()
    if not upper_inverse_factor_(A):
        raise RuntimeError("not positive definite")
    return A


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="576,1536,4096,11008")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    rows = []
    print(f"{'n':>6} {'thr':>3} {'lapack s':>9} {'blocked s':>9} {'ratio':>6} {'err lapack':>10} {'err blocked':>11} "
          f"{'same bits as 1 thread (lapack, blocked)':>40}", flush=True)
    for n in (int(x) for x in a.sizes.split(",")):
        H = hessian(n)
        ref = lapack(H.double())
        first = {}
        for threads in (int(x) for x in a.threads.split(",")):
            torch.set_num_threads(threads)
            row = {"n": n, "threads": threads}
            for name, fn in (("lapack", lapack), ("blocked", blocked)):
                times = []
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    U = fn(H)
                    times.append(time.perf_counter() - t0)
                row[f"{name}_s"] = statistics.median(times)
                row[f"{name}_err"] = ((U.double() - ref).norm() / ref.norm()).item()
                first.setdefault(name, U)
                row[f"{name}_same_bits_as_first"] = bool(torch.equal(U, first[name]))
                del U
            rows.append(row)
            print(f"{n:>6} {threads:>3} {row['lapack_s']:>9.3f} {row['blocked_s']:>9.3f} "
                  f"{row['blocked_s'] / row['lapack_s']:>6.2f} {row['lapack_err']:>10.2e} {row['blocked_err']:>11.2e} "
                  f"{str((row['lapack_same_bits_as_first'], row['blocked_same_bits_as_first'])):>40}", flush=True)
            if a.out:
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                Path(a.out).write_text(json.dumps({"repeats": a.repeats, "torch": torch.__version__,
                                                   "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
