"""Which device work runs on, and how much memory it may hold."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from .errors import DeviceError

__all__ = [
    "ACTIVATION_BYTES_PER_PIXEL",
    "GPU_MIN_MACS",
    "ONE_THREAD_MACS",
    "activation_bytes",
    "check_batch_memory",
    "cpu_threads_for",
    "default_memory_budget",
    "memory_available",
    "resolve_device",
    "work_device",
]


def _no_cuda_here() -> bool:
    """True when this machine certainly has no CUDA device, known without importing torch:
    CUDA hidden by ``CUDA_VISIBLE_DEVICES``, macOS, or Linux with no GPU device node (NVIDIA's
    driver, WSL2's ``/dev/dxg``, ROCm's ``/dev/kfd``). Once torch is imported it is asked
    instead."""
    if "torch" in sys.modules:
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return True
    if sys.platform == "darwin":
        return True
    if not sys.platform.startswith("linux"):
        return False
    import glob

    gpu_nodes = ("/proc/driver/nvidia/version", "/dev/dxg", "/dev/kfd")  # NVIDIA, WSL2, ROCm
    return not any(os.path.exists(p) for p in gpu_nodes) and not glob.glob("/dev/nvidia[0-9]*")


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


#: Multiply-adds of a head fit, a sweep or an audit's folds below which ``--device auto`` keeps
#: them on the CPU. From the first GPU run (an H200 and its 16-core host, 60,000 x 1280 rows):
#: a linear head fitted in 1.74 s on the GPU against 0.89 s on the CPU, an MLP (512) in 1.67 s
#: against 3.77 s, a 32-variant sweep in 3.2 s against 4.6 s, and starting CUDA added 2.6 s to
#: each command. The MLP (~7e12) about breaks even with the start-up counted; the others lose.
GPU_MIN_MACS = 1e13


def work_device(device: str, macs: float) -> tuple[str, str]:
    """(device, why) for work of ``macs`` multiply-adds (a head fit, a sweep): as asked; or,
    for ``auto``, the GPU only when the work is large enough to repay CUDA's start-up
    (:data:`GPU_MIN_MACS`)."""
    if device != "auto":
        return resolve_device(device), "asked for"
    found = resolve_device("auto")
    if found == "cpu":
        return "cpu", "no CUDA device"
    if macs < GPU_MIN_MACS:
        return "cpu", (
            f"{macs:.1e} multiply-adds: the CPU finishes first below {GPU_MIN_MACS:.0e} (starting "
            "CUDA alone took 2.6 s on the H200; --device cuda to use it anyway)"
        )
    return found, f"{macs:.1e} multiply-adds: large enough for the GPU"


#: Multiply-adds of the largest product of a step below which CPU work runs on one thread. A
#: small head's step is dozens of tiny operations; with torch's intra-op threads each one is a
#: hand-off between threads, which costs more than its arithmetic, and on a busy machine (or
#: beside fit-head's own plot worker) a waiting thread loses its core: a linear head on 140 rows
#: (5 classes, 1280-d) fitted in 0.04 s on one thread against 0.2-2.5 s on two (2 cores); on
#: 2,100 rows, 0.4 s against 3-26 s. An MLP's (512) step at batch 64 is 4e7: threads still pay.
ONE_THREAD_MACS = 1 << 24


@contextlib.contextmanager
def cpu_threads_for(macs: float, device: str) -> Iterator[None]:
    """Run the block on one torch CPU thread when it is CPU work whose largest product is below
    :data:`ONE_THREAD_MACS` multiply-adds; torch's thread count is restored afterwards."""
    import torch

    if not str(device).startswith("cpu") or macs >= ONE_THREAD_MACS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: Bytes a forward pass holds per input pixel: the widest activations of the convnets embedtl
#: registers (EfficientNet-Lite's 96-channel expansion at half resolution is 24 floats per
#: pixel; ResNet-50's 256 channels at a quarter, 16), a few of them alive at once, plus the
#: decoded uint8 images; a deliberate over-estimate, used only to refuse what cannot fit.
ACTIVATION_BYTES_PER_PIXEL = 384


def memory_available(device: str) -> int | None:
    """Bytes free for a job on ``device`` (RAM's MemAvailable, the GPU's free memory), or None
    when it cannot be told."""
    if device.startswith("cuda"):
        import torch

        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except Exception:  # noqa: BLE001 - no figure: no check
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def activation_bytes(image_size: int, batch_size: int = 1) -> int:
    """The memory a forward pass of ``batch_size`` images at ``image_size`` px is estimated to
    hold (:data:`ACTIVATION_BYTES_PER_PIXEL`)."""
    return batch_size * image_size * image_size * ACTIVATION_BYTES_PER_PIXEL


def check_batch_memory(device: str, image_size: int, batch_size: int) -> None:
    """Refuse, before anything is allocated, a batch that cannot fit in ``device``'s memory:
    one line naming --image-size, --batch-size and the estimate."""
    need = activation_bytes(image_size, batch_size)
    have = memory_available(device)
    if have is not None and need > 0.8 * have:
        raise DeviceError(
            f"--image-size {image_size} at --batch-size {batch_size} needs about "
            f"{need / 2**30:.1f} GiB on {device} ({batch_size} x {image_size}^2 px x "
            f"~{ACTIVATION_BYTES_PER_PIXEL} bytes of activations), {have / 2**30:.1f} GiB are "
            "free: use a smaller --image-size or --batch-size"
        )


def default_memory_budget() -> int:
    """Bytes of features one job may hold in memory (a head's training split, an index's raw
    vectors): a quarter of RAM (1 GiB if unknown)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)
    except (ValueError, OSError, AttributeError):
        return 1 << 30
