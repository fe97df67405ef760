"""Choosing how a job runs, before anything streams: the device, the runtime (and why), the
decoder (PIL in the pipeline's threads, or JPEGs on the model's device), the batch size (tuned
on large CUDA jobs), the input pipeline's threads; the model built once (:class:`_Engine`)."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .._device import check_batch_memory, resolve_device
from ..backbones import BackboneSpec
from ..cache import onnx_model_path
from ..data import DECODER, max_image_pixels
from ..errors import EmbedTLError
from ..runtime import (
    OnnxModel,
    TorchRuntime,
    autotune_batch,
    backbone_onnx,
    compile_decision,
    load_runtime,
    onnx_device,
    resolve_runtime,
)
from ..tensor_decode import DECODERS, TensorDecoder, probe
from ._options import EngineOptions, default_batch_size, default_threads

log = logging.getLogger(__name__)


@dataclass
class _Engine:
    model: Any  # a runtime from embedtl.runtime
    device: str
    runtime: str
    reason: str
    batch_size: int
    workers: int
    decoder: TensorDecoder | None  # JPEGs decoded on the model's device; None: PIL in threads
    decoder_reason: str
    autotune: dict[int, float] | None = None  # batch size -> images/s, when it was tuned
    decode_fallback: Counter = field(default_factory=Counter)  # why images went to PIL instead

    @property
    def decoder_name(self) -> str:
        """How images are decoded and resized: the tensor decoder's name, else PIL's
        (:data:`DECODER`)."""
        return self.decoder.name if self.decoder is not None else DECODER

    @property
    def parity(self) -> dict | None:
        """The runtime's check against float32 PyTorch (ONNX export, autocast, compile)."""
        return self.model.parity

    def final_reason(self) -> str:
        """The runtime reason, with what changed while running (precision fallback, backoff)."""
        return "; ".join([self.reason, *self.model.notes])

    def summary(self) -> dict[str, Any]:
        """What the store's ``extraction`` metadata and ``--json`` record of how the model ran."""
        return {
            "runtime": self.runtime,
            "device": self.device,
            "precision": self.model.precision,
            "compiled": self.model.compiled,
            "batch_size": min(self.batch_size, self.model.max_batch or self.batch_size),
            "autotune": self.autotune,
            "decoder": self.decoder_name,
            "decoder_reason": self.decoder_reason,
            "decode_fallback": dict(self.decode_fallback),
            "parity": self.parity,
        }


#: The CUDA batch size is tuned (:func:`embedtl.runtime.autotune_batch`) for jobs larger than
#: this many images; smaller ones run at :data:`~embedtl.engine.CUDA_BATCH`.
_AUTOTUNE_MIN_IMAGES = 2048


def _pick_decoder(
    decoder: str, device: str, spec: BackboneSpec
) -> tuple[TensorDecoder | None, str]:
    """The tensor decoder for ``--decoder`` (None: PIL in the pipeline's threads) and why."""
    if decoder not in DECODERS:
        raise EmbedTLError(f"unknown decoder {decoder!r}: use {', '.join(DECODERS)}")
    cuda = device.startswith("cuda")
    on = device if cuda else "cpu"  # torchvision decodes on CUDA or the CPU (not MPS)
    if decoder == "pil" or (decoder == "auto" and not cuda):
        asked = " (asked for)" if decoder == "pil" else ""
        return None, f"PIL in the input pipeline's threads{asked}"
    err = probe(on)
    if err is not None:
        if decoder == "torchvision":
            raise EmbedTLError(f"--decoder torchvision does not work on {on}: {err}")
        log.warning(
            "JPEG decoding on the GPU is unavailable (%s): decoding with PIL on the CPU", err
        )
        return None, f"PIL in the input pipeline's threads (nvJPEG unavailable: {err})"
    return TensorDecoder(spec.preprocess, on), "JPEGs on " + (
        "the GPU (nvJPEG)" if cuda else "the CPU (libjpeg-turbo, asked for)"
    )


def _engine(
    spec: BackboneSpec,
    options: EngineOptions,
    n_images: int,
    onnx: OnnxModel | None = None,
    stages: dict[str, float] | None = None,
    spinning: bool = True,
) -> _Engine:
    """Device, runtime (and why), decoder, batch size and workers for ``n_images``; the model
    built. On CUDA without a batch size the batch is tuned for large jobs. ``onnx``: the model
    ONNX Runtime runs (default: the backbone's export, cached per fingerprint). ``stages`` gets
    the seconds of building the runtime (``startup``) and of exporting the ONNX model
    (``export``, on a cache miss). ``spinning``: ONNX Runtime's idle threads spin."""
    o = options
    t0 = time.perf_counter()
    max_image_pixels()  # a bad $EMBEDTL_MAX_IMAGE_PIXELS fails here, not once per image
    run_device = resolve_device(o.device)
    if onnx is None:
        path = onnx_model_path(o.cache_root, spec.name, spec.fingerprint())
        onnx = backbone_onnx(spec, path, o.allow_download)
    found = run_device
    if o.runtime == "onnxruntime":  # auto on a GPU machine: the CPU, unless ORT can use CUDA
        run_device = onnx_device(o.device, run_device)
    run_runtime, reason = resolve_runtime(
        o.runtime, run_device, n_images, onnx.path, o.precision, o.compile
    )
    if run_device != found:
        reason += f" (on the CPU: {found} is there, but ONNX Runtime's CUDA provider is not)"
    # ONNX Runtime takes numpy batches: decoded on the CPU whatever device it runs on
    host = "cpu" if run_runtime == "onnxruntime" else run_device
    tensor_decoder, decoder_reason = _pick_decoder(o.decoder, host, spec)
    # before the model or a batch is allocated: a --batch-size as given; without one, one image
    # (the default batch is tuned, and halves on out-of-memory, down to one image)
    check_batch_memory(run_device, spec.preprocess.crop, max(1, min(o.batch_size or 1, n_images)))
    compile_now, compile_note = compile_decision(o.compile, run_device, n_images)
    if compile_note and run_runtime == "torch":
        reason = f"{reason}; {compile_note}"
    model, fallback = load_runtime(
        run_runtime, spec, run_device, onnx, o.allow_download, o.precision, compile_now, spinning
    )
    if stages is not None:
        export = getattr(model, "export_seconds", 0.0)
        stages["startup"] = stages.get("startup", 0.0) + time.perf_counter() - t0 - export
        if export:
            stages["export"] = stages.get("export", 0.0) + export
    if fallback is not None:
        run_runtime, reason = model.name, fallback
    batch_size, tuned = o.batch_size, None
    if (
        batch_size is None
        and run_device.startswith("cuda")
        and isinstance(model, TorchRuntime)
        and n_images >= _AUTOTUNE_MIN_IMAGES
    ):
        batch_size, tuned = _autotune(model, spec, n_images)
    batch = batch_size or default_batch_size(run_device, spec.preprocess.crop, run_runtime)
    if model.compiled:
        model.pad_to = batch
    return _Engine(
        model=model,
        device=run_device,
        runtime=run_runtime,
        reason=reason,
        batch_size=batch,
        workers=_workers(o.workers, run_device, run_runtime, -(-n_images // batch)),
        decoder=tensor_decoder,
        decoder_reason=decoder_reason,
        autotune=tuned,
    )


def _workers(asked: int | None, device: str, runtime: str, n_batches: int) -> int:
    """The input pipeline's threads for a run of ``n_batches``: :func:`default_threads`, or as
    asked, never more than there are batches to decode or twice the cores (500 workers for 3
    images took a minute), saying so when an asked number is cut."""
    if asked is None:
        return min(default_threads(device, runtime), max(1, n_batches))
    cap = max(1, min(n_batches, 2 * (os.cpu_count() or 1)))
    if asked > cap:
        log.warning(
            "--workers %d: using %d (%d batches to decode, %d cores)",
            asked,
            cap,
            n_batches,
            os.cpu_count() or 1,
        )
        return cap
    return asked


def _autotune(
    model: TorchRuntime, spec: BackboneSpec, n_images: int
) -> tuple[int, dict[int, float]]:
    """The batch size to run the model at on its device (:func:`autotune_batch`; eager, seeded
    uint8 input)."""
    import torch

    c = spec.preprocess.crop
    g = torch.Generator(device=model.device).manual_seed(0)

    def make(b: int):
        return model.prepare(
            torch.randint(0, 256, (b, 3, c, c), dtype=torch.uint8, device=model.device, generator=g)
        )

    t = time.perf_counter()
    batch, rates = autotune_batch(
        lambda x: model.forward(x, eager=True),
        make,
        limit=min(1024, n_images),
        sync=model.synchronize,
    )
    if model.cuda:
        torch.cuda.empty_cache()  # what the largest tries held goes back to the pool
    log.info(
        "batch size %d (tuned in %.1f s; images/s by batch: %s)",
        batch,
        time.perf_counter() - t,
        {b: round(r) for b, r in rates.items()},
    )
    return batch, {b: round(r, 1) for b, r in rates.items()}
