"""High-level jobs behind the CLI: quantize a named model into a folder, evaluate a model."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path


from lopro.config import QuantConfig
from lopro.data.corpora import load_corpus
from lopro.io.atomic import check_out_folder
from lopro.data.windows import calibration_windows, eval_windows, tokenize_split
from lopro.device import resolve_device
from lopro.io.loading import load_model, load_tokenizer, resolve_model_path
from lopro.pipeline.run import quantize, validate

log = logging.getLogger(__name__)


def quantize_to_folder(model_name: str, cfg: QuantConfig, out, *, calib_data="wiki", nsamples=128, seqlen=512,
                       batch_size=8, device=None, overwrite=False, stats_cache=None, packed=True,
                       fp_dtype="auto", resume=False, offload="auto", max_shard_bytes=None) -> dict:
    """Quantize a model folder (or built-in name) into `out`, streamed block by block from disk to disk
    (lopro.io.stream): a packed lopro checkpoint (default; `fp_dtype` stores its unquantized tensors,
    see checkpoint.save_quantized), or with `packed=False` the fake-quantized fp model (dense
    dequantized weights, loadable by plain transformers). `resume` continues an interrupted run of the
    same command; `offload` ("auto", "ram", "disk") says where calibration activations live."""
    from lopro._version import __version__
    from lopro.data.windows import fingerprint
    from lopro.io.lazy import LazyModel
    from lopro.io.stream import StreamedRun, choose_offload, estimate_output_bytes, model_fingerprint
    from lopro.methods import get_method
    from lopro.pipeline.activations import estimate_bytes
    from lopro.pipeline.distributed import Dist

    dev = resolve_device(device)
    dist = Dist.from_env(dev)  # torchrun: one share of the windows and of the solves per process
    if dist.enabled:
        dev = dist.device
    out = check_out_folder(out, overwrite) if dist.is_writer else Path(out)
    path = resolve_model_path(model_name)  # fail fast on a bad name or corpus before loading anything
    load_corpus(calib_data)
    lazy = LazyModel(path)
    validate(lazy.model, cfg)
    tok, _ = load_tokenizer(str(path))
    calib = None
    if get_method(cfg.method).needs_calibration:  # RTN and other weight-only methods run no calibration forward
        calib = calibration_windows(tokenize_split(tok, calib_data, "calib"), nsamples, seqlen, cfg.seed)
    run_settings = {"calib_data": str(calib_data), "nsamples": nsamples, "seqlen": seqlen, "batch_size": batch_size,
                    "packed": packed, "fp_dtype": fp_dtype, "device": dev.type, "propagate": cfg.propagate,
                    "processes": dist.world}
    fp = {"model": model_fingerprint(lazy), "calibration_sha256": fingerprint(calib) if calib is not None else None,
          "quant_config": cfg.to_dict(), "run": run_settings, "lopro_version": __version__}
    extra = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
    hidden = lazy.model.config.hidden_size
    act = estimate_bytes(nsamples, seqlen, hidden) if calib is not None else 0
    need = estimate_output_bytes(lazy, cfg.bits if packed else 32, cfg.group_size, cfg.rank if packed else 0, act)
    error = None
    try:  # rank 0 prepares the folder (and may refuse) before any rank writes into it
        run = StreamedRun(lazy, out, fp, packed=packed, fp_dtype=fp_dtype, resume=resume, overwrite=overwrite,
                          offload=choose_offload(offload, nsamples, seqlen, hidden), need_bytes=need, dist=dist,
                          **extra)
    except Exception as exc:
        error = exc
    if not dist.all_true(error is None):  # every rank stops when rank 0 refused
        raise error or RuntimeError("rank 0 could not prepare the output folder (see its error)")
    try:
        on_layer = None
        if packed:
            from lopro.model.surgery import packer

            on_layer = packer(lazy.model)
        _, report = quantize(lazy.model, cfg, calib, batch_size=batch_size, device=dev, stats_cache=stats_cache,
                             on_layer=on_layer, io=run, dist=dist)
        report.summary["model"] = model_name
        report.summary["calib_data"] = calib_data
        report.summary["packed"] = packed
        if dist.is_writer:
            run.finalize(report, tokenizer=tok)
        dist.barrier()  # every rank returns once the folder is published
    finally:
        run.close()  # the folder's lock; what was finished stays for --resume
        dist.close()
    return report.summary


def evaluate_ppl(model_or_name, data="wiki", *, seqlen=512, windows=None, bos=False, batch_size=4, device=None,
                 tokenizer=None) -> dict:
    """Perplexity of a model object, a packed checkpoint, or an fp model folder; the last is streamed
    block by block from disk (eval.perplexity.perplexity_streamed), so a model of any size fits."""
    from lopro.eval.perplexity import perplexity

    lazy = None
    if isinstance(model_or_name, (str, Path)):
        from lopro.io.checkpoint import is_lopro_checkpoint

        path = resolve_model_path(str(model_or_name))
        if is_lopro_checkpoint(path):
            model, tokenizer, _ = load_model(str(model_or_name), device=device)
        else:
            from lopro.io.lazy import LazyModel

            lazy, (tokenizer, _) = LazyModel(path), load_tokenizer(str(path))
    else:
        model = model_or_name
    tokens = tokenize_split(tokenizer, data, "eval")
    bos_id = tokenizer.bos_token_id if bos else None
    if bos and bos_id is None:
        raise ValueError("--bos asked but the tokenizer has no BOS token")
    win = eval_windows(tokens, seqlen, windows, bos_id)
    if lazy is not None:
        res = _streamed_ppl(lazy, win, batch_size, device)
    else:
        res = perplexity(model, win, batch_size=batch_size)
    res.update({"data": data, "bos": bos, "split": "eval"})
    return res


def _streamed_ppl(lazy, windows, batch_size, device) -> dict:
    from lopro.eval.perplexity import perplexity_streamed
    from lopro.io.stream import choose_offload

    offload = choose_offload("auto", *windows.shape, lazy.model.config.hidden_size)
    dev = resolve_device(device)
    with tempfile.TemporaryDirectory(prefix="lopro-eval-") as tmp:
        return perplexity_streamed(lazy, windows, batch_size, dev, offload=offload, folder=tmp)
