"""Packed lopro checkpoints: save, verify and load.

A checkpoint is a Hugging Face model folder:

- ``model.safetensors`` (or ``model-0000i-of-0000N.safetensors`` shards with
  ``model.safetensors.index.json``): the packed layers' buffers (see ``qlinear.py``) and the
  unquantized tensors (embeddings, norms, head), the latter in the narrowest float dtype that holds
  them exactly by default;
- ``config.json``: the model config plus ``quantization_config`` (``quant_method: "lopro"``, the
  run's settings and provenance, and one spec per packed module, enough to rebuild the skeleton);
- tokenizer files, ``generation_config.json`` and ``report.json`` (the quantization report).

:func:`save` writes the folder under a temporary name and moves it into place, so an interrupted
save never leaves a folder that looks complete. :func:`load` builds the architecture with its
parameters on the meta device, swaps in empty ``QuantLinear`` skeletons, checks every tensor of
every shard against the expected names, shapes and dtypes (reading only the safetensors headers),
then loads tensor by tensor: the model is never materialised in fp32.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from lopro.device import resolve_device
from lopro.io.atomic import check_out_folder, sha256_file, write_folder_atomically
from lopro.nn.qlinear import QuantLinear, buffer_specs
from lopro.model.surgery import install_quant_linears, quant_linear_specs, set_compute_dtype
from lopro.formats import effective_bits

log = logging.getLogger(__name__)

QUANT_METHOD = "lopro"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3
FP_DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")

# safetensors header dtype names
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
              "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete, truncated or does not match its config."""


# --------------------------------------------------------------------------- config

def build_quantization_config(model_or_specs: nn.Module | dict, config=None, summary: dict | None = None) -> dict:
    """The ``quantization_config`` of a packed model (or of the module specs of one written block by
    block): settings, provenance and per-module specs."""
    from lopro._version import __version__
    from lopro.linalg.hadamard import HADAMARD_CONVENTION

    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    specs = quant_linear_specs(model_or_specs) if isinstance(model_or_specs, nn.Module) else dict(model_or_specs)
    if not specs:
        raise ValueError("the model has no QuantLinear layers: pack it first (quantize(..., on_layer=packer(model)))")
    calib = (summary or {}).get("calibration") or {}
    params = sum(s["in_features"] * s["out_features"] for s in specs.values())
    bits = sum(effective_bits(s) * s["in_features"] * s["out_features"] for s in specs.values()) / params
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "method": cfg.get("method"),
        "bits": cfg.get("bits"),
        "group_size": cfg.get("group_size"),
        "sym": cfg.get("sym"),
        "rank": cfg.get("rank"),
        "rank_dtype": cfg.get("rank_dtype"),
        "block_identity": cfg.get("block_identity"),
        "block_hadamard": cfg.get("block_hadamard"),
        "hadamard_convention": HADAMARD_CONVENTION,
        "seed": cfg.get("seed"),
        "lopro_version": __version__,
        "calibration_sha256": calib.get("sha256"),
        "calibration": {k: calib.get(k) for k in ("nsamples", "seqlen")} if calib else None,
        "effective_bits": bits,
        "quantized_params": params,
        "quant_config": cfg,
        "modules": specs,
    }


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder} has no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} cannot be read as a model config: not valid JSON ({exc})") from None


def read_quantization_config(folder: str | Path) -> dict | None:
    """The lopro ``quantization_config`` of a folder, or None when it is not a lopro checkpoint."""
    qc = read_config(folder).get("quantization_config")
    return qc if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD else None


PACKED_SUFFIXES = (".qweight", ".vq_indices", ".lr_U")


def refuse_unlabelled_packed(folder: str | Path, found: dict[str, dict]) -> None:
    """Packed tensors without a lopro ``quantization_config`` would load as random fp weights: refuse."""
    packed = sorted(n for n in found if n.endswith(PACKED_SUFFIXES))
    if packed:
        raise CheckpointError(f"{folder} holds packed tensors ({packed[0]}, ... {len(packed)} in all) but its "
                              "config.json has no lopro quantization_config: the checkpoint is damaged or was "
                              "written by another tool, and cannot be loaded as a model; re-quantize the fp model")


ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
                 "mpnet", "t5", "bart", "mbart", "whisper")


def check_causal_lm(folder: str | Path, config) -> None:
    """A decoder-only causal LM, or a clear refusal (an encoder loads as a "causal" LM through the auto class)."""
    archs = list(getattr(config, "architectures", None) or [])
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    mt = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False) or (archs and not causal) or (not archs and mt in ENCODER_TYPES):
        raise CheckpointError(f"{folder} is a {mt} model ({', '.join(archs) or 'no architectures listed'}), not a "
                              "decoder-only causal language model; lopro quantizes and evaluates decoder-only LMs "
                              "(Llama, Mistral, Qwen, Mixtral, SmolLM, ...)")


def is_lopro_checkpoint(folder: str | Path) -> bool:
    try:
        return read_quantization_config(folder) is not None
    except (CheckpointError, json.JSONDecodeError):
        return False


# --------------------------------------------------------------------------- save

def _tied_aliases(model: nn.Module) -> set[str]:
    """State-dict names that alias another tensor (tied weights): saved once, re-tied on load."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    seen: dict[tuple, str] = {}
    out = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if t.device.type == "meta" or t.numel() == 0:  # empty tensors (rank 0 factors) share no data
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            if name not in tied and seen[key] not in tied:
                raise ValueError(f"tensors {seen[key]} and {name} share memory but are not declared tied")
            out.add(name if name in tied else seen[key])
        else:
            seen[key] = name
    return out


def fp_storage(t: torch.Tensor, fp_dtype: str, rows: int = 4096) -> torch.Tensor:
    if fp_dtype != "auto":
        return t.to(FP_DTYPES[fp_dtype])
    for dt in (torch.bfloat16, torch.float16):
        if t.dtype.itemsize > dt.itemsize:
            c = t.to(dt)  # exact? checked a slice of rows at a time (a 7B head is 0.8 GB in fp32)
            if all(torch.equal(a.to(t.dtype), b) for a, b in zip(c.reshape(-1).split(rows * 4096),
                                                                  t.reshape(-1).split(rows * 4096))):
                return c
            del c
    return t


def tensors_to_save(module: nn.Module, fp_dtype: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of `module` (names under `prefix`) as stored: packed buffers as they are, the
    unquantized floats in `fp_dtype` ("auto": the narrowest float dtype that holds them exactly)."""
    if fp_dtype not in FP_DTYPES:
        raise ValueError(f"fp_dtype must be one of {sorted(FP_DTYPES)}, got {fp_dtype!r}")
    qnames = {f"{name}." if name else "" for name, m in module.named_modules() if isinstance(m, QuantLinear)}
    skip = _tied_aliases(module)
    out = {}
    for name, t in module.state_dict().items():
        if name in skip:
            continue
        owner = name.rpartition(".")[0] + "."
        t = t.detach().to("cpu")
        if t.is_floating_point() and (owner not in qnames or name.endswith(".bias")):
            t = fp_storage(t, fp_dtype)
        out[prefix + name] = t.contiguous()
    return out


def write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """One safetensors file; its metadata has a single key, so the bytes do not depend on the process."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save_quantized(model: nn.Module, folder: str | Path, *, config=None, report=None, tokenizer=None,
                   tokenizer_from: str | Path | None = None, fp_dtype: str = "auto",
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write a packed model into the (existing, empty) `folder`; returns its quantization_config.

    Not atomic by itself: use :func:`save` (or ``write_folder_atomically``) for a safe write.
    """
    folder = Path(folder)
    summary = getattr(report, "summary", None) if report is not None else None
    qc = build_quantization_config(model, config, summary)
    tensors = tensors_to_save(model, fp_dtype)
    shards = _shards(tensors, max_shard_bytes)
    fp_sizes: dict[torch.dtype, int] = {}
    for name, t in tensors.items():
        if t.is_floating_point() and not any(name.startswith(f"{m}.") for m in qc["modules"]):
            fp_sizes[t.dtype] = fp_sizes.get(t.dtype, 0) + t.numel()
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = WEIGHTS_NAME if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_tensors(shard, folder / fname)
        weight_map.update({name: fname for name in shard})
    if len(shards) > 1:
        write_index(folder, weight_map, sum(t.numel() * t.element_size() for t in tensors.values()))
    write_metadata(folder, model, qc, fp_sizes, tokenizer=tokenizer, tokenizer_from=tokenizer_from, report=report)
    return qc


def write_index(folder: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total_bytes},
                                                 "weight_map": dict(sorted(weight_map.items()))}, indent=1))


def write_metadata(folder: Path, model: nn.Module, qc: dict | None, fp_sizes: dict[torch.dtype, int], *,
                   tokenizer=None, tokenizer_from: str | Path | None = None, report=None) -> None:
    """config.json (with `qc` as its quantization_config), generation config, tokenizer, report.json."""
    cfg = model.config.to_dict()
    if qc is not None:  # the data files are written first: their SHA-256 goes into the config
        qc = {**qc, "files": {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors"))}}
        cfg["quantization_config"] = qc
    if fp_sizes:  # the dtype most unquantized weights are stored in
        cfg["dtype"] = str(max(fp_sizes, key=fp_sizes.get)).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    elif tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_from) / name
            if src.exists():
                (folder / name).write_bytes(src.read_bytes())
    if report is not None:
        body = report.to_dict() if hasattr(report, "to_dict") else report
        (folder / "report.json").write_text(json.dumps(body, indent=1, default=str))
    _shareable(folder)


def _shareable(folder: Path) -> None:
    """Ordinary permissions (umask applied): temporary folders and files are created owner-only."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def save(model: nn.Module, out: str | Path, *, overwrite: bool = False, **kwargs) -> dict:
    """Atomically write a packed model to `out` (see :func:`save_quantized` for the options)."""
    out = check_out_folder(out, overwrite)
    holder: dict = {}
    write_folder_atomically(out, lambda tmp: holder.update(qc=save_quantized(model, tmp, **kwargs)))
    return holder["qc"]


# --------------------------------------------------------------------------- headers and verification

def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, offset of the data section) of a safetensors file, without reading the data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path.name} is truncated: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path.name} is truncated inside its header ({size} bytes, header needs {n + 8})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path.name} has a corrupt safetensors header: {exc}") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def shard_files(folder: str | Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index (sharded) or the single weights file."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    single = folder / WEIGHTS_NAME
    if not single.exists():
        raise CheckpointError(f"{folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    header, _ = read_safetensors_header(single)
    return {name: WEIGHTS_NAME for name in header}


def scan_checkpoint(folder: str | Path) -> dict[str, dict]:
    """Every stored tensor: name -> {file, dtype, shape}; raises on a truncated or inconsistent file."""
    folder = Path(folder)
    weight_map = shard_files(folder)
    found: dict[str, dict] = {}
    for fname in sorted(set(weight_map.values())):
        path = folder / fname
        if not path.exists():
            missing = sorted(k for k, v in weight_map.items() if v == fname)
            raise CheckpointError(f"shard {fname} is missing (it holds {missing[0]} and {len(missing) - 1} more)")
        header, start = read_safetensors_header(path)
        size = path.stat().st_size
        for name, info in header.items():
            dtype = _ST_DTYPES.get(info["dtype"])
            if dtype is None:
                raise CheckpointError(f"tensor {name} in {fname} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            need = torch.Size(info["shape"]).numel() * torch.empty(0, dtype=dtype).element_size()
            if end - begin != need:
                raise CheckpointError(f"tensor {name} in {fname}: {end - begin} bytes stored for shape "
                                      f"{info['shape']} {info['dtype']} ({need} expected)")
            if start + end > size:
                raise CheckpointError(f"tensor {name} in {fname} is truncated: the file has {size} bytes, "
                                      f"the tensor ends at byte {start + end}")
            found[name] = {"file": fname, "dtype": dtype, "shape": tuple(info["shape"])}
    listed = set(weight_map) - set(found)
    if listed:
        name = sorted(listed)[0]
        raise CheckpointError(f"tensor {name} is listed in the index under {weight_map[name]} but that file "
                              "does not contain it")
    return found


def expected_tensors(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """What a checkpoint of this skeleton must hold: name -> (shape, exact dtype or None for any float)."""
    skip = set(getattr(model, "all_tied_weights_keys", None) or {})
    qmods = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    out: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name in skip:
            continue
        owner, _, leaf = name.rpartition(".")
        if owner in qmods:
            shape, dtype = buffer_specs(qmods[owner].spec)[leaf]
            out[name] = (shape, None if leaf == "bias" else dtype)
        else:
            out[name] = (tuple(t.shape), None if t.is_floating_point() else t.dtype)
    return out


def verify_tensors(found: dict[str, dict], expected: dict[str, tuple]) -> None:
    """Every expected tensor is stored with its shape and dtype, and nothing unexpected is stored."""
    for name, (shape, dtype) in expected.items():
        info = found.get(name)
        if info is None:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint")
        if info["shape"] != tuple(shape):
            raise CheckpointError(f"tensor {name} has shape {list(info['shape'])} in {info['file']}, "
                                  f"expected {list(shape)}")
        if dtype is None and not info["dtype"].is_floating_point:
            raise CheckpointError(f"tensor {name} has dtype {info['dtype']} in {info['file']}, expected a float")
        if dtype is not None and info["dtype"] != dtype:
            raise CheckpointError(f"tensor {name} has dtype {info['dtype']} in {info['file']}, expected {dtype}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise CheckpointError(f"tensor {extra[0]} in {found[extra[0]]['file']} is not part of the model "
                              f"({len(extra)} unexpected tensors)")


def verify_folder(folder: str | Path, data: bool = False) -> dict[str, dict]:
    """Check a packed checkpoint against its config; returns the scan.

    Always: every tensor's name, shape and dtype against the module specs, and the config's top-level
    fields against the specs. With `data`: every data file's SHA-256 against the one recorded at save,
    and every scale, codebook scale, low-rank factor and alpha finite (the bad tensor is named).
    """
    folder = Path(folder)
    model = build_skeleton(folder)
    found = scan_checkpoint(folder)
    verify_tensors(found, expected_tensors(model))
    qc = read_quantization_config(folder)
    check_config_against_specs(qc)
    if data:
        recorded = qc.get("files")
        if recorded is None:
            log.warning("%s records no file checksums (written by lopro < 0.2?): only finiteness is checked", folder)
        else:
            for fname in sorted({i["file"] for i in found.values()} | set(recorded)):
                if fname not in recorded:
                    raise CheckpointError(f"{fname} is not one of the files recorded at save")
                path = folder / fname
                if not path.exists():
                    raise CheckpointError(f"{fname} recorded at save is missing")
                if sha256_file(path) != recorded[fname]:
                    raise CheckpointError(f"{fname} changed since it was saved (SHA-256 mismatch): the file is "
                                          "corrupt; re-download or re-quantize")
        check_finite_parts(folder, found, qc["modules"])
    return found


FLOAT_PARTS = ("scales", "vq_scale", "lr_U", "lr_S", "lr_V", "alpha", "bias")


def check_finite_parts(folder: Path, found: dict[str, dict], modules: dict) -> None:
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name, info in found.items():
        owner, _, part = name.rpartition(".")
        if owner in modules and part in FLOAT_PARTS:
            by_file.setdefault(info["file"], []).append(name)
    for fname, names in sorted(by_file.items()):
        with safe_open(str(folder / fname), framework="pt") as f:
            for name in sorted(names):
                t = f.get_tensor(name)
                if not torch.isfinite(t.float()).all():
                    raise CheckpointError(f"tensor {name} in {fname} holds NaN or inf: the checkpoint is corrupt")


def check_config_against_specs(qc: dict) -> None:
    """The quantization_config's bits and group size are those of its modules (what `lopro info` shows)."""
    for name, spec in qc["modules"].items():
        res = spec.get("residual")
        if res is None:
            continue
        if qc.get("bits") is not None and res["bits"] != qc["bits"]:
            raise CheckpointError(f"quantization_config says bits={qc['bits']} but module {name} stores "
                                  f"{res['bits']}-bit codes: the config was edited or is damaged")
        gs = qc.get("group_size")
        if res["kind"] == "scalar" and gs not in (None, -1) and res["group_size"] not in (None, gs):
            raise CheckpointError(f"quantization_config says group_size={gs} but module {name} has groups of "
                                  f"{res['group_size']}")


# --------------------------------------------------------------------------- load

@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (buffers such as RoPE tables stay real)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _plain_config(folder: str | Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def build_skeleton(folder: str | Path, dtype: torch.dtype = torch.float32,
                   compute_dtype: torch.dtype | None = None) -> nn.Module:
    """The architecture with meta parameters and empty QuantLinear modules where the config says."""
    from transformers import AutoModelForCausalLM

    qc = read_quantization_config(folder)
    if qc is None:
        raise CheckpointError(f"{folder} is not a lopro checkpoint (no quantization_config with "
                              f"quant_method '{QUANT_METHOD}')")
    if qc.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{folder} uses lopro format {qc['format_version']}; this library reads up to "
                              f"{FORMAT_VERSION}: upgrade lopro")
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(_plain_config(folder), dtype=dtype)
    install_quant_linears(model, qc["modules"], device="meta", compute_dtype=compute_dtype)
    return model


def _assign(model: nn.Module, name: str, t: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = t
    else:  # pragma: no cover - verify_tensors() rejects unknown names first
        raise CheckpointError(f"tensor {name} has no place in the model")


def default_load_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def load(folder: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         compute_dtype: torch.dtype | None = None, backend: str = "auto", verify: bool = False) -> nn.Module:
    """A ready (eval-mode) model from a packed checkpoint.

    device: where the model goes (default: cuda if available, else cpu). dtype: the unquantized
    tensors' dtype (default fp32 on CPU, bf16 on CUDA). compute_dtype: the QuantLinear compute
    dtype (default: follow the activations). Tensors are checked before any is read and loaded one
    at a time straight into place. backend: the packed layers' kernels (``lopro.nn.backends``:
    auto, int4pack, dense, reference); all but ``reference`` compute in `compute_dtype` (default
    bf16) and cast the unquantized tensors to it.
    """
    from safetensors import safe_open

    folder = Path(folder)
    if verify:  # checksums of the data files and finite scales and factors, before anything is loaded
        verify_folder(folder, data=True)
    device = resolve_device(device)
    dtype = dtype or default_load_dtype(device)
    model = build_skeleton(folder, dtype=dtype, compute_dtype=compute_dtype)
    found = scan_checkpoint(folder)
    expected = expected_tensors(model)
    verify_tensors(found, expected)
    qmods = {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    for fname in sorted({info["file"] for info in found.values()}):
        dev = str(device) if device.type != "cpu" else "cpu"
        with safe_open(str(folder / fname), framework="pt", device=dev) as f:
            for name in f.keys():
                t = f.get_tensor(name)
                owner = name.rpartition(".")[0]
                if t.is_floating_point() and (owner not in qmods or name.endswith(".bias")):
                    t = t.to(dtype)
                _assign(model, name, t)
    model.tie_weights()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise CheckpointError(f"tensor {name} was not loaded (missing from the checkpoint)")
    set_compute_dtype(model, compute_dtype)
    model.to(device)
    model.eval()
    model.config.quantization_config = read_quantization_config(folder)
    from lopro.nn.backends import set_backend

    set_backend(model, backend, compute_dtype)
    return model


# --------------------------------------------------------------------------- info

def checkpoint_info(folder: str | Path) -> dict[str, Any]:
    """Config, effective bits and sizes of a packed checkpoint (headers only)."""
    folder = Path(folder)
    qc = read_quantization_config(folder)
    if qc is None:
        raise CheckpointError(f"{folder} is not a lopro checkpoint")
    found = scan_checkpoint(folder)
    modules = qc["modules"]
    qbytes = fpbytes = 0
    for name, info in found.items():
        nbytes = torch.Size(info["shape"]).numel() * torch.empty(0, dtype=info["dtype"]).element_size()
        if name.rpartition(".")[0] in modules and not name.endswith(".bias"):
            qbytes += nbytes
        else:
            fpbytes += nbytes
    disk = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    weights = sum((folder / f).stat().st_size for f in {i["file"] for i in found.values()})
    params = qc.get("quantized_params") or sum(s["in_features"] * s["out_features"] for s in modules.values())
    return {
        "folder": str(folder),
        "method": qc.get("method"), "bits": qc.get("bits"), "group_size": qc.get("group_size"),
        "rank": qc.get("rank"), "rank_dtype": qc.get("rank_dtype"),
        "effective_bits": qbytes * 8 / params if params else float("nan"),
        "effective_bits_config": qc.get("effective_bits"),
        "quantized_layers": len(modules), "quantized_params": params,
        "quantized_bytes": qbytes, "unquantized_bytes": fpbytes,
        "weights_bytes": weights, "folder_bytes": disk,
        "lopro_version": qc.get("lopro_version"), "calibration_sha256": qc.get("calibration_sha256"),
        "hadamard_convention": qc.get("hadamard_convention"),
        "quant_config": qc.get("quant_config"),
    }


__all__ = ["CheckpointError", "QUANT_METHOD", "FORMAT_VERSION", "build_quantization_config", "save", "save_quantized",
           "load", "verify_folder", "scan_checkpoint", "checkpoint_info", "is_lopro_checkpoint",
           "read_quantization_config", "build_skeleton", "params_on_meta"]
