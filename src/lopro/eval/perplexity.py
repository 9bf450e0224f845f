"""Token-level perplexity over non-overlapping windows."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> dict:
    """exp(mean NLL) of every next-token prediction inside each window ([K, seqlen] ids)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="ppl", disable=not progress, unit="batch"):
        ids = batch.to(device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += ids[:, 1:].numel()
    if not math.isfinite(nll):
        raise FloatingPointError("the model produced non-finite log-likelihoods")
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": windows.shape[0],
            "seqlen": windows.shape[1]}
