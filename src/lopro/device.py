"""Where work runs when the caller does not say: CUDA when there is one, else the CPU."""
from __future__ import annotations

import functools

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """`name` as a device this machine has (None: the default); a clear error for one it lacks."""
    if name is None:
        return default_device()
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "mps"):
        raise ValueError(f"device {name!r} is not supported; use cpu or cuda")
    return dev


def has_native_bf16(device: torch.device | str) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware (CUDA with bf16 support; a CPU with AVX-512
    BF16 or AMX): elsewhere bf16 matmuls are emulated and slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return _cpu_has_bf16()


@functools.lru_cache(maxsize=1)
def _cpu_has_bf16() -> bool:
    """Read once: asked for every packed layer at load."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def forward_dtype(name: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of a pipeline forward for option `forward_dtype` (None: plain fp32)."""
    if name == "bf16" or (name == "auto" and has_native_bf16(device)):
        return torch.bfloat16
    return None
