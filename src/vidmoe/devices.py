"""Devices and dtypes by name: the one place a "cpu" / "cuda:1" / "auto" string becomes a
`torch.device`, for the loader, the CLI, the server and training alike."""

from __future__ import annotations

import torch

DEVICES = '"cpu", "cuda", "cuda:N" or "auto"'
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device(device: str | torch.device) -> None:
    """ValueError unless `device` is "auto" or a CPU/CUDA device string torch parses."""
    if device == "auto" or isinstance(device, torch.device) and device.type in ("cpu", "cuda"):
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be {DEVICES}; got {device!r}")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for a name ("auto": CUDA when available, else CPU).

    A CUDA device on a machine without one is a ValueError that says so, before anything loads.
    """
    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} needs CUDA, but torch sees no CUDA device here "
            f'(torch {torch.__version__}): use device "cpu" or "auto"'
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) here"
        )
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The torch dtype for a name ("auto": bfloat16 on CUDA, float32 on CPU)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]
