"""How the extraction engine runs a frozen backbone: PyTorch (CPU or CUDA) or ONNX Runtime (CPU).

A runtime takes a uint8 batch (B, 3, H, W) and returns float32 features (B, D) as numpy. The
ONNX model is the backbone's :class:`~embedtl._model.FeatureModel` exported once per fingerprint
by :func:`embedtl.export.export_onnx` (which refuses an export that does not match PyTorch), and
cached beside the feature stores. The runtime is recorded in store metadata; the cache key stays
the backbone fingerprint.
"""

from __future__ import annotations

import importlib.util
import logging
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from .backbones import BackboneSpec, build_feature_model
from .errors import DeviceError, EmbedTLError

__all__ = [
    "RUNTIMES",
    "ONNX_BATCH",
    "AUTO_ONNX_MIN_IMAGES",
    "resolve_runtime",
    "load_runtime",
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


def resolve_runtime(requested: str, device: str, n_images: int, onnx_path: Path) -> tuple[str, str]:
    """(runtime, reason) for a run of ``n_images`` on ``device``."""
    if requested not in RUNTIMES:
        raise EmbedTLError(f"unknown runtime {requested!r}: use {', '.join(RUNTIMES)}")
    cuda = device.startswith("cuda")
    if requested == "torch":
        return "torch", "asked for" + (
            ": CUDA with AMP (float16) and channels_last" if cuda else ""
        )
    if requested == "onnxruntime":
        if device != "cpu":
            raise DeviceError(
                f"--runtime onnxruntime runs on the CPU; it cannot use --device {device}"
            )
        if not _have_onnxruntime():
            raise EmbedTLError(
                "--runtime onnxruntime needs the onnxruntime package: pip install onnxruntime"
            )
        return "onnxruntime", "asked for"
    if cuda:
        return "torch", "CUDA device: PyTorch with AMP (float16) and channels_last"
    if device != "cpu":
        return "torch", f"{device}: PyTorch"
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


def _failure_marker(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.stem + ".failed.json")


def export_failure(onnx_path: Path) -> str | None:
    """Why the export of this fingerprint failed before, if it did (``auto`` then skips it)."""
    import json

    try:
        return str(json.loads(_failure_marker(onnx_path).read_text())["error"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class TorchRuntime:
    name = "torch"
    parity = None

    def __init__(self, spec: BackboneSpec, device: str, allow_download: bool | None) -> None:
        import torch

        self.device = device
        self.cuda = device.startswith("cuda")
        self.model = build_feature_model(spec, allow_download=allow_download)
        # channels_last is faster for these convnets on CPU too, and leaves the features
        # unchanged within float rounding (tests/test_extract.py compares with a plain forward)
        self.model.to(device, memory_format=torch.channels_last)
        self._amp = torch.autocast("cuda", dtype=torch.float16) if self.cuda else nullcontext()

    def prepare(self, x):
        """Host -> device (the ``h2d`` stage)."""
        import torch

        x = x.to(self.device, non_blocking=self.cuda).contiguous(memory_format=torch.channels_last)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return x

    def __call__(self, x) -> np.ndarray:
        import torch

        with torch.inference_mode(), self._amp:
            f = self.model(x)
        return f.float().cpu().numpy()  # (B, D); syncs with the device


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, spec: BackboneSpec, path: Path, allow_download: bool | None) -> None:
        import onnxruntime as ort

        from .export import export_onnx

        opts = ort.SessionOptions()
        import torch

        # as many threads as PyTorch uses: OMP_NUM_THREADS when set (torchrun sets 1 per rank)
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if path.is_file():
            try:
                self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])  # fmt: skip
            except Exception as e:  # a damaged cache file: it is derived data, make it again
                log.warning("the cached ONNX export %s is unreadable (%s): exporting again", path, " ".join(str(e).split())[:120])  # fmt: skip
                path.unlink(missing_ok=True)
        if not path.is_file():
            log.info("exporting %s to ONNX (once per fingerprint): %s", spec.name, path)
            model = build_feature_model(spec, allow_download=allow_download)
            crop = spec.preprocess.crop
            export_onnx(model, path, (2, 3, crop, crop), metadata={"backbone": spec.to_dict()})
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])  # fmt: skip
        self.input_name = self.session.get_inputs()[0].name
        #: the export's check against PyTorch on a seeded batch (max_abs_diff, min_cosine, batch)
        self.parity = _read_parity(path)

    def prepare(self, x):
        return x.numpy()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


def _read_parity(path: Path) -> dict | None:
    import json

    try:
        return dict(json.loads(path.with_suffix(".json").read_text())["parity"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_runtime(
    name: str, spec: BackboneSpec, device: str, onnx_path: Path, allow_download: bool | None
) -> tuple[TorchRuntime | OnnxRuntime, str | None]:
    """The runtime ``name`` for ``spec``, and why it is not ``name`` when it is not: a backbone
    that cannot be exported to ONNX, or whose export does not match PyTorch, runs in PyTorch
    instead, with a warning (and the failure is remembered, so ``auto`` does not retry it)."""
    import json

    from .export import ExportError

    if name == "onnxruntime":
        try:
            return OnnxRuntime(spec, onnx_path, allow_download), None
        except ExportError as e:
            why = " ".join(str(e).split())
            log.warning("ONNX Runtime cannot run %s, extracting with PyTorch instead: %s", spec.name, why)  # fmt: skip
            marker = _failure_marker(onnx_path)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"error": why[:500], "backbone": spec.to_dict()}))
            return TorchRuntime(spec, device, allow_download), f"ONNX Runtime unavailable ({why[:200]}): PyTorch eager instead"  # fmt: skip
    return TorchRuntime(spec, device, allow_download), None
