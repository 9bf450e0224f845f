"""The layer loss every solver and the report use: tr(dW H dW^T) = ||(W - W_hat) X||^2 N / 2."""
from __future__ import annotations

import torch


EXACT_FLOPS = 2**34  # above this many multiply-adds (m n^2), the report samples rows instead


def _traces(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor, rows: int, reference: bool, cols: int = 1024):
    loss = ref = 0.0
    for r in range(0, W.shape[0], rows):  # fp64 in slices: a whole fp64 copy of a 7B down_proj would be 1.3 GB,
        w = W[r:r + rows].double()          # of its Hessian 970 MB (a slab of `cols` rows: 90 MB)
        dw = W_hat[r:r + rows].to(w.device).double() - w
        for c in range(0, H.shape[0], cols):
            h = H[c:c + cols].to(W.device).double()
            loss += torch.sum((dw[:, c:c + cols] @ h) * dw).item()
            if reference:
                ref += torch.sum((w[:, c:c + cols] @ h) * w).item()
    return loss, ref


def layer_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor, rows: int = 512) -> float:
    """tr((W_hat - W) H (W_hat - W)^T) in fp64, `rows` rows at a time."""
    return _traces(W, W_hat, H, rows, reference=False)[0]


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor, rows: int = 512,
                 max_flops: int = EXACT_FLOPS) -> tuple[float, float, int]:
    """(layer loss, relative output error sqrt(loss / tr(W H W^T)), rows used) for the report.

    Exact (every row, fp64) up to `max_flops` multiply-adds; a larger layer is estimated from evenly
    spaced rows (the loss scaled by m / rows), so that the report never costs as much as the solve
    (exactly, a 7B down_proj's loss and reference are 2 x 5e11 fp64 multiply-adds).
    """
    m, n = W.shape
    take = m if m * n * n <= max_flops else max(1, min(m, max_flops // (n * n)))
    if take < m:
        idx = torch.linspace(0, m - 1, take, device=W.device).round().long()
        W, W_hat = W.index_select(0, idx), W_hat.index_select(0, idx.to(W_hat.device))
    loss, ref = _traces(W, W_hat, H, rows, reference=True)
    return loss * m / take, (loss / ref) ** 0.5 if ref > 0 else float("nan"), take
