"""The engine's public functions: :func:`extract` (a folder into its feature store),
:func:`embed_files` (loose files, not cached) and :func:`open_source` (DATA_DIR or STORE)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._io import pause_point, remove_stale_temporaries
from ..backbones import DEFAULT_BACKBONE, BackboneSpec, get_backbone
from ..cache import FeatureStore, Journal, store_lock
from ..data import SplitConfig
from ..errors import ImageDecodeError, StoreError
from ..runtime import OnnxModel
from ._loader import ContentHasher
from ._options import EngineOptions, StoreOptions
from ._plan import (
    Stages,
    Target,
    fold,
    plan_rows,
    reusable_store,
    strict_message,
    target,
    unchanged,
)
from ._setup import _Engine, _engine
from ._stream import _run_model, _stream

__all__ = ["Embedded", "ExtractStats", "embed_files", "extract_here", "open_source"]

log = logging.getLogger(__name__)


@dataclass
class ExtractStats:
    """What one call of :func:`extract` did (the ``--json`` summary of ``embedtl extract``)."""

    store: str
    n_images: int  # rows in the store
    n_failed: int
    n_skipped: int  # non-image files
    dim: int
    backbone: str
    fingerprint: str
    cached: int  # rows reused from the store or the journal of an interrupted run
    extracted: int  # rows computed in this run
    removed: int  # rows dropped because their file is gone
    seconds: float
    images_per_second: float  # rows computed / seconds spent computing them
    runtime: str | None  # None when no model ran
    runtime_reason: str
    device: str | None
    model_built: bool
    batch_size: int | None = None  # images per forward pass, when the model ran
    workers: int | None = None  # decoding workers, when the model ran
    stages: dict[str, float] = field(default_factory=dict)
    failed: list[dict[str, str]] = field(default_factory=list)
    touched: int = 0  # files with a new mtime but the same bytes (content hash): reused
    content_checked: bool = False  # every reused row's file was re-hashed (check_content=True)
    ranks: list[dict[str, Any]] | None = None  # under torchrun: what each rank's shard did
    precision: str | None = None  # fp32, fp16 or bf16 (autocast), when the model ran
    decoder: str | None = None  # how images were decoded and resized, when the model ran
    #: reason -> images that PIL decoded instead of the tensor decoder
    decode_fallback: dict[str, int] = field(default_factory=dict)
    autotune: dict[int, float] | None = None  # batch size -> images/s, when the batch was tuned
    #: entries never opened, with why: special files (FIFOs, devices, also behind links) and
    #: entries that could not be examined (not the files that are not images by name)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Every field as a dict (``embedtl extract --json``)."""
        return asdict(self)


@dataclass
class _Ran:
    """How the model ran in one extraction."""

    engine: _Engine
    seconds: float  # building the model and computing
    reason: str  # the runtime reason, with what changed while running
    summary: dict[str, Any]  # _Engine.summary()

    @staticmethod
    def fields(ran: _Ran | None, n_computed: int) -> dict[str, Any]:
        """The :class:`ExtractStats` fields of how the model ran (``ran`` None: it did not)."""
        if ran is None:
            reason = "no new or changed files: store rewritten without the model"
            return {
                "images_per_second": 0.0,
                "runtime": None,
                "runtime_reason": reason,
                "device": None,
                "model_built": False,
            }
        run = ran.summary
        keys = ("runtime", "device", "batch_size", "precision", "decoder", "autotune")
        return {
            **{k: run[k] for k in keys},
            "runtime_reason": ran.reason,
            "model_built": True,
            "images_per_second": n_computed / ran.seconds if ran.seconds else 0.0,
            "workers": ran.engine.workers,
            "decode_fallback": run["decode_fallback"],
        }


def extract_here(
    root: str | os.PathLike[str],
    backbone: str | BackboneSpec = DEFAULT_BACKBONE,
    options: EngineOptions | None = None,
    store_options: StoreOptions | None = None,
    *,
    shard: tuple[int, int] | None = None,
    progress: bool = False,
    **settings: Any,
) -> FeatureStore:
    """:func:`~embedtl.engine.extract` in this process (``shard``: one slice of the folder)."""
    t_start = time.perf_counter()
    store_opts = StoreOptions.of(store_options, **StoreOptions.settings_in(settings))
    opts = EngineOptions.of(options, **settings)
    split, labels = store_opts.split or SplitConfig(), store_opts.labels
    dtype, strict, check_content = store_opts.dtype, store_opts.strict, store_opts.check_content
    follow_links, lock_timeout = store_opts.follow_links, store_opts.lock_timeout
    stages = Stages()
    spec = get_backbone(backbone, image_size=opts.image_size)
    t = target(root, spec, opts.cache_root, split, labels, follow_links, shard, stages)
    manifest = t.manifest
    with store_lock(t.path, timeout=lock_timeout):
        with stages("plan"):
            remove_stale_temporaries(t.path)
            old = reusable_store(t, dtype)
            if old is not None:
                t.attrs["created"] = old.metadata.get("created")
            dim = old.dim if old is not None else spec.dim
            journal = Journal(t.path, t.fingerprint, dim, dtype)
            hasher = ContentHasher(manifest.root)
            journal_rows = journal.load()
            plan = plan_rows(
                manifest, old, journal_rows, t.all_paths, hasher, check_content, progress
            )
        if strict and plan.failed_known:
            pos = min(plan.failed_known)
            n = len(plan.failed_known)
            raise ImageDecodeError(strict_message(manifest, pos, plan.failed_known[pos], n))
        if old is not None and unchanged(old, manifest, plan, t.attrs):
            journal.clear()  # left by a run killed after it replaced the store
            seconds = time.perf_counter() - t_start
            old.last_extraction = _cache_hit(t, old, seconds, check_content, stages)
            return old

        stages.update(decode=0.0, h2d=0.0, model=0.0, write=0.0)
        n_resumed = len(plan.from_journal)
        ran = None
        if plan.todo:
            t0 = time.perf_counter()
            eng = _engine(spec, opts, len(plan.todo), stages=stages)
            _run_model(eng, spec, manifest, plan.todo, journal, strict, progress, stages)
            ran = _Ran(eng, time.perf_counter() - t0, eng.final_reason(), eng.summary())
            with stages("plan"):
                journal_rows = journal.load()
                plan = plan_rows(
                    manifest,
                    old,
                    journal_rows,
                    t.all_paths,
                    hasher,
                    check_content,
                    retry_unreadable=False,
                )
            if plan.todo:
                raise StoreError(
                    f"internal error: {len(plan.todo)} files neither extracted nor failed"
                )
        with stages("fold"):
            n_extracted = len(plan.from_journal) - n_resumed
            _record_run(t.attrs, ran, old, n_extracted, stages.rounded())
            rows = fold(manifest, plan, old, journal_rows, t.path, dim, dtype, t.attrs)
            pause_point("store-replaced")
            journal.clear()

    store = FeatureStore(t.path)
    store.last_extraction = ExtractStats(
        store=str(t.path),
        n_images=len(rows.paths),
        n_failed=len(rows.failed_paths),
        n_skipped=manifest.n_skipped,
        dim=dim,
        backbone=spec.name,
        fingerprint=t.fingerprint,
        cached=len(plan.from_store) + n_resumed,
        extracted=n_extracted,
        removed=plan.removed,
        seconds=time.perf_counter() - t_start,
        stages=stages.rounded(),
        failed=[
            {"path": p, "error": e}
            for p, e in zip(rows.failed_paths, rows.failed_errors, strict=True)
        ],
        touched=plan.touched,
        content_checked=check_content,
        skipped=_skipped(manifest),
        **_Ran.fields(ran, n_extracted),
    )
    return store


def _skipped(manifest) -> list[dict[str, str]]:
    return [{"path": p, "reason": why} for p, why in manifest.special]


def _cache_hit(
    t: Target, old: FeatureStore, seconds: float, check_content: bool, stages: Stages
) -> ExtractStats:
    return ExtractStats(
        store=str(t.path),
        n_images=len(old),
        n_failed=len(old.failed),
        n_skipped=t.manifest.n_skipped,
        dim=old.dim,
        backbone=t.spec.name,
        fingerprint=t.fingerprint,
        cached=len(old),
        extracted=0,
        removed=0,
        seconds=seconds,
        images_per_second=0.0,
        runtime=None,
        runtime_reason="cache hit: every file unchanged, no model built",
        device=None,
        model_built=False,
        stages=stages.rounded(),
        failed=[{"path": p, "error": e} for p, e in old.failed],
        content_checked=check_content,
        skipped=_skipped(t.manifest),
    )


def _record_run(
    attrs: dict[str, Any],
    ran: _Ran | None,
    old: FeatureStore | None,
    n_new: int,
    stages: dict[str, float],
) -> None:
    """Store metadata of how the features were made: this run's model, input pipeline
    (``workers``) and stage seconds, or (rows and labels rewritten without a model) the last
    run's, from the old store."""
    if ran is not None:
        run = ran.summary
        attrs.update(
            runtime=ran.engine.runtime,
            device=ran.engine.device,
            amp=run["precision"] if run["precision"] != "fp32" else "none",
            decoder=ran.engine.decoder_name,
            # the last run that computed features: how fast and how this backbone ran here
            extraction={
                "images": n_new,
                "seconds": round(ran.seconds, 3),
                "images_per_second": round(n_new / ran.seconds, 2) if ran.seconds > 0 else None,
                **run,
                "workers": ran.engine.workers,
                "stages": stages,
            },
        )
    elif old is not None:
        keys = ("runtime", "device", "amp", "decoder", "extraction")
        attrs.update({k: old.metadata.get(k) for k in keys})


@dataclass
class Embedded:
    """Features of loose image files (not cached): what :func:`embed_files` returns."""

    paths: list[str]  # the files that decoded, in input order
    features: np.ndarray  # (N, D) float32
    failed: list[tuple[str, str]]  # (path, error) of the files that did not
    runtime: str
    runtime_reason: str
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)


def embed_files(
    files: Sequence[str | os.PathLike[str]],
    backbone: str | BackboneSpec = DEFAULT_BACKBONE,
    options: EngineOptions | None = None,
    *,
    progress: bool = False,
    onnx: OnnxModel | None = None,
    **settings: Any,
) -> Embedded:
    """Features of image files through the same engine and runtimes as :func:`extract`, without
    writing a store (for predicting and querying new images). Unreadable files are returned in
    ``failed``, not raised. ``options`` and ``settings`` as for :func:`extract`. ``onnx``: the
    model ONNX Runtime runs instead of the backbone's export (its outputs are then returned as
    ``features`` when ``runtime`` is onnxruntime)."""
    t0 = time.perf_counter()
    opts = EngineOptions.of(options, **settings)
    spec = get_backbone(backbone, image_size=opts.image_size)
    paths = [str(Path(f).expanduser().resolve()) for f in files]
    stages = Stages(decode=0.0, h2d=0.0, model=0.0)
    eng = _engine(spec, opts, len(paths), onnx, stages)
    feats: list[np.ndarray] = []
    ok: list[int] = []
    failed: list[tuple[str, str]] = []
    for c in _stream(eng, spec, Path("/"), paths, progress, stages, f"embed {spec.name}"):
        failed.extend((paths[i], err) for i, err in c.failed)
        if c.features is not None:
            feats.append(c.features)
            ok.extend(c.positions)
    dim = feats[0].shape[1] if feats else spec.dim
    return Embedded(
        paths=[paths[i] for i in ok],
        features=np.concatenate(feats) if feats else np.zeros((0, dim), np.float32),
        failed=failed,
        runtime=eng.runtime,
        runtime_reason=eng.final_reason(),
        seconds=time.perf_counter() - t0,
        stages=stages.rounded(),
    )


def open_source(
    source: str | os.PathLike[str],
    backbone: str | BackboneSpec = DEFAULT_BACKBONE,
    options: EngineOptions | None = None,
    store_options: StoreOptions | None = None,
    *,
    progress: bool = False,
    **settings: Any,
) -> FeatureStore:
    """DATA_DIR or STORE -> its :class:`FeatureStore`: a store file as it is; a folder through
    :func:`extract` (a cache hit is a scan; new or changed images are extracted first), with
    ``settings`` as :func:`extract` takes them."""
    if Path(source).is_file():
        return FeatureStore(source)
    store = extract_here(source, backbone, options, store_options, progress=progress, **settings)
    st = store.last_extraction
    if st is not None and st.model_built:
        log.info("extracted %d images into %s (%.1f s)", st.extracted, st.store, st.seconds)
    return store
