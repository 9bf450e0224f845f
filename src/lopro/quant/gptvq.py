"""GPTVQ: the GPTQ column loop with vector quantization (Van Baalen et al. 2024).

Pure solver functions on tensors, beside GPTQ:

- :func:`kmeans` -- seeded, batched, (per-dimension) weighted k-means with k-means++ init.
- :func:`gptvq_quantize` -- GPTVQ: codebooks fitted per (row block, column group) by
  Hessian-weighted k-means on the error-updated weights, ``d`` columns quantized at a time with
  GPTQ error feedback, 8-bit codebooks, optional least-squares codebook refinement.
- :func:`rtn_vq` -- the "RTN-VQ" baseline: the same codebooks without any Hessian information.
- :func:`vq_decode` -- lookup decoding of a stored result (what a QuantLinear does).

Layout (see :class:`VQLayout`). The ``n`` input columns are zero-padded to ``n_pad``, a multiple
of ``d``; vector ``v`` of row ``i`` is ``W[i, v*d:(v+1)*d]`` (``d`` adjacent input columns), so
``indices`` is ``[m, n_pad // d]``. Column groups: ``ng = max(1, round(n / columns_per_group))``
groups that split the ``n_pad // d`` vector columns as evenly as possible (widths differ by at
most ``d``): a width of 576 with 256 columns per group gives two groups of 288 rather than
256 + 256 + 64. Row blocks: ``nr = max(1, round(m * n / (ng * group_size)))`` blocks that split
the ``m`` rows as evenly as possible, the same for every column group. Each (column group ``g``,
row block ``r``) pair owns codebook ``g * nr + r``, so every codebook covers about
``group_size`` weights and the codebook overhead stays near ``k * d * codebook_bits / group_size``
bits per weight for any shape (exactly 0.125 for 4096 x 4096 and 576 x 576 with the defaults).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from lopro.quant.hessian import prepare
from lopro.quant.loss import layer_loss

log = logging.getLogger(__name__)

SUPPORTED_BITS = (1, 2, 3, 4)
SUPPORTED_DIMS = (1, 2, 3, 4)
# Paper overhead target: codebook bits per weight (k * d * codebook_bits / group_size).
CODEBOOK_OVERHEAD_BITS = 0.125
SCALE_BITS = 16  # one fp16 scale per codebook


@dataclass
class VQConfig:
    """GPTVQ hyper-parameters. Defaults: the paper's 2-bit setting (2.125 bits per weight)."""

    bits: int = 2  # index bits per dimension: codebook size k = 2 ** (bits * dim)
    dim: int = 2  # VQ dimension d: a vector is d adjacent input columns of one row
    group_size: int = 2048  # weights per codebook (about; see the module docstring)
    columns_per_group: int = 256  # columns per column group (adapted to the width)
    kmeans_iters: int = 20  # Lloyd iterations of the codebook init
    refine_iters: int = 5  # conjugate-gradient steps of the least-squares codebook update
    codebook_bits: int = 8  # codebook entries: symmetric int, one fp16 scale per codebook
    blocksize: int = 128  # lazy-batch block of the GPTQ loop (rounded down to a multiple of d)
    damp_percent: float = 0.01
    seed: int = 0
    # "block": assign each vector by the exact GPTQ loss of its d columns, ||(w - c) U_bb^-1||^2
    # with U_bb the d x d block of the inverse-Hessian Cholesky factor; "diag": weighted
    # Euclidean distance with weights 1 / diag(H^-1), the same metric as the k-means init.
    assign_metric: str = "block"

    def __post_init__(self) -> None:
        if not (self.bits in SUPPORTED_BITS):
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if not (self.dim in SUPPORTED_DIMS):
            raise ValueError(f"dim must be one of {SUPPORTED_DIMS}, got {self.dim}")
        if not (self.bits * self.dim <= 15):
            raise ValueError(f"codebook of 2**{self.bits * self.dim} entries is too big")
        if not (self.group_size >= self.dim):
            raise ValueError(f"group_size {self.group_size} < dim {self.dim}")
        if not (self.columns_per_group >= self.dim):
            raise ValueError("columns_per_group must be >= dim")
        if not (2 <= self.codebook_bits <= 8):
            raise ValueError(f"codebook_bits must be in [2, 8], got {self.codebook_bits}")
        if not (self.kmeans_iters >= 0 and self.refine_iters >= 0):
            raise ValueError("iteration counts must be >= 0")
        if not (self.blocksize >= self.dim):
            raise ValueError(f"blocksize {self.blocksize} < dim {self.dim}")
        if not (self.damp_percent > 0):
            raise ValueError("damp_percent must be > 0")
        if self.assign_metric not in ("block", "diag"):
            raise ValueError(f"unknown assign_metric {self.assign_metric!r}; use 'block' or 'diag'")

    @property
    def k(self) -> int:
        """Codebook size."""
        return 2 ** (self.bits * self.dim)

    @classmethod
    def for_bits(cls, bits: int, width: int | None = None, dim: int = 2, **overrides) -> "VQConfig":
        """Paper defaults for ``bits``: d = 2 and a group size giving 0.125 bits of codebook.

        2 bits: group 2048; 3 bits: group 8192; 4 bits: group 32768 (``k * d * 8 / 0.125``).
        ``width`` (the layer's input size) caps ``columns_per_group`` at 256 or the width; the
        row blocks then keep each codebook at about ``group_size`` weights (module docstring).
        """
        cb_bits = overrides.get("codebook_bits", 8)
        group_size = int(2 ** (bits * dim) * dim * cb_bits / CODEBOOK_OVERHEAD_BITS)
        cpg = 256 if width is None else max(dim, min(256, int(width)))
        kw = dict(bits=bits, dim=dim, group_size=group_size, columns_per_group=cpg)
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VQLayout:
    """Which codebook decodes which vector; see the module docstring for the rule."""

    shape: tuple[int, int]  # (m, n) of the original weight
    dim: int
    col_bounds: tuple[int, ...]  # column-group boundaries in (padded) columns, multiples of dim
    row_bounds: tuple[int, ...]  # row-block boundaries, shared by all column groups

    @property
    def n_pad(self) -> int:
        return self.col_bounds[-1]

    @property
    def num_col_groups(self) -> int:
        return len(self.col_bounds) - 1

    @property
    def num_row_blocks(self) -> int:
        return len(self.row_bounds) - 1

    @property
    def num_codebooks(self) -> int:
        return self.num_col_groups * self.num_row_blocks

    @classmethod
    def make(cls, m: int, n: int, cfg: VQConfig) -> "VQLayout":
        d = cfg.dim
        nv = -(-n // d)
        ng = max(1, min(nv, round(n / cfg.columns_per_group)))
        col_bounds = tuple(d * ((g * nv) // ng) for g in range(ng + 1))
        nr = max(1, min(m, round(m * n / (ng * cfg.group_size))))
        row_bounds = tuple((r * m) // nr for r in range(nr + 1))
        return cls((m, n), d, col_bounds, row_bounds)

    def codebook_map(self, device=None) -> Tensor:
        """``[m, n_pad // dim]`` int64: the codebook id of every vector."""
        m = self.shape[0]
        rb = torch.tensor(self.row_bounds[1:-1], dtype=torch.long, device=device)
        cb = torch.tensor(self.col_bounds[1:-1], dtype=torch.long, device=device) // self.dim
        row_block = torch.bucketize(torch.arange(m, device=device), rb, right=True)
        col_group = torch.bucketize(torch.arange(self.n_pad // self.dim, device=device), cb, right=True)
        return col_group[None, :] * self.num_row_blocks + row_block[:, None]

    def effective_bits(self, bits: int, codebook_bits: int = 8, include_scales: bool = False) -> float:
        """Bits per weight of this layout: indices + int codebook entries (+ fp16 scales)."""
        m, n = self.shape
        k = 2 ** (bits * self.dim)
        total = m * self.n_pad * bits + self.num_codebooks * k * self.dim * codebook_bits
        if include_scales:
            total += self.num_codebooks * SCALE_BITS
        return total / (m * n)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VQResult:
    weight: Tensor  # dequantized W_hat, [m, n] fp32 (exactly vq_decode of the fields below)
    indices: Tensor  # [m, n_pad // d] uint8 (k <= 256) or int16: codeword of each vector
    codebooks: Tensor  # [num_codebooks, k, d] int8 entries
    codebook_scale: Tensor  # [num_codebooks] fp16; entry value = codebooks * scale
    layout: VQLayout
    bits: int
    codebook_bits: int = 8
    seed: int = 0
    stats: dict = field(default_factory=dict)

    def effective_bits(self, include_scales: bool = False) -> float:
        """Stored bits per weight: index bits + codebook entries (+ fp16 scales if asked).

        The default counts as the GPTVQ paper does (2.125 / 3.125 bits with the defaults); the
        per-codebook fp16 scale adds ``16 / group_size`` more (0.0078 at group 2048).
        """
        m, n = self.layout.shape
        ncb, k, d = self.codebooks.shape
        total = self.indices.numel() * self.bits * d + ncb * k * d * self.codebook_bits
        if include_scales:
            total += self.codebook_scale.numel() * SCALE_BITS
        return total / (m * n)

    def decode(self) -> Tensor:
        return vq_decode(self.indices, self.codebooks, self.codebook_scale, self.layout)

    # the same interface as the scalar solvers' ScalarQuant, so recipes treat both alike
    def dequantize(self) -> Tensor:
        return self.weight


# ----------------------------------------------------------------------------------- k-means

def _as_batched(X: Tensor, weights: Tensor | None):
    """X -> [B, N, d] fp32; weights (None, [.., N] or [.., N, d]) -> [B, N, d]."""
    squeeze = X.dim() == 2
    Xb = X[None] if squeeze else X
    Xb = Xb.to(torch.float32)
    if weights is None:
        Wb = torch.ones_like(Xb)
    else:
        Wb = weights.to(device=X.device, dtype=torch.float32)
        if squeeze:
            Wb = Wb[None]
        if Wb.dim() == 2:
            Wb = Wb[..., None]
        Wb = Wb.expand_as(Xb)
    return Xb, Wb, squeeze


def _sample(p: Tensor, gen: torch.Generator) -> Tensor:
    """One index per row of ``p [B, N]`` (non-negative, non-zero rows), drawn with ``gen``."""
    cdf = torch.cumsum(p.to(torch.float64), dim=1)
    u = torch.rand(p.shape[0], 1, generator=gen, dtype=torch.float64, device=p.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=p.shape[1] - 1)


def _wsq(X: Tensor, Wt: Tensor, c: Tensor) -> Tensor:
    """``sum_j Wt[..., j] (X[..., j] - c[..., j])^2`` as d slices (d is tiny; avoids a slow reduction)."""
    out = Wt[..., 0] * (X[..., 0] - c[..., 0]) ** 2
    for j in range(1, X.shape[-1]):
        out += Wt[..., j] * (X[..., j] - c[..., j]) ** 2
    return out


def _kmeanspp(X: Tensor, Wt: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Weighted k-means++ seeding, batched over B; zero-weight points are never picked."""
    B, N, d = X.shape
    valid = (Wt.sum(-1) > 0).to(torch.float32)
    valid = torch.where(valid.sum(-1, keepdim=True) > 0, valid, torch.ones_like(valid))
    bidx = torch.arange(B, device=X.device)
    C = torch.empty(B, k, d, dtype=X.dtype, device=X.device)
    mass = Wt.sum(-1) * valid
    C[:, 0] = X[bidx, _sample(torch.where(mass.sum(-1, keepdim=True) > 0, mass, valid), gen)]
    D = _wsq(X, Wt, C[:, :1])
    for c in range(1, k):
        p = D * valid
        # every point already coincides with a centroid: pick any valid point (duplicates)
        p = torch.where(p.sum(-1, keepdim=True) > 0, p, valid)
        C[:, c] = X[bidx, _sample(p, gen)]
        D = torch.minimum(D, _wsq(X, Wt, C[:, c:c + 1]))
    return C


class _Assigner:
    """Nearest centroid under the weighted distance, ``argmin_c sum_j w_j (c_j^2 - 2 x_j c_j)`` (the
    ``w x^2`` term does not change the argmin), first index on ties as ``torch.min`` gives; and, for
    Lloyd's update, ``[sum w x, sum w]`` of the points each centroid gets.

    ``torch.min(dim)`` with indices is a slow, scalar reduction on CPU, ``amin`` a vectorized one. So
    per cache-sized chunk: the scores ``[b, k, n]`` from one bmm, their minimum from ``amin`` over
    the centroids, then the 0/1 mask of the centroids that reach it, which gives by matmuls the index
    and the count of minimal centroids of each point and the per-centroid sums. Points whose count
    is not 1 (ties: duplicate centroids) get their index from ``argmin`` on them alone, and the sums
    are then redone by a scatter. Zero-weight points (padding, dead columns) score 0 everywhere:
    index 0, no mass. About 2-3x faster than bmm + ``torch.min`` + scatter."""

    CHUNK = 1 << 18  # score entries per chunk (1 MiB of fp32)

    def __init__(self, X: Tensor, Wt: Tensor, k: int):
        self.A = torch.cat([Wt * X, Wt], dim=-1)  # [B, N, 2d]
        self.At = self.A.transpose(1, 2).contiguous()  # [B, 2d, N]
        B, N = X.shape[:2]
        dev, dt = X.device, X.dtype
        self.dead = (Wt == 0).all(-1)  # [B, N]: every score is 0
        self.cs = min(N, max(256, self.CHUNK // k))
        self.cb = max(1, min(B, self.CHUNK // (k * self.cs)))
        self.buf = torch.empty(self.cb, k, self.cs, dtype=dt, device=dev)
        self.mins = torch.empty(self.cb, 1, self.cs, dtype=dt, device=dev)
        # (lift @ mask): row 0 the index sum, row 1 the count of the minimal centroids of each point
        self.lift = torch.stack([torch.arange(k, dtype=dt, device=dev), torch.ones(k, dtype=dt, device=dev)])
        self.found = torch.empty(B, 2, N, dtype=dt, device=dev)

    def __call__(self, C: Tensor, sums: Tensor | None = None) -> Tensor:
        """Indices ``[B, N]`` int64; with ``sums`` (``[B, 2d, k]``, zeroed) also their per-centroid sums."""
        Bm = torch.cat([-2 * C, C * C], dim=-1)  # [B, k, 2d]
        B, N = self.A.shape[:2]
        for b0 in range(0, B, self.cb):
            b1 = min(B, b0 + self.cb)
            for s in range(0, N, self.cs):
                e = min(N, s + self.cs)
                scores = torch.bmm(Bm[b0:b1], self.At[b0:b1, :, s:e], out=self.buf[:b1 - b0, :, :e - s])
                mins = torch.amin(scores, 1, keepdim=True, out=self.mins[:b1 - b0, :, :e - s])
                mask = torch.le(scores, mins, out=scores)
                torch.matmul(self.lift, mask, out=self.found[b0:b1, :, s:e])
                if sums is not None:  # dead points have zero rows in A: they add nothing
                    sums[b0:b1].baddbmm_(self.At[b0:b1, :, s:e], mask.transpose(1, 2))
        out = self.found[:, 0].to(torch.long).masked_fill_(self.dead, 0)
        tie = torch.nonzero(((self.found[:, 1] != 1) & ~self.dead).view(-1)).view(-1)  # flat b * N + n
        if tie.numel():
            a = self.A.view(B * N, -1).index_select(0, tie)  # [p, 2d]
            bm = Bm.index_select(0, tie // N)  # [p, k, 2d]
            sc = bm[..., 0] * a[:, :1]  # [p, k], as 2d multiply-adds (a batch of tiny bmm is slow)
            for j in range(1, a.shape[1]):
                sc.addcmul_(bm[..., j], a[:, j:j + 1])
            out.view(-1).index_copy_(0, tie, sc.argmin(-1))
            if sums is not None:
                sums.zero_().scatter_add_(2, out[:, None, :].expand(-1, self.At.shape[1], -1), self.At)
        return out


def kmeans_objective(X: Tensor, C: Tensor, assignment: Tensor, weights: Tensor | None = None) -> Tensor:
    """Weighted sum of squared errors (per batch entry when batched)."""
    Xb, Wb, squeeze = _as_batched(X, weights)
    Cb = C[None] if squeeze else C
    a = assignment[None] if squeeze else assignment
    picked = torch.gather(Cb.to(torch.float32), 1, a[..., None].expand(-1, -1, Xb.shape[-1]))
    obj = (Wb * (Xb - picked) ** 2).sum((-1, -2))
    return obj[0] if squeeze else obj


def kmeans(X: Tensor, k: int, weights: Tensor | None = None, iters: int = 20, seed: int = 0,
           init: Tensor | None = None, history: list | None = None) -> tuple[Tensor, Tensor]:
    """Weighted k-means (k-means++ init, then Lloyd), seeded; batched over a leading dim.

    X: ``[N, d]`` or ``[B, N, d]``. weights: None, per point (``[.., N]``) or per point and
    dimension (``[.., N, d]``); the distance is ``sum_j w_j (x_j - c_j)^2``. Points with zero
    weight do not move centroids. ``init`` replaces the k-means++ seeding. If ``history`` is a
    list, the objective after each Lloyd step is appended. Empty clusters keep their centroid.
    Returns ``(centroids [.., k, d], assignment [.., N] int64)``.
    """
    Xb, Wb, squeeze = _as_batched(X, weights)
    B, N, d = Xb.shape
    gen = torch.Generator(device=Xb.device).manual_seed(int(seed))
    if init is None:
        C = _kmeanspp(Xb, Wb, k, gen)
    else:
        C = (init[None] if squeeze else init).to(torch.float32).clone()
    nearest = _Assigner(Xb, Wb, k)
    sums = torch.zeros(B, 2 * d, k, dtype=C.dtype, device=C.device)  # [sum w x; sum w] per centroid
    assign = nearest(C, sums if iters else None)
    for it in range(iters):
        num, den = sums[:, :d].transpose(1, 2), sums[:, d:].transpose(1, 2)
        C = torch.where(den > 0, num / den.clamp_min(1e-30), C)
        new_assign = nearest(C, sums.zero_() if it + 1 < iters else None)
        if history is not None:
            history.append(kmeans_objective(Xb, C, new_assign, Wb))
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    if squeeze:
        return C[0], assign[0]
    return C, assign


# ------------------------------------------------------------------------- codebook storage

def quantize_codebooks(C: Tensor, codebook_bits: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric per-codebook quantization of ``C [B, k, d]``.

    Returns ``(int8 entries, fp16 scale [B], dequantized fp32)``; the scale is rounded to fp16
    before use, so the dequantized codebook is exactly what ``vq_decode`` rebuilds.
    """
    qmax = 2 ** (codebook_bits - 1) - 1
    amax = C.abs().amax(dim=(1, 2))
    scale16 = (amax / qmax).to(torch.float16)
    scale16 = torch.where(scale16 > 0, scale16, torch.ones_like(scale16))
    scale = scale16.to(torch.float32)[:, None, None]
    Cq = torch.round(C / scale).clamp_(-qmax, qmax).to(torch.int8)
    return Cq, scale16, Cq.to(torch.float32) * scale


def vq_decode(indices: Tensor, codebooks: Tensor, codebook_scale: Tensor, layout: VQLayout) -> Tensor:
    """Rebuild ``W_hat [m, n]`` fp32 by codebook lookup."""
    C = codebooks.to(torch.float32) * codebook_scale.to(torch.float32)[:, None, None]
    ids = layout.codebook_map(device=indices.device)
    m, n = layout.shape
    W = C[ids, indices.long()]  # [m, nv, d]
    return W.reshape(m, -1)[:, :n].contiguous()


def _index_dtype(k: int) -> torch.dtype:
    return torch.uint8 if k <= 256 else torch.int16


# --------------------------------------------------------------------------- shared pieces

def _block_vectors(W: Tensor, wcol: Tensor, layout: VQLayout, c0: int, c1: int):
    """Vectors of column group [c0, c1) split into row blocks, padded to ``[nr, N, d]``.

    Padding vectors get zero weight. Returns (X, weights, rows ``[nr, rmax]`` with -1 = pad).
    """
    d = layout.dim
    rb = layout.row_bounds
    nr = len(rb) - 1
    rmax = max(rb[r + 1] - rb[r] for r in range(nr))
    nvg = (c1 - c0) // d
    rows = torch.full((nr, rmax), -1, dtype=torch.long, device=W.device)
    for r in range(nr):
        rows[r, :rb[r + 1] - rb[r]] = torch.arange(rb[r], rb[r + 1], device=W.device)
    ok = rows >= 0
    X = W[rows.clamp_min(0), c0:c1].reshape(nr, rmax * nvg, d)
    Wt = wcol[c0:c1].reshape(1, 1, nvg, d).expand(nr, rmax, nvg, d) * ok[:, :, None, None]
    return X, Wt.reshape(nr, rmax * nvg, d), rows


def _fit_group(W: Tensor, wcol: Tensor, layout: VQLayout, c0: int, c1: int, cfg: VQConfig,
               seed: int) -> tuple[Tensor, Tensor, Tensor]:
    X, Wt, _ = _block_vectors(W, wcol, layout, c0, c1)
    C, _ = kmeans(X, cfg.k, weights=Wt, iters=cfg.kmeans_iters, seed=seed)
    return quantize_codebooks(C, cfg.codebook_bits)


def _row_codebook(layout: VQLayout) -> Tensor:
    """Row block of every row, ``[m]`` int64."""
    return layout.codebook_map()[:, 0]


def _pad(W: Tensor, n_pad: int) -> Tensor:
    return torch.nn.functional.pad(W, (0, n_pad - W.shape[1]))


def _refine_codebooks(W0: Tensor, H: Tensor, Cf: Tensor, indices: Tensor, ids: Tensor, iters: int) -> Tensor:
    """Least squares on codebook entries with assignments fixed: conjugate gradient on
    ``min_C tr((W_hat(C) - W0) H (W_hat(C) - W0)^T)``, W_hat linear in C (a gather)."""
    ncb, k, d = Cf.shape
    m = W0.shape[0]
    key = (ids * k + indices.long()).reshape(-1)  # [m * nv]

    def gather(C):
        return C.reshape(ncb * k, d)[key].reshape(m, -1)

    def scatter(G):
        return torch.zeros(ncb * k, d, dtype=G.dtype, device=G.device).index_add_(
            0, key, G.reshape(-1, d)).reshape(ncb, k, d)

    C = Cf.clone()
    r = -scatter((gather(C) - W0) @ H)
    p = r.clone()
    rr = (r * r).sum()
    for _ in range(iters):
        if rr <= 0:
            break
        Ap = scatter(gather(p) @ H)
        pAp = (p * Ap).sum()
        if not pAp > 0:
            break
        alpha = rr / pAp
        C += alpha * p
        r -= alpha * Ap
        rr_new = (r * r).sum()
        p = r + (rr_new / rr) * p
        rr = rr_new
    return C


# ----------------------------------------------------------------------------------- solvers

def _block_inverses(U: Tensor, d: int, ignored: Tensor) -> Tensor:
    """``[n_pad // d, d, d]``: inverses of the d x d diagonal blocks of ``U``, with the rows of
    ignored (dead or padding) columns zeroed so that their error neither counts nor propagates."""
    nb = U.shape[0] // d
    blocks = U.reshape(nb, d, nb, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    A = torch.linalg.inv(blocks)
    return A * (~ignored).reshape(nb, d, 1).to(A.dtype)


def _gptvq_group(Wc: Tensor, U: Tensor, A: Tensor, Cf: Tensor, row_cb: Tensor, c0: int, c1: int,
                 cfg: VQConfig, wcol: Tensor, Q: Tensor, codes: Tensor) -> float:
    """The GPTQ lazy-batch loop over columns [c0, c1), d at a time, with the group's codebooks
    ``Cf [nr, k, d]`` (``row_cb`` maps rows to them). Updates Wc, Q and codes in place and
    returns ``sum ||err||^2``, which equals the group's share of the damped-Hessian loss."""
    d = cfg.dim
    bs = max(d, (cfg.blocksize // d) * d)
    loss = 0.0
    Cr = Cf[row_cb]  # [m, k, d]: each row's own codebook, gathered once per group
    Crd = [Cr[..., t].contiguous() for t in range(d)]  # its d coordinates, [m, k] each
    rows = torch.arange(Cr.shape[0], device=Cr.device)
    if cfg.assign_metric == "block":  # the metric G = M M^T of every vector position of the group
        G = A[c0 // d:c1 // d] @ A[c0 // d:c1 // d].transpose(1, 2)
    else:
        G = torch.diag_embed(wcol[c0:c1].reshape(-1, d))
    for i1 in range(c0, c1, bs):
        i2 = min(i1 + bs, c1)
        W1 = Wc[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for j in range(0, i2 - i1, d):
            v = (i1 + j) // d
            w = W1[:, j:j + d]
            # nearest codeword under ||(w - c) M||^2 = c G c^T - 2 (w G) . c + const: the quadratic term per
            # codebook, the cross term as d multiply-adds over [m, k] (tiny matmuls cost more than they do)
            Gv = G[v - c0 // d]
            score = ((Cf.reshape(-1, d) @ Gv).reshape(Cf.shape) * Cf).sum(-1)[row_cb]
            wG = w @ Gv
            for t in range(d):
                score.addcmul_(wG[:, t:t + 1], Crd[t], value=-2)
            idx = score.argmin(-1)
            q = Cr[rows, idx]
            Q[:, i1 + j:i1 + j + d] = q
            codes[:, v] = idx
            err = (w - q) @ A[v]
            W1[:, j + d:].addmm_(err, U1[j:j + d, j + d:], alpha=-1)
            Err1[:, j:j + d] = err
        Wc[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
        loss += float((Err1 * Err1).sum(dtype=torch.float64))
    return loss


def gptvq_quantize(W: Tensor, H: Tensor, cfg: VQConfig | None = None) -> VQResult:
    """GPTVQ of ``W [m, n]`` against the proxy Hessian ``H [n, n]``.

    Per column group: fit the group's codebooks (k-means weighted by ``1 / diag(H^-1)``) on the
    current, error-updated weights; quantize them to int8; then walk the group ``d`` columns at a
    time: assign each row's vector to a codeword, and push the error onto the later columns as
    GPTQ does, ``err = (w - q) U_bb^-1``, ``W[:, later] -= err @ U[cols, later]`` (U the upper
    Cholesky factor of the damped H^-1, ``U_bb`` its d x d diagonal block). Lazy batches of
    ``blocksize`` columns never straddle a column group, so each group is fitted on fully
    updated weights. With ``refine_iters`` > 0 the codebooks are then refit by least squares
    (assignments fixed) and kept only if the int8-rounded result lowers the loss.
    """
    cfg = cfg or VQConfig()
    m, n = W.shape
    d, k = cfg.dim, cfg.k
    layout = VQLayout.make(m, n, cfg)
    n_pad = layout.n_pad
    Wc, _, _, U = prepare(W, H, cfg.damp_percent)
    dev = Wc.device
    Wc = _pad(Wc, n_pad)
    Up = torch.eye(n_pad, dtype=torch.float32, device=dev)
    Up[:n, :n] = U
    U = Up
    ignored = torch.ones(n_pad, dtype=torch.bool, device=dev)
    ignored[:n] = torch.diag(H.to(dev)) == 0
    A = _block_inverses(U, d, ignored)
    # k-means weights: 1 / diag(H^-1) per column; zero for dead and padding columns
    wcol = torch.where(ignored, 0.0, 1.0 / (U * U).sum(0))

    row_cb = _row_codebook(layout).to(dev)
    Q = torch.zeros_like(Wc)
    codes = torch.zeros(m, n_pad // d, dtype=torch.long, device=dev)
    fitted = []
    feedback_loss = 0.0
    for g in range(layout.num_col_groups):
        c0, c1 = layout.col_bounds[g], layout.col_bounds[g + 1]
        fitted.append(_fit_group(Wc, wcol, layout, c0, c1, cfg, cfg.seed + g))
        feedback_loss += _gptvq_group(Wc, U, A, fitted[-1][2], row_cb, c0, c1, cfg, wcol, Q, codes)
    Cq, S, Cf = (torch.cat(t) for t in zip(*fitted))

    Hf = torch.zeros(n_pad, n_pad, dtype=torch.float32, device=dev)
    Hf[:n, :n] = H.to(device=dev, dtype=torch.float32)
    W0 = _pad(W.detach().to(device=dev, dtype=torch.float32), n_pad)
    # feedback_loss: sum of the GPTQ errors, = the loss under the damped H before refinement
    stats = {"feedback_loss": feedback_loss, "loss_before_refine": layer_loss(W0, Q, Hf)}
    stats["loss"] = stats["loss_before_refine"]
    if cfg.refine_iters > 0:
        ids = layout.codebook_map(device=dev)
        C_ref = _refine_codebooks(W0, Hf, Cf, codes, ids, cfg.refine_iters)
        Cq2, S2, Cf2 = quantize_codebooks(C_ref, cfg.codebook_bits)
        Q2 = Cf2.reshape(-1, d)[(ids * k + codes).reshape(-1)].reshape(m, n_pad)
        stats["loss_after_refine"] = layer_loss(W0, Q2, Hf)
        if stats["loss_after_refine"] < stats["loss"]:
            Cq, S, Q = Cq2, S2, Q2
            stats["loss"] = stats["loss_after_refine"]
        else:
            log.info("codebook refinement did not lower the loss (%.4g >= %.4g); kept the k-means codebooks",
                     stats["loss_after_refine"], stats["loss"])
    result = VQResult(weight=Q[:, :n].contiguous(), indices=codes.to(_index_dtype(k)), codebooks=Cq,
                      codebook_scale=S, layout=layout, bits=cfg.bits, codebook_bits=cfg.codebook_bits,
                      seed=cfg.seed, stats=stats)
    log.debug("gptvq %dx%d: %d codebooks of %d x %d, %.4f bits, loss %.4g", m, n, layout.num_codebooks,
              k, d, result.effective_bits(), stats["loss"])
    return result


def rtn_vq(W: Tensor, cfg: VQConfig | None = None) -> VQResult:
    """RTN-VQ baseline: same layout, unweighted k-means codebooks (int8), nearest codeword."""
    cfg = cfg or VQConfig()
    m, n = W.shape
    d, k = cfg.dim, cfg.k
    layout = VQLayout.make(m, n, cfg)
    Wp = _pad(W.detach().to(torch.float32), layout.n_pad)
    wcol = torch.ones(layout.n_pad, device=Wp.device)
    wcol[n:] = 0.0
    nr = layout.num_row_blocks
    Cq_all, S_all = [], []
    codes = torch.zeros(m, layout.n_pad // d, dtype=torch.long, device=Wp.device)
    Q = torch.zeros_like(Wp)
    for g in range(layout.num_col_groups):
        c0, c1 = layout.col_bounds[g], layout.col_bounds[g + 1]
        Cq, S, Cf = _fit_group(Wp, wcol, layout, c0, c1, cfg, cfg.seed + g)
        Cq_all.append(Cq)
        S_all.append(S)
        X, Wt, rows = _block_vectors(Wp, wcol, layout, c0, c1)
        idx = _Assigner(X, Wt, k)(Cf)  # [nr, rmax * nvg]
        q = torch.gather(Cf, 1, idx[..., None].expand(-1, -1, d))  # [nr, rmax * nvg, d]
        ok = rows >= 0
        nvg = (c1 - c0) // d
        codes[rows[ok], c0 // d:c1 // d] = idx.reshape(nr, -1, nvg)[ok]
        Q[rows[ok], c0:c1] = q.reshape(nr, -1, nvg * d)[ok]
    return VQResult(weight=Q[:, :n].contiguous(), indices=codes.to(_index_dtype(k)), codebooks=torch.cat(Cq_all),
                    codebook_scale=torch.cat(S_all), layout=layout, bits=cfg.bits,
                    codebook_bits=cfg.codebook_bits, seed=cfg.seed)
