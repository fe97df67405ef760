"""ONNX Runtime sessions: the model file a run uses (cached, exported on a miss) and the runtime
that runs it on the CPU, numpy in and numpy out. Nothing here imports torch; only exporting a
missing model (the ``export`` of an :class:`OnnxModel`) does."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Finished", "OnnxModel", "OnnxRuntime"]

log = logging.getLogger("embedtl.runtime")


class Finished:
    """A batch whose features are ready: ``result()`` -> (features (B, D) float32, stage
    seconds)."""

    def __init__(self, feats: np.ndarray, times: dict[str, float]) -> None:
        self.feats, self.times = feats, times

    def result(self) -> tuple[np.ndarray, dict[str, float]]:
        """(features (B, D) float32, stage seconds ``h2d`` and ``model``); nothing to wait for."""
        return self.feats, self.times


@dataclass(frozen=True)
class OnnxModel:
    """An ONNX file the ONNX Runtime path runs (uint8 images in), and how to make it when it is
    not cached: ``export(path)`` writes it (with torch; only on a miss)."""

    path: Path
    export: Callable[[Path], object]


class OnnxRuntime:
    """An ONNX model in an ONNX Runtime session: numpy in, numpy out, no torch (unless the
    model has to be exported first). On the CPU, or with ``device`` ``cuda[:N]`` on ONNX
    Runtime's CUDA provider (onnxruntime-gpu), which must then really be the one running it."""

    name = "onnxruntime"
    precision = "fp32"
    compiled = False
    max_batch = None

    def __init__(self, model: OnnxModel, spinning: bool = True, device: str = "cpu") -> None:
        self.notes: list[str] = []
        self.device = device
        path = model.path
        if path.is_file():
            try:
                self.session = _session(path, spinning, device)
            except Exception as e:  # a damaged cache file: it is derived data, make it again
                log.warning(
                    "the cached ONNX export %s is unreadable (%s): exporting again",
                    path,
                    " ".join(str(e).split())[:120],
                )
                path.unlink(missing_ok=True)
        #: seconds spent exporting the model (a cache miss)
        self.export_seconds = 0.0
        if not path.is_file():
            t_export = time.perf_counter()
            model.export(path)
            self.export_seconds = time.perf_counter() - t_export
            self.session = _session(path, spinning, device)
        if device.startswith("cuda") and self.session.get_providers()[0] != _CUDA:
            from .errors import DeviceError

            raise DeviceError(
                f"ONNX Runtime's CUDA provider did not start on {device} (it runs on "
                f"{self.session.get_providers()[0]}): use --runtime torch, or check onnxruntime-gpu"
            )
        self.input_name = self.session.get_inputs()[0].name
        #: the export's check against PyTorch on a seeded batch (max_abs_diff, min_cosine, batch)
        self.parity = _read_parity(path)

    def prepare(self, x):
        """The batch as the C-contiguous (B, 3, H, W) array the session takes (the input
        pipeline's batches are channels-last in memory)."""
        return np.ascontiguousarray(x if isinstance(x, np.ndarray) else x.numpy())

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def submit(self, x) -> Finished:
        """Run one batch now (ONNX Runtime runs synchronously): a :class:`Finished` whose stage
        seconds are the preparation (``h2d``) and the session run (``model``)."""
        t0 = time.perf_counter()
        x = self.prepare(x)
        t1 = time.perf_counter()
        f = self(x)
        return Finished(f, {"h2d": t1 - t0, "model": time.perf_counter() - t1})

    def synchronize(self) -> None:
        """Nothing to wait for: every :meth:`submit` has already finished."""
        pass


_CUDA = "CUDAExecutionProvider"


def _session(path: Path, spinning: bool = True, device: str = "cpu"):
    """An ONNX Runtime session of the model at ``path``, on the CPU (or ``cuda[:N]``: the CUDA
    provider first). Its CPU threads: OMP_NUM_THREADS when set (torchrun sets 1 per rank), else
    ONNX Runtime's own choice (the physical cores, as PyTorch's). ``spinning=False``: idle
    threads sleep instead of spinning, for a process whose other threads need the cores
    between runs (a server decoding uploads)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        providers.insert(0, (_CUDA, {"device_id": index}))
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def _read_parity(path: Path) -> dict | None:
    try:
        return dict(json.loads(path.with_suffix(".json").read_text())["parity"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
