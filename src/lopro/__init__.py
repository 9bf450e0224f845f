"""lopro: post-training 2-4 bit quantization of LLMs (LoPRo, FLRQ, GPTQ, GPTVQ, RTN, LQER)."""
from __future__ import annotations

from lopro._version import __version__  # one source, so a source tree and an install key caches alike
from lopro.config import QuantConfig  # noqa: E402
from lopro.methods import available_methods  # noqa: E402
from lopro.pipeline.run import QuantReport, quantize  # noqa: E402
from lopro.io.checkpoint import load, save  # noqa: E402
from lopro.io.loading import load_model, load_tokenizer  # noqa: E402
from lopro.data.windows import calibration  # noqa: E402
from lopro.jobs import evaluate_ppl, quantize_to_folder  # noqa: E402
from lopro.io.hf_quantizer import register_lazily as _register_hf_quantizer  # noqa: E402

_register_hf_quantizer()  # transformers' AutoModelForCausalLM.from_pretrained reads lopro checkpoints

__all__ = ["QuantConfig", "QuantReport", "quantize", "quantize_to_folder", "evaluate_ppl", "load", "save",
           "load_model", "load_tokenizer", "calibration", "available_methods", "__version__"]
