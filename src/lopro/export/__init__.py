"""Export a packed lopro checkpoint to the formats inference engines load: GGUF, GPTQ, LoRA.

``export(checkpoint_dir, fmt, out)`` reads the checkpoint through the public load side
(`lopro.load(..., device="cpu")`, whose quantized layers are `QuantLinear`) and writes the folder
`out` atomically (built under a temporary name, then moved into place):

- ``gguf``: ``out/model.gguf`` for llama.cpp / Ollama and transformers' GGUF loader. Scalar residuals
  become 32-weight blocks (Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0, see `gguf_file`), unquantized tensors the
  narrowest float type that holds them exactly; Llama metadata and the (byte-level BPE) tokenizer.
- ``gptq``: a GPTQ-format Hugging Face folder (``qweight``/``qzeros``/``scales``/``g_idx`` int32
  packing, ``quantize_config.json``, ``quant_method: "gptq"`` in config.json), see `gptq_format`.
- ``lora``: the low-rank branch ``U diag(S) V diag(alpha)^-1`` as a LoRA adapter (``lora_A = S V /
  alpha``, ``lora_B = U``, scale 1) plus the residual as the base: ``out/adapter/`` (PEFT) and either
  ``out/model.gguf`` + ``out/adapter.gguf`` (llama.cpp ``--lora``) or ``out/base/`` (GPTQ format).

Whatever cannot be written exactly is refused with an `ExportError` (a ValueError) naming the layer,
the reason and the nearest lossy option with its measured error; ``lossy="q8_0"`` (GGUF only)
re-quantizes such layers' dense weights instead, and the report says which and by how much.
Every export writes ``export.json``: per layer the type written and its error against the weight
lopro computes (``max_abs_error`` 0 means bit-exact).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from lopro.io.atomic import check_out_folder, write_folder_atomically
from lopro.io.checkpoint import TOKENIZER_FILES, read_quantization_config
from lopro.export import gguf_file, gptq_format
from lopro.export.layers import ExportError, ScalarLayer, lowrank_factors, quant_layers, scalar_layer

log = logging.getLogger(__name__)

FORMATS = ("gguf", "gptq", "lora")
BASES = ("auto", "gguf", "gptq")
GGUF_NAME = "model.gguf"
ADAPTER_GGUF_NAME = "adapter.gguf"
REPORT_NAME = "export.json"

__all__ = ["export", "ExportError", "FORMATS", "BASES"]


def _err(a: torch.Tensor, ref: torch.Tensor) -> dict:
    d = (a.float() - ref.float()).abs()
    return {"max_abs_error": float(d.max()) if d.numel() else 0.0,
            "rel_error": float((a.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))}


# --------------------------------------------------------------------------- GGUF

def _gguf_layer(name: str, mod, lossy: str | None, residual_only: bool, bit_exact: bool):
    """(raw bytes, ggml type, report entry) of one packed layer."""
    rank = (mod.spec["lowrank"] or {}).get("rank", 0)
    try:
        layer = scalar_layer(name, mod, "gguf")
        if rank and not residual_only:
            raise ExportError(f"{name}: the layer has a low-rank branch (rank {rank}), which GGUF base weights do "
                              "not hold; use format='lora' (the residual as the GGUF base plus a LoRA adapter, "
                              "exact) or lossy='q8_0' to fold it into re-quantized dense weights")
        raw, kind, stats = gguf_file.encode_exact(layer, bit_exact)
        entry = {"type": kind, "bits": layer.bits, "file_bits_per_weight": gguf_file.bits_per_weight(kind), **stats,
                 **_err(gguf_file.decode(raw, kind), layer.dequantize())}
        entry["exact"] = entry["max_abs_error"] == 0.0
        return raw, kind, entry, layer.bias
    except ExportError:
        if lossy is None:
            raise
    ref = mod.dense_weight() if not residual_only else mod.dense_weight() - (mod.lowrank_weight() if rank else 0)
    raw, kind = gguf_file.requantize(ref, lossy)
    back = torch.from_numpy(raw.astype("float32")) if kind == "F16" else gguf_file.decode(raw, kind)
    entry = {"type": kind, "exact": False, "lossy": lossy, "file_bits_per_weight": gguf_file.bits_per_weight(kind),
             **_err(back, ref)}
    log.warning("%s: re-quantized to %s (lossy): relative error %.3e", name, kind, entry["rel_error"])
    bias = mod.bias.detach().float() if mod.spec["bias"] else None
    return raw, kind, entry, bias


def _gguf_plan(model, folder: Path, lossy: str | None, residual_only: bool, tokenizer: bool, bit_exact: bool):
    """Everything to write (metadata callback, tensors, adapter tensors) and the per-layer report."""
    import gguf

    cfg = model.config
    gguf_file.check_architecture(cfg)
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)

    def gname(hf: str) -> str:
        got = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if got is None:
            raise ExportError(f"tensor {hf!r} has no GGUF (llama) name")
        return got

    def rows(arr, g: str):
        if ".attn_q." in g:
            return gguf_file.permute_qk_rows(arr, n_head)
        if ".attn_k." in g:
            return gguf_file.permute_qk_rows(arr, n_kv)
        return arr

    qlayers = quant_layers(model)
    tensors, adapter, report, kinds = [], [], {}, []
    for name, mod in qlayers.items():
        g = gname(f"{name}.weight")
        raw, kind, entry, bias = _gguf_layer(name, mod, lossy, residual_only, bit_exact)
        tensors.append((g, rows(raw, g), None if kind == "F16" else kind))
        kinds.append(kind)
        if bias is not None:
            tensors.append((gname(f"{name}.bias"), rows(bias.numpy(), g), None))
        if residual_only and (ab := lowrank_factors(mod)) is not None:
            A, B = ab
            adapter += [(f"{g}.lora_a", A.numpy(), None), (f"{g}.lora_b", rows(B.numpy(), g), None)]
            entry["rank"] = A.shape[0]
        report[name] = entry
    owners = {f"{n}." for n in qlayers}
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for name, t in model.state_dict().items():
        if any(name.startswith(o) for o in owners) or (tied and name == "lm_head.weight"):
            continue
        arr, raw_type = gguf_file.fp_array(t)
        tensors.append((gname(name), arr, raw_type))

    def metadata(w):
        gguf_file.add_llama_metadata(w, cfg, folder.name, gguf_file.file_type_of(kinds))
        if tokenizer:
            gguf_file.add_tokenizer(w, folder, cfg.vocab_size)

    def adapter_metadata(w):
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", 0.0)  # 0: llama.cpp applies B A with scale 1 whatever the rank

    return metadata, tensors, adapter_metadata, adapter, report


# --------------------------------------------------------------------------- GPTQ format

def _check_hf_names(model, names) -> None:
    """Every packed module is an nn.Linear of the plain transformers model (not, e.g., a fused expert)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(model.config)
    for name in names:
        try:
            sub = ref.get_submodule(name)
        except AttributeError:
            sub = None
        if not isinstance(sub, torch.nn.Linear):
            raise ExportError(f"{name} is not an nn.Linear of the transformers model (e.g. a fused MoE expert "
                              "that lopro unfused): the GPTQ format cannot name it")


def _gptq_plan(model, checkpoint_format: str, residual_only: bool):
    qlayers = quant_layers(model)
    layers: list[ScalarLayer] = []
    for name, mod in qlayers.items():
        rank = (mod.spec["lowrank"] or {}).get("rank", 0)
        layers.append(scalar_layer(name, mod, "gptq"))
        if rank and not residual_only:
            raise ExportError(f"{name}: the layer has a low-rank branch (rank {rank}), which GPTQ weights do not "
                              "hold; use format='lora' with base='gptq' (the residual plus a LoRA adapter, exact)")
    _check_hf_names(model, qlayers)
    bits, group_size, sym, desc_act = gptq_format.common_settings(layers)
    if checkpoint_format == "auto":
        bad = [layer.name for layer in layers if not gptq_format.storable_v1(layer)]
        checkpoint_format = "gptq_v2" if bad else "gptq"
        if bad:
            log.warning("%d layer(s) (first %s) have groups with zero point 0 that use the top code, which the "
                        "'gptq' format (zero - 1) cannot store: writing checkpoint_format 'gptq_v2' (read by "
                        "GPTQModel; pass checkpoint_format='gptq' to refuse instead)", len(bad), bad[0])
    tensors, report = {}, {}
    for layer in layers:
        layer = gptq_format.regroup(layer, group_size)
        for key, t in gptq_format.layer_tensors(layer, checkpoint_format).items():
            tensors[f"{layer.name}.{key}"] = t
        report[layer.name] = {"type": f"gptq int{bits}", "exact": True, "bits": bits, "max_abs_error": 0.0}
    owners = {f"{n}." for n in qlayers}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    worst = 0.0
    for name, t in model.state_dict().items():
        if any(name.startswith(o) for o in owners) or (tied and name == "lm_head.weight"):
            continue
        t = t.detach().cpu()
        if t.is_floating_point():
            h = t.to(torch.float16)
            if not bool(torch.isfinite(h).all()):
                raise ExportError(f"{name} overflows fp16, the GPTQ format's float type")
            worst = max(worst, float(((h.float() - t.float()).abs() / t.float().abs().clamp_min(1e-30)).max()))
            t = h
        tensors[name] = t.contiguous()
    qcfg = gptq_format.quantize_config(bits, group_size, sym, desc_act, checkpoint_format)
    return tensors, qcfg, report, worst


def _write_gptq(model, folder: Path, dest: Path, tensors, qcfg) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["quantization_config"] = qcfg
    cfg["dtype"] = "float16"
    (dest / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    (dest / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    _copy_side_files(folder, dest)


def _copy_side_files(folder: Path, dest: Path) -> None:
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (folder / name).exists():
            shutil.copyfile(folder / name, dest / name)


# --------------------------------------------------------------------------- LoRA (PEFT)

def _peft_adapter(model, dest: Path, base_ref: str) -> dict:
    from safetensors.torch import save_file

    tensors, ranks = {}, {}
    for name, mod in quant_layers(model).items():
        ab = lowrank_factors(mod)
        if ab is None:
            continue
        A, B = ab
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
        ranks[name] = A.shape[0]
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_ref,
              "r": r, "lora_alpha": r, "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
              "init_lora_weights": True, "modules_to_save": None,
              # scale lora_alpha / r = 1 for every module, whatever its rank
              "rank_pattern": {k: v for k, v in ranks.items() if v != r},
              "alpha_pattern": {k: v for k, v in ranks.items() if v != r}}
    dest.mkdir()
    save_file(tensors, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ranks


# --------------------------------------------------------------------------- entry point

def load_exact(folder) -> torch.nn.Module:
    """`lopro.load(folder, device="cpu")` with every tensor as stored: the reference backend where the
    loader has kernel backends (those cast the unquantized tensors to their compute dtype)."""
    import inspect

    from lopro.io.checkpoint import load

    kw = {"backend": "reference"} if "backend" in inspect.signature(load).parameters else {}
    return load(folder, device="cpu", **kw)


def export(checkpoint_dir, fmt: str, out, *, overwrite: bool = False, lossy: str | None = None,
           base: str = "auto", checkpoint_format: str = "auto", tokenizer: bool = True,
           bit_exact: bool = False) -> dict:
    """Write the packed lopro checkpoint `checkpoint_dir` in format `fmt` ("gguf", "gptq" or "lora") to the
    folder `out`; returns the export report (also written to ``out/export.json``).

    lossy: GGUF only; None (default) refuses layers that cannot be exact, "q8_0" / "q5_1" / "q4_1" / "f16"
    re-quantizes their dense weights with the gguf package's reference quantizer instead.
    base: for "lora", where the residual goes: "gguf", "gptq", or "auto" (GGUF when every layer fits it).
    checkpoint_format: for GPTQ output, "gptq" (zeros stored minus one: refused for a group with zero point 0
    that uses the top code), "gptq_v2" (stored as they are), or "auto" (gptq unless a layer needs v2).
    tokenizer: write the tokenizer into the GGUF file (byte-level BPE tokenizers).
    bit_exact: GGUF 4-bit asymmetric residuals as Q5_0 (5.5 bits/weight, bit-exact) instead of Q4_1 (5.0,
    exact up to the fp16 rounding of each block's m).
    """
    folder = Path(checkpoint_dir)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {base!r}")
    if lossy is not None and lossy not in gguf_file.LOSSY_TYPES:
        raise ValueError(f"lossy must be None or one of {gguf_file.LOSSY_TYPES}, got {lossy!r}")
    if lossy is not None and (fmt == "gptq" or (fmt == "lora" and base == "gptq")):
        raise ValueError("lossy re-quantization is offered for GGUF output only")
    if checkpoint_format not in gptq_format.CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {gptq_format.CHECKPOINT_FORMATS}, "
                         f"got {checkpoint_format!r}")
    qc = read_quantization_config(folder)
    if qc is None:
        raise ExportError(f"{folder} is not a packed lopro checkpoint (its config.json has no quantization_config "
                          "with quant_method 'lopro')")
    out = check_out_folder(out, overwrite)
    model = load_exact(folder)
    summary = {"source": str(folder), "format": fmt, "method": qc.get("method"), "bits": qc.get("bits"),
               "group_size": qc.get("group_size")}

    plan = None
    if fmt == "lora":
        if not any(lowrank_factors(m) is not None for m in quant_layers(model).values()):
            raise ExportError(f"{folder} has no low-rank branch to write as an adapter: use format='gguf' or 'gptq'")
        if base == "auto":
            try:
                plan = _gguf_plan(model, folder, None, True, tokenizer, bit_exact)
                base = "gguf"
            except ExportError as exc:
                log.info("base: GPTQ format, since GGUF cannot hold it exactly (%s)", exc)
                base = "gptq"
        summary["base"] = base
    if fmt == "gguf" or (fmt == "lora" and base == "gguf"):
        if plan is None:
            plan = _gguf_plan(model, folder, lossy, fmt == "lora", tokenizer, bit_exact)
        metadata, tensors, adapter_metadata, adapter, report = plan

        def write(tmp: Path):
            gguf_file.write_file(tmp / GGUF_NAME, "llama", metadata, tensors)
            if fmt == "lora":
                gguf_file.write_file(tmp / ADAPTER_GGUF_NAME, "llama", adapter_metadata, adapter)
                summary["adapter_ranks"] = _peft_adapter(model, tmp / "adapter", "..")
            _finish(tmp, summary, report)
    else:
        tensors, qcfg, report, fp_err = _gptq_plan(model, checkpoint_format, fmt == "lora")
        summary["quantize_config"] = qcfg
        summary["fp16_max_rel_rounding"] = fp_err

        def write(tmp: Path):
            dest = tmp / "base" if fmt == "lora" else tmp
            dest.mkdir(exist_ok=True)
            _write_gptq(model, folder, dest, tensors, qcfg)
            if fmt == "lora":
                summary["adapter_ranks"] = _peft_adapter(model, tmp / "adapter", "../base")
            _finish(tmp, summary, report)

    write_folder_atomically(out, write)
    log.info("exported %s as %s to %s", folder, fmt, out)
    return summary


def _finish(tmp: Path, summary: dict, report: dict) -> None:
    summary["layers"] = report
    summary["exact"] = all(e.get("exact") for e in report.values())
    summary["max_abs_error"] = max((e.get("max_abs_error", 0.0) for e in report.values()), default=0.0)
    summary["files"] = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()) + [REPORT_NAME]
    (tmp / REPORT_NAME).write_text(json.dumps(summary, indent=1, default=str) + "\n")
    for p in [tmp, *tmp.rglob("*")]:  # temporary folders are created owner-only
        p.chmod(0o755 if p.is_dir() else 0o644)
