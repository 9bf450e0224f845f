"""R1SVD versus torch.svd_lowrank and torch.linalg.svd: time and rank-r residual error.

Test matrices (seeded): ``A = G / sqrt(n) + Q_u diag(s) Q_v^T``, a Gaussian bulk (Marchenko-Pastur
spectrum, singular values up to about ``1 + sqrt(m/n)``, like the noise floor of a trained weight)
plus a rank-64 component with power-law singular values ``s_i = 20 (i + 1)^-0.8`` on random
orthonormal bases (QR of ``m x 64`` and ``n x 64`` Gaussians). So the top of the spectrum decays
smoothly into the bulk, as in LLM weights, and the spectrum is cheap to build at 11008 x 4096.

Errors are ``||A - A_r||_F`` divided by the truncated-SVD residual ``||A - U_r S_r V_r^T||_F``
(1.0 = optimal). Times are medians over ``--repeats`` runs (``--svd-repeats`` for the full SVD).

    python benchmarks/bench_r1svd.py [--quick] [--out benchmarks/results/r1svd.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from lopro.linalg.r1svd import r1svd

FULL_SHAPES = [(4096, 4096), (11008, 4096)]
QUICK_SHAPES = [(1024, 1024), (2752, 1024)]


def make_matrix(m: int, n: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = 64
    s = 20.0 * (torch.arange(k, dtype=torch.float32) + 1) ** -0.8
    qu, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
    qv, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    a = torch.randn(m, n, generator=gen) / math.sqrt(n)
    a.addmm_(qu * s, qv.T)
    return a.to(device)


def timed(fn, repeats: int, device: torch.device) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench_shape(m: int, n: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    a = make_matrix(m, n, args.seed, device)
    r = args.rank
    rows = []

    t_svd, (u, s, vh) = timed(
        lambda: torch.linalg.svd(a, full_matrices=False), args.svd_repeats, device
    )
    ref = torch.linalg.norm(a - (u[:, :r] * s[:r]) @ vh[:r]).item()

    def err(approx: torch.Tensor) -> float:
        return torch.linalg.norm(a - approx).item() / ref

    t, lr = timed(lambda: r1svd(a, r, iters=args.iters, seed=args.seed), args.repeats, device)
    rows.append(("r1svd", t, err(lr.dense())))
    t, lr = timed(
        lambda: r1svd(a, r, iters=args.iters, seed=args.seed, storage="fp8"), args.repeats, device
    )
    rows.append(("r1svd (fp8 U,V / fp16 S)", t, err(lr.dense())))
    torch.manual_seed(args.seed)
    t, (ul, sl, vl) = timed(
        lambda: torch.svd_lowrank(a, q=r, niter=args.iters), args.repeats, device
    )
    rows.append(("torch.svd_lowrank", t, err((ul * sl) @ vl.T)))
    rows.append(("torch.linalg.svd", t_svd, 1.0))
    return [
        {
            "shape": [m, n], "method": name, "seconds": sec,
            "speedup_vs_svd": t_svd / sec, "rel_residual_vs_truncated_svd": e,
        }
        for name, sec, e in rows
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--svd-repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads for every method (0: torch's default)")
    parser.add_argument("--out", default="benchmarks/results/r1svd.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    results = []
    for m, n in QUICK_SHAPES if args.quick else FULL_SHAPES:
        results += bench_shape(m, n, args, device)

    header = f"{'shape':>12}  {'method':<26} {'seconds':>9} {'x vs svd':>9} {'err / svd_r':>11}"
    print(f"rank {args.rank}, iters {args.iters}, device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(header)
    print("-" * len(header))
    for row in results:
        shape = "x".join(map(str, row["shape"]))
        print(f"{shape:>12}  {row['method']:<26} {row['seconds']:>9.3f} "
              f"{row['speedup_vs_svd']:>9.1f} {row['rel_residual_vs_truncated_svd']:>11.4f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "rank": args.rank, "iters": args.iters, "repeats": args.repeats,
        "svd_repeats": args.svd_repeats, "seed": args.seed, "device": str(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "processor": platform.processor(),
        "matrix": "G/sqrt(n) + Qu diag(20 (i+1)^-0.8, i<64) Qv^T",
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
