"""GGUF (llama.cpp) files: scalar residuals as legacy 32-weight blocks, written with the `gguf` package.

Block types (ggml's public layouts; each block holds 32 consecutive weights of one row):

====== ======================================= ===================== ========================
type   bytes                                   weight                exact for lopro codes when
====== ======================================= ===================== ========================
Q4_0   d fp16, 16 B nibbles                    d (q - 8)             every c - z in [-8, 7] (all <= 3-bit, 4-bit sym)
Q4_1   d fp16, m fp16, 16 B nibbles            d q + m               <= 4 bits (m = -(z + k) d rounds to fp16)
Q5_0   d fp16, 4 B high bits, 16 B nibbles     d (q - 16)            every c - z in [-16, 15]
Q5_1   d, m fp16, 4 B high bits, 16 B nibbles  d q + m               5 bits (m rounds to fp16)
Q8_0   d fp16, 32 int8                         d q                   every c - z in [-128, 127]
====== ======================================= ===================== ========================

Nibble order: byte j of the 16 holds weight j in its low and weight j + 16 in its high nibble; the
5-bit types keep the fifth bit of weight j in bit j of the little-endian 32-bit ``qh``. With ``d = s``
(lopro's fp16 scale) a block is exact when all its columns share one group, i.e. group sizes that
are multiples of 32 (or one group per row). In Q4_1/Q5_1 the code may be shifted by any ``k`` that
keeps it in range (``q = c + k``, ``m = -(z + k) d``); the exporter picks, per block, the ``k`` whose
``m`` is exact in fp16 or closest to it, so that only 4-bit (5-bit) asymmetric blocks whose codes
span the full range can carry an fp16 rounding of ``m``.

Llama's q and k projections are stored with their rows permuted the way llama.cpp's converter does
(each head's two rotary halves interleaved); transformers' GGUF loader undoes it.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from lopro.export.base import ExportError, ScalarLayer

log = logging.getLogger(__name__)

BLOCK = 32
SUPPORTED_ARCHS = ("llama",)
LOSSY_TYPES = ("q8_0", "q5_1", "q4_1", "f16")
_BITS_PER_WEIGHT = {"Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q8_0": 8.5, "F16": 16.0}


def _qtype(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name.upper()]


# --------------------------------------------------------------------------- exact block encoders

def _blocks(layer: ScalarLayer):
    """(codes [m, nb, 32] int32, d [m, nb] fp16, z [m, nb] int32), or ExportError when a block spans groups."""
    m, n = layer.shape
    if n % BLOCK:
        raise ExportError(f"{layer.name}: {n} input columns are not a multiple of GGUF's block of {BLOCK}")
    g = layer.g_idx.view(-1, BLOCK)
    if not bool((g == g[:, :1]).all()):
        gs = layer.contiguous_group_size()
        why = (f"group size {gs} is not a multiple of {BLOCK}" if gs is not None else
               "its groups are not contiguous runs of columns (act-order or a column permutation)")
        raise ExportError(f"{layer.name}: {why}, so a 32-weight GGUF block would need two scales; "
                          "nearest options: export it with --format gptq (exact, keeps g_idx), or lossy='q8_0'")
    gb = g[:, 0]
    codes = layer.codes.to(torch.int32).view(m, n // BLOCK, BLOCK)
    return codes, layer.scales[:, gb].contiguous(), layer.zeros[:, gb].to(torch.int32)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[..., 32] values < 16 -> [..., 16] bytes: low nibble weight j, high nibble weight j + 16."""
    return (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """[..., 32] 5-bit values -> [..., 4] bytes of the little-endian uint32 whose bit j is bit 4 of value j."""
    bit = ((q >> 4) & 1).to(torch.int64)
    word = (bit << torch.arange(BLOCK, dtype=torch.int64)).sum(-1)
    return torch.stack([(word >> (8 * i)) & 0xFF for i in range(4)], dim=-1).to(torch.uint8)


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8).view(*x.shape, 2)


def _best_offset(codes, d, z, top: int):
    """Per block the shift k (q = c + k in [0, top]) whose m = -(z + k) d is exact in fp16, or nearest."""
    cmin, cmax = codes.amin(-1), codes.amax(-1)
    d32 = d.float()
    best_err = torch.full(d.shape, float("inf"))
    best_k = torch.zeros(d.shape, dtype=torch.int32)
    for k in range(-top, top + 1):
        ok = (cmin + k >= 0) & (cmax + k <= top)
        exact = -(z + k).float() * d32  # exact in fp32: an fp16 times an integer below 64
        err = (exact.half().float() - exact).abs()
        better = ok & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_k = torch.where(better, torch.full_like(best_k, k), best_k)
    m = (-(z + best_k).float() * d32).half()
    return best_k, m, best_err


def encode_exact(layer: ScalarLayer, bit_exact: bool = False) -> tuple[np.ndarray, str, dict]:
    """(bytes [m, nb * type_size] uint8, ggml type name, stats) of a scalar residual in the narrowest block
    type that holds it (Q4_1/Q5_1 up to the fp16 rounding of m; with `bit_exact`, a wider type rather than
    that: 4-bit asymmetric becomes Q5_0); ExportError when none holds it."""
    codes, d, z = _blocks(layer)
    m = codes.shape[0]
    t = codes - z[..., None]
    lo, hi = int(t.min()), int(t.max())
    stats = {"inexact_offset_blocks": 0, "max_offset_error": 0.0}
    if lo >= -8 and hi <= 7:
        kind = "Q4_0"
        body = [_fp16_bytes(d), _nibbles(t + 8)]
    elif (layer.bits <= 4 and not bit_exact) or (layer.bits == 5 and not (lo >= -16 and hi <= 15)):
        top = 15 if layer.bits <= 4 else 31
        k, mm, err = _best_offset(codes, d, z, top)
        q = codes + k[..., None]
        stats = {"inexact_offset_blocks": int((err > 0).sum()), "max_offset_error": float(err.max())}
        if top == 15:
            kind = "Q4_1"
            body = [_fp16_bytes(d), _fp16_bytes(mm), _nibbles(q)]
        else:
            kind = "Q5_1"
            body = [_fp16_bytes(d), _fp16_bytes(mm), _high_bits(q), _nibbles(q & 15)]
    elif lo >= -16 and hi <= 15:
        kind = "Q5_0"
        q = t + 16
        body = [_fp16_bytes(d), _high_bits(q), _nibbles(q & 15)]
    elif lo >= -128 and hi <= 127:
        kind = "Q8_0"
        body = [_fp16_bytes(d), t.to(torch.int8).view(torch.uint8)]
    else:
        raise ExportError(f"{layer.name}: {layer.bits}-bit asymmetric codes span c - z in [{lo}, {hi}], beyond "
                          "Q8_0's int8 and the asymmetric types' 5 bits; nearest lossy option: lossy='q8_0'")
    raw = torch.cat(body, dim=-1).reshape(m, -1).contiguous()
    return raw.numpy(), kind, stats


def decode(raw: np.ndarray, kind: str) -> torch.Tensor:
    """Dense float32 weights of GGUF blocks, through the gguf package's reference dequantizer."""
    from gguf.quants import dequantize

    return torch.from_numpy(np.ascontiguousarray(dequantize(raw, _qtype(kind)))).float()


# --------------------------------------------------------------------------- lossy re-quantization

def requantize(w: torch.Tensor, kind: str) -> tuple[np.ndarray, str]:
    """A dense weight re-quantized with the gguf package's reference quantizer (lossy)."""
    from gguf.quants import quantize

    if kind not in LOSSY_TYPES:
        raise ValueError(f"lossy must be one of {LOSSY_TYPES}, got {kind!r}")
    arr = w.detach().float().cpu().numpy()
    if kind == "f16":
        return arr.astype(np.float16), "F16"
    if arr.shape[-1] % BLOCK:
        return arr.astype(np.float16), "F16"
    return quantize(arr, _qtype(kind)), kind.upper()


def requantize_error(w: torch.Tensor, kind: str) -> float:
    raw, got = requantize(w, kind)
    back = torch.from_numpy(raw.astype(np.float32)) if got == "F16" else decode(raw, got)
    return float((back - w.float()).norm() / w.float().norm().clamp_min(1e-30))


# --------------------------------------------------------------------------- tensors

def permute_qk_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half row order of a q/k projection -> llama.cpp's interleaved order (rows only)."""
    half = x.shape[0] // n_head // 2
    return x.reshape(n_head, 2, half, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def fp_array(t: torch.Tensor) -> tuple[np.ndarray, str | None]:
    """An unquantized tensor in the narrowest GGUF float type that holds it exactly (1-D: F32)."""
    t = t.detach().cpu()
    if t.ndim >= 2:
        f = t.float()
        if torch.equal(f.half().float(), f):
            return f.half().numpy(), None
        if torch.equal(f.bfloat16().float(), f):
            raw = f.bfloat16().contiguous().view(torch.int16).numpy().view(np.uint8)
            return raw.reshape(*t.shape[:-1], t.shape[-1] * 2), "BF16"
    return t.float().numpy(), None


# --------------------------------------------------------------------------- metadata

def _rope_theta(cfg) -> float:
    rp = getattr(cfg, "rope_parameters", None) or {}
    rs = getattr(cfg, "rope_scaling", None) or {}
    kind = rp.get("rope_type", rs.get("rope_type", rs.get("type", "default")))
    if kind not in (None, "default"):
        raise ExportError(f"rope type {kind!r} is not written by this exporter (only the default rope)")
    theta = rp.get("rope_theta", getattr(cfg, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def check_architecture(cfg) -> None:
    if getattr(cfg, "model_type", None) not in SUPPORTED_ARCHS:
        raise ExportError(f"GGUF export writes Llama-architecture models (model_type in {SUPPORTED_ARCHS}); this "
                          f"checkpoint is {getattr(cfg, 'model_type', None)!r}: use --format gptq")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        log.info("the model has biases: written as F32 .bias tensors")


def add_llama_metadata(w, cfg, name: str, file_type: int) -> None:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
    if head_dim != cfg.hidden_size // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type)
    w.add_quantization_version(2)


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer given as tokenizer.json's `pre_tokenizer`."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        kinds = [p.get("type") for p in pre.get("pretokenizers", [])]
        if kinds == ["Digits", "ByteLevel"] and pre["pretokenizers"][0].get("individual_digits") \
                and pre["pretokenizers"][1].get("use_regex", True):
            return "smollm"
    return None


def add_tokenizer(w, folder: Path, vocab_size: int) -> bool:
    """Byte-level BPE tokenizers (GPT-2 style: SmolLM2, GPT-2, ...): tokens, types, merges and special ids.
    Returns False when the folder has no tokenizer; ExportError for one this writer does not map."""
    import json

    import gguf

    path = folder / "tokenizer.json"
    if not path.exists():
        log.warning("%s has no tokenizer.json: the GGUF file gets no tokenizer (transformers loads the model, "
                    "llama.cpp needs one)", folder)
        return False
    spec = json.loads(path.read_text())
    model = spec.get("model") or {}
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None:
        raise ExportError(f"the tokenizer in {folder} is {model.get('type')} with pre-tokenizer "
                          f"{(spec.get('pre_tokenizer') or {}).get('type')}: the GGUF writer maps byte-level BPE "
                          "tokenizers only; pass tokenizer=False (--no-tokenizer) to write the weights alone")
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for tok, info in added.items():
        vocab[tok] = info["id"]
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for tok, i in vocab.items():
        tokens[i] = tok
        info = added.get(tok)
        types[i] = gguf.TokenType.NORMAL if info is None else (
            gguf.TokenType.CONTROL if info.get("special") else gguf.TokenType.USER_DEFINED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n)
    if "bos" not in special.add_special_token:  # say what transformers does, not llama.cpp's default
        special.add_special_token["bos"] = _adds_bos(folder)
    special.add_to_gguf(w, quiet=True)
    return True


def _adds_bos(folder: Path) -> bool:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("a").input_ids
    return tok.bos_token_id is not None and len(ids) > 0 and ids[0] == tok.bos_token_id


def write_file(path: Path, arch: str, metadata, tensors: list[tuple[str, np.ndarray, str | None]]) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch=arch)
    metadata(w)
    for name, arr, raw in tensors:
        w.add_tensor(name, arr, raw_dtype=None if raw is None else _qtype(raw))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def file_type_of(kinds: list[str]) -> int:
    """general.file_type: the most common block type's 'mostly' value."""
    import gguf

    if not kinds:
        return int(gguf.LlamaFileType.ALL_F32)
    top = max(set(kinds), key=kinds.count)
    return int(getattr(gguf.LlamaFileType, f"MOSTLY_{top}", gguf.LlamaFileType.GUESSED))


def bits_per_weight(kind: str) -> float:
    return _BITS_PER_WEIGHT.get(kind, math.nan)
