"""lopro: post-training 2-4 bit quantization of LLMs (LoPRo, FLRQ, GPTQ, GPTVQ, RTN, LQER)."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lopro")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"

from .config import QuantConfig  # noqa: E402
from .methods import available_methods  # noqa: E402
from .model.pipeline import QuantReport, quantize  # noqa: E402

__all__ = ["QuantConfig", "QuantReport", "quantize", "available_methods", "__version__"]
