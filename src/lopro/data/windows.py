"""Token windows: seeded calibration samples and non-overlapping evaluation windows."""
from __future__ import annotations

import hashlib

import torch

from lopro.data.corpora import load_corpus


class CorpusTooShortError(ValueError):
    pass


def tokenize_split(tokenizer, corpus_name: str, part: str) -> torch.Tensor:
    """1-D LongTensor of the tokens of one split of a corpus (no special tokens)."""
    text = load_corpus(corpus_name).split(part)
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens ([nsamples, seqlen]), drawn with `seed`."""
    if tokens.numel() <= seqlen:
        raise CorpusTooShortError(
            f"calibration text has {tokens.numel()} tokens, fewer than one window of {seqlen}; "
            "use a longer corpus or a smaller --seqlen")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, seqlen: int, windows: int | None = None,
                 bos_id: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ([K, seqlen]). With `bos_id`, each window is BOS + seqlen-1 tokens."""
    body = seqlen - 1 if bos_id is not None else seqlen
    available = tokens.numel() // body
    if available == 0:
        raise CorpusTooShortError(
            f"evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}; "
            "use a longer corpus or a smaller --seqlen")
    k = available if windows is None else min(windows, available)
    out = tokens[: k * body].view(k, body)
    if bos_id is not None:
        out = torch.cat([torch.full((k, 1), bos_id, dtype=torch.long), out], dim=1)
    return out


def fingerprint(windows: torch.Tensor) -> str:
    """SHA-256 of the calibration tokens, recorded with every quantized model."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def calibration(tokenizer, data: str = "wiki", nsamples: int = 128, seqlen: int = 512, seed: int = 0) -> torch.Tensor:
    """[nsamples, seqlen] token ids drawn with `seed` from the calibration part of a built-in corpus
    (`wiki`, `news`) or a local .txt/.jsonl file: what `lopro.quantize` takes."""
    return calibration_windows(tokenize_split(tokenizer, data, "calib"), nsamples, seqlen, seed)
