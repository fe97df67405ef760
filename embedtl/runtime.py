"""How the extraction engine runs a frozen backbone: PyTorch (CPU or CUDA;
:mod:`embedtl._torch_runtime`) or ONNX Runtime (CPU, or its CUDA provider), chosen for the job
(:func:`resolve_runtime`, :func:`compile_decision`) and loaded (:func:`load_runtime`).

A runtime takes a uint8 batch (B, 3, H, W) and returns float32 features (B, D) as numpy. The
ONNX model (:class:`~embedtl._ort.OnnxModel`) is the backbone's
:class:`~embedtl._model.FeatureModel` exported once per fingerprint by
:func:`embedtl._onnx.export_onnx` (which refuses an export that does not match PyTorch) and
cached beside the feature stores, or another model a caller names (prediction's backbone + head,
cached per head). The runtime is recorded in store metadata; the cache key stays the backbone
fingerprint.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from ._builder import build_feature_model
from ._io import write_text
from ._ort import Finished, OnnxModel, OnnxRuntime
from ._torch_runtime import (
    MIN_COSINE,
    PRECISIONS,
    SLOW_AUTOCAST,
    TorchRuntime,
    autotune_batch,
    resolve_precision,
)
from .backbones import BackboneSpec
from .errors import DeviceError, EmbedTLError, ExportError

__all__ = [
    "Finished",
    "RUNTIMES",
    "PRECISIONS",
    "MIN_COSINE",
    "SLOW_AUTOCAST",
    "resolve_precision",
    "autotune_batch",
    "TorchRuntime",
    "OnnxModel",
    "OnnxRuntime",
    "backbone_onnx",
    "ONNX_BATCH",
    "AUTO_ONNX_MIN_IMAGES",
    "resolve_runtime",
    "load_runtime",
    "compile_decision",
    "COMPILE_MIN_IMAGES",
    "export_failure",
]

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime")
#: Under ``auto`` on CPU, ONNX Runtime is used when its export is cached, or when there are at
#: least this many images to extract. Measured here for EfficientNet-Lite0 at 224 px: the export
#: takes ~3 s once per fingerprint (every folder then reuses it), after which ONNX Runtime runs
#: ~120 img/s against ~80 for PyTorch eager at its best batch size: ~4.5 ms saved per image.
AUTO_ONNX_MIN_IMAGES = 500
#: ONNX Runtime's CPU throughput is flat from batch 1 to 32 at 224 px and best at 16-48 at 64 px.
ONNX_BATCH = 16


def _have_onnxruntime() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def _ort_cuda() -> bool:
    """Whether ONNX Runtime has a CUDA provider here (the onnxruntime-gpu package)."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def onnx_device(asked: str, device: str) -> str:
    """The device ONNX Runtime runs on for ``--device asked`` (resolved to ``device``): the
    GPU when one was asked for or found and ONNX Runtime's CUDA provider is installed, else the
    CPU. ``auto`` on a machine with CUDA but the CPU-only onnxruntime is the CPU, not an error;
    an explicit ``--device cuda`` that ONNX Runtime cannot use is refused by
    :func:`resolve_runtime`."""
    if not device.startswith("cuda") or not _have_onnxruntime():
        return device
    return device if asked != "auto" or _ort_cuda() else "cpu"


def resolve_runtime(
    requested: str,
    device: str,
    n_images: int,
    onnx_path: Path,
    precision: str = "auto",
    compile: bool = False,
) -> tuple[str, str]:
    """(runtime, reason) for a run of ``n_images`` on ``device``."""
    if requested not in RUNTIMES:
        raise EmbedTLError(f"unknown runtime {requested!r}: use {', '.join(RUNTIMES)}")
    resolve_precision(precision, device)  # an unknown name fails here, before any work
    cuda = device.startswith("cuda")
    torch_only = [
        o
        for o, on in (
            ("--compile", compile),
            (f"--precision {precision}", precision not in ("auto", "fp32")),
        )
        if on
    ]
    if requested == "torch":
        return "torch", "asked for" + (": CUDA with autocast and channels_last" if cuda else "")
    if requested == "onnxruntime":
        if torch_only:
            raise EmbedTLError(
                f"{' and '.join(torch_only)} apply to --runtime torch, not onnxruntime"
            )
        if not _have_onnxruntime():
            raise EmbedTLError(
                "--runtime onnxruntime needs the onnxruntime package: pip install onnxruntime"
            )
        if device != "cpu" and not (cuda and _ort_cuda()):
            raise DeviceError(
                f"--runtime onnxruntime runs on the CPU here (its CUDA provider is not "
                f"installed: pip install onnxruntime-gpu); it cannot use --device {device}"
            )
        return "onnxruntime", "asked for" + (": its CUDA provider" if cuda else "")
    if cuda:
        return "torch", "CUDA device: PyTorch with autocast and channels_last"
    if device != "cpu":
        return "torch", f"{device}: PyTorch"
    if torch_only:
        return "torch", f"CPU: PyTorch ({' and '.join(torch_only)} asked for)"
    if not _have_onnxruntime():
        return (
            "torch",
            "CPU: onnxruntime is not installed (pip install onnxruntime for faster CPU extraction)",
        )
    failed = export_failure(onnx_path)
    if failed:
        return (
            "torch",
            f"CPU: PyTorch eager (the ONNX export of this backbone failed before: {failed})",
        )
    if onnx_path.is_file():
        return "onnxruntime", "CPU: ONNX Runtime, export already cached"
    if n_images >= AUTO_ONNX_MIN_IMAGES:
        return "onnxruntime", f"CPU: ONNX Runtime ({n_images} images repay the one-off export)"
    return "torch", f"CPU: PyTorch eager (only {n_images} images; an ONNX export would not pay off)"


#: Images a run needs before ``--compile`` pays for its compile. On this CPU
#: (benchmarks/results/compile_cost.md) a registered backbone's first compile took 24-42 s
#: cold (2-4 s with Inductor's cache warm) for 1.2-1.5x eager: it paid after 700-11,700 images
#: cold (70-1,055 warm). On CUDA a model runs ~100x faster per image (EfficientNet-Lite0 21,471
#: images/s alone on the H200), so the seconds saved per image are ~100x fewer for a compile
#: that costs as much (the GPU run's did not finish in 60 s): about a million images.
COMPILE_MIN_IMAGES = {"cpu": 5_000, "cuda": 1_000_000}


def compile_decision(asked: bool, device: str, n_images: int) -> tuple[bool, str]:
    """(compile or not, what to say): ``--compile`` is honoured when the run has enough images
    to repay the compile (:data:`COMPILE_MIN_IMAGES`), else the model runs eager and the
    reason says so."""
    if not asked:
        return False, ""
    need = COMPILE_MIN_IMAGES["cuda" if device.startswith("cuda") else "cpu"]
    if n_images >= need:
        return True, f"compiled ({n_images} images repay the compile)"
    return False, (
        f"--compile not used: {n_images} images would not repay its compile (it pays from "
        f"~{need:,} on {device}; benchmarks/results/compile_cost.md)"
    )


def _failure_marker(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.stem + ".failed.json")


def export_failure(onnx_path: Path) -> str | None:
    """Why the export of this fingerprint failed before, if it did (``auto`` then skips it)."""
    import json

    try:
        return str(json.loads(_failure_marker(onnx_path).read_text())["error"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def backbone_onnx(spec: BackboneSpec, path: Path, allow_download: bool | None) -> OnnxModel:
    """The backbone's feature output as ONNX, exported once per fingerprint at ``path``."""

    def export(out: Path) -> None:
        from ._onnx import export_onnx  # looked up on use: tests replace it

        log.info("exporting %s to ONNX (once per fingerprint): %s", spec.name, out)
        model = build_feature_model(spec, allow_download=allow_download)
        crop = spec.preprocess.crop
        export_onnx(model, out, (2, 3, crop, crop), metadata={"backbone": spec.to_dict()})

    return OnnxModel(path, export)


def load_runtime(
    name: str,
    spec: BackboneSpec,
    device: str,
    onnx_path: Path | OnnxModel,
    allow_download: bool | None,
    precision: str = "auto",
    compile: bool = False,
    spinning: bool = True,
) -> tuple[TorchRuntime | OnnxRuntime, str | None]:
    """The runtime ``name`` for ``spec``, and why it is not ``name`` when it is not: a backbone
    that cannot be exported to ONNX, or whose export does not match PyTorch, runs in PyTorch
    instead, with a warning (and the failure is remembered, so ``auto`` does not retry it).
    ``onnx_path``: where the backbone's export is cached, or the :class:`OnnxModel` to run;
    ``spinning``: ONNX Runtime's idle threads spin (see :func:`embedtl._ort._session`)."""
    import json

    onnx = (
        onnx_path
        if isinstance(onnx_path, OnnxModel)
        else backbone_onnx(spec, onnx_path, allow_download)
    )
    onnx_path = onnx.path
    if name == "onnxruntime":
        try:
            return OnnxRuntime(onnx, spinning, device), None
        except ExportError as e:
            why = " ".join(str(e).split())
            log.warning(
                "ONNX Runtime cannot run %s, extracting with PyTorch instead: %s", spec.name, why
            )
            marker = {"error": why[:500], "backbone": spec.to_dict()}
            write_text(_failure_marker(onnx_path), json.dumps(marker))
            instead = f"ONNX Runtime unavailable ({why[:200]}): PyTorch eager instead"
            return TorchRuntime(spec, device, allow_download, precision, compile), instead
    return TorchRuntime(spec, device, allow_download, precision, compile), None
