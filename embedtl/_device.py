"""Which device work runs on, and how much memory it may hold."""

from __future__ import annotations

import os

from .errors import DeviceError

__all__ = ["resolve_device", "default_memory_budget"]


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when there is one, else ``cpu``. Asking for a missing GPU is an
    error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {device} was asked for, but torch sees no CUDA device here"
            )
        return device
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("--device mps was asked for, but MPS is not available here")
        return device
    if device != "cpu":
        raise DeviceError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    return device


def default_memory_budget() -> int:
    """Bytes of features one job may hold in memory (a head's training split, an index's raw
    vectors): a quarter of RAM (1 GiB if unknown)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)
    except (ValueError, OSError, AttributeError):
        return 1 << 30
