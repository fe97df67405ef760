"""Which device work runs on, and how much memory it may hold."""

from __future__ import annotations

import os
import sys

from .errors import DeviceError

__all__ = ["resolve_device", "default_memory_budget"]


def _no_cuda_here() -> bool:
    """True when this machine certainly has no CUDA device, known without importing torch:
    CUDA hidden by ``CUDA_VISIBLE_DEVICES``, macOS, or Linux without the NVIDIA driver. Once
    torch is imported it is asked instead."""
    if "torch" in sys.modules:
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return True
    if sys.platform == "darwin":
        return True
    return sys.platform.startswith("linux") and not os.path.exists("/proc/driver/nvidia/version")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when there is one, else ``cpu``. Asking for a missing GPU is an
    error. ``auto`` and ``cpu`` on a machine without an NVIDIA driver import no torch."""
    if device == "cpu" or (device == "auto" and _no_cuda_here()):
        return "cpu"
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
