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


class _Replay(torch.nn.Module):
    """Stands in for a decoder block in the final pass of a streamed evaluation: the last block returns
    the hidden states the streamed pass computed for this batch, the others pass their input through."""

    def __init__(self, outputs=None, as_tuple: bool = False):
        super().__init__()
        self.outputs, self.as_tuple, self.batch = outputs, as_tuple, 0

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.outputs is None else self.outputs.hidden(self.batch).to(hidden_states.device)
        return (out,) if self.as_tuple else out


@torch.no_grad()
def perplexity_streamed(lazy, windows: torch.Tensor, batch_size: int = 4, device=None, offload: bool = False,
                        folder=None, progress: bool = False) -> dict:
    """`perplexity` of a model too large for memory (a lopro.io.lazy.LazyModel): every window's hidden
    states go through one block at a time (read from disk, then freed); the model's own head then runs
    on them (the blocks replaced by a replay), so the result equals the in-memory one."""
    from lopro.pipeline.run import capture_activations
    from lopro.model.walk import block_output, to_device

    device = torch.device(device or "cpu")
    model, blocks = lazy.model, lazy.blocks
    outside = lazy.outside_blocks()
    lazy.load(names=outside)
    batches = windows.split(batch_size)
    acts = capture_activations(model, blocks[0], batches)
    as_tuple = False
    for i in tqdm(range(len(blocks)), desc="ppl (streamed)", disable=not progress, unit="block"):
        lazy.load(lazy.block_prefix(i))
        block = blocks[i].to(device)
        nxt = acts.like(None if not offload else f"{folder}/{i + 1:05d}")
        for h, kw in acts:
            out = block(h.to(device), **to_device(kw, device))
            as_tuple = isinstance(out, (tuple, list))
            nxt.append(block_output(out))
        lazy.release(block.to("cpu"))
        acts = nxt
    n = len(blocks)
    real = [blocks[j] for j in range(n)]
    replays = [_Replay(acts if j == n - 1 else None, as_tuple) for j in range(n)]
    for j in range(n):
        blocks[j] = replays[j]
    try:
        nll, count = 0.0, 0
        for b, ids in enumerate(batches):
            replays[-1].batch = b
            logits = model(ids, use_cache=False).logits[:, :-1].float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
            count += ids[:, 1:].numel()
    finally:
        for j in range(n):
            blocks[j] = real[j]
        lazy.release_names(outside)
    if not math.isfinite(nll):
        raise FloatingPointError("the model produced non-finite log-likelihoods")
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": windows.shape[0],
            "seqlen": windows.shape[1], "streamed": True}
