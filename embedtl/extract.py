"""The extraction engine: frozen backbone, run once, batched, streaming into the feature store.

One function, :func:`extract`, does every extraction in embedtl:

1. resolve the backbone spec and its fingerprint (hashes the weights file; builds nothing);
2. scan the folder; compare with the store and with the journal of an interrupted run;
3. if every file is already there unchanged: done -- no model is built, no image decoded;
4. otherwise build the model once (a runtime from :mod:`embedtl.runtime`: PyTorch in ``eval()``
   under ``torch.inference_mode()``, channels_last, autocast on CUDA checked against float32;
   or ONNX Runtime on CPU) and stream the missing files through it: DataLoader workers decode
   in parallel where there are cores to spare (on CUDA they only read JPEGs, which nvJPEG
   decodes on the GPU: :mod:`embedtl.tensor_decode`); a CUDA batch is collected after the next
   one is launched; finished rows go to the journal on a writer thread;
5. fold store + journal into a new store file, sorted by path, swapped in atomically.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._dist import process_group, torchrun_rank
from ._io import pause_point, remove_stale_temporaries
from .backbones import DEFAULT_BACKBONE, BackboneSpec, get_backbone
from .cache import (
    FeatureStore,
    StoreRows,
    default_cache_dir,
    library_versions,
    onnx_model_path,
    store_lock,
    store_path,
    write_store,
)
from .cache._journal import Journal
from .data import (
    DECODER,
    UNREADABLE,
    ImageTransform,
    Manifest,
    SplitConfig,
    content_hash,
    decode_image,
    read_file,
    scan,
)
from .errors import DeviceError, EmbedTLError, ImageDecodeError, StoreError
from .runtime import (
    ONNX_BATCH,
    RUNTIMES,
    Finished,
    TorchRuntime,
    autotune_batch,
    load_runtime,
    resolve_runtime,
)
from .tensor_decode import DECODERS, TensorDecoder, fallback_reason, probe

__all__ = [
    "extract",
    "embed_files",
    "Embedded",
    "extract_distributed",
    "torchrun_rank",
    "ExtractStats",
    "resolve_device",
    "default_batch_size",
    "default_workers",
]

log = logging.getLogger(__name__)

_DTYPES = ("float16", "float32")
_FLUSH_ROWS = 4096
_FLUSH_SECONDS = 30.0


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: On CPU, a forward pass is fastest when its activations stay cache-sized: measured here
#: (benchmarks/extract_throughput.py) EfficientNet-Lite0 runs ~2x faster at batch 4 than at
#: batch 64 for 224 px (57.5 vs 28.1 img/s), and best near batch 32-48 for 64 px. The auto batch
#: size keeps about this many input pixels per forward pass.
_CPU_PIXELS_PER_BATCH = 3 * 2**16
_CUDA_BATCH = 256


def default_batch_size(device: str, image_size: int, runtime: str = "torch") -> int:
    """Images per forward pass: large on a GPU; on CPU, sized to the cache (see above)."""
    if device.startswith("cuda"):
        return _CUDA_BATCH
    if runtime == "onnxruntime":
        return ONNX_BATCH
    return int(max(1, min(256, round(_CPU_PIXELS_PER_BATCH / (image_size * image_size)))))


def default_workers(device: str = "cpu") -> int:
    """Decoding worker processes.

    With a GPU the CPU only decodes: use most cores. On CPU the forward pass already uses every
    core, and a worker preempting its threads costs more than the decoding it overlaps: on 2
    cores, 0 workers ran at 0.87 of the model-alone rate and 1 worker at 0.79 (PyTorch, 224 px,
    benchmarks/results/extract_throughput.md). With more cores a few workers get spare cores
    (not measured here).
    """
    cores = os.cpu_count() or 1
    if device.startswith("cuda"):
        return max(1, min(8, cores - 1))
    return 0 if cores <= 2 else min(4, cores // 4)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when there is one, else ``cpu``. Asking for a missing GPU is an error."""
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


class _Images:
    """Dataset of (position, uint8 tensor | None, error | None, content hash | None, JPEG bytes |
    None, why not on the device | None); decoding errors are data. Each file is read once: its
    bytes are hashed and decoded -- or, with ``tensor_jpeg``, JPEGs the tensor decoder can take
    are passed on undecoded (:mod:`embedtl.tensor_decode`), the rest decoded here.

    With a ``seed`` (a tuple, e.g. (seed, epoch)) the transform is random and draws from a
    generator seeded by (seed..., position): the same image gets the same draw in any worker,
    in any order, after a resume.
    """

    def __init__(
        self, root: Path, paths: Sequence[str], transform: ImageTransform, tensor_jpeg: bool = False
    ) -> None:
        self.root = root
        self.paths = list(paths)
        self.transform = transform
        self.tensor_jpeg = tensor_jpeg
        self.seed: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        why = None
        try:
            data = read_file(self.root / self.paths[i])
            if self.tensor_jpeg:
                why = fallback_reason(data)
                if why is None:
                    import torch

                    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                    return i, None, None, content_hash(data), raw, None
            im = decode_image(data, draft_size=self.transform.draft_size)
            if self.seed is not None:
                x = self.transform(im, np.random.default_rng((*self.seed, i)))  # type: ignore[call-arg]
            else:
                x = self.transform(im)
            return i, x, None, content_hash(data), None, why
        except ImageDecodeError as e:
            return i, None, str(e), None, None, None
        except (OSError, ValueError, MemoryError) as e:  # anything else one image can raise
            return i, None, f"{type(e).__name__}: {e}", None, None, None


def _collate(batch):
    """(positions, uint8 (B, 3, H, W) | None, [(position, error)], hashes of the positions,
    JPEG positions, JPEG bytes, JPEG hashes, [why decoded here instead of on the device])."""
    import torch

    ok = [(i, t, h) for i, t, _, h, _, _ in batch if t is not None]
    jpegs = [(i, raw, h) for i, _, _, h, raw, _ in batch if raw is not None]
    failed = [(i, e) for i, _, e, _, _, _ in batch if e is not None]
    x = torch.stack([t for _, t, _ in ok]) if ok else None
    return (
        [i for i, _, _ in ok],
        x,
        failed,
        [h for _, _, h in ok],
        [i for i, _, _ in jpegs],
        [r for _, r, _ in jpegs],
        [h for _, _, h in jpegs],
        [w for *_, w in batch if w is not None],
    )


@dataclass
class _Plan:
    """How each manifest entry is served: from the old store, the journal, or the model."""

    from_store: dict[int, int]  # manifest position -> old store row
    from_journal: dict[int, int]  # manifest position -> journal row
    failed_known: dict[int, str]  # manifest position -> recorded error (file unchanged)
    todo: list[int]  # manifest positions to compute
    removed: int  # rows of the old store whose file is gone from the folder
    hashes: dict[int, str] = field(default_factory=dict)  # manifest position -> content hash
    touched: int = 0  # reused rows whose file has a new mtime but the same bytes


class _Hasher:
    """Content hashes of files under a root, each file read at most once per run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.memo: dict[str, str | None] = {}

    def __call__(self, path: str) -> str | None:
        if path not in self.memo:
            try:
                self.memo[path] = content_hash(read_file(self.root / path))
            except ImageDecodeError:
                self.memo[path] = None  # unreadable now: extract it again, to record why
        return self.memo[path]


def _plan(
    manifest: Manifest,
    old: FeatureStore | None,
    journal_rows,
    all_paths: set[str],
    hasher: _Hasher,
    check_content: bool = False,
    progress: bool = False,
    retry_unreadable: bool = True,
) -> _Plan:
    """Which rows can be reused. A row is reused when its file has the size and mtime it had
    when extracted; with ``check_content`` also the same content hash. A file with the same
    size but a new mtime is re-hashed, and reused when its bytes are unchanged (``touch``, a
    copy that did not keep times). A recorded failure is kept while its file is unchanged,
    unless the file could not be read at all (``retry_unreadable``: try again)."""
    from tqdm.auto import tqdm

    old_index: dict[str, int] = {}
    old_failed: dict[str, tuple[str, int, int]] = {}
    old_hashes = old.hashes if old is not None else None
    if old is not None:
        old_index = {p: i for i, p in enumerate(old.paths.tolist())}
        r = old.rows()
        old_failed = {
            p: (e, int(s), int(m))
            for p, e, s, m in zip(
                r.failed_paths, r.failed_errors, r.failed_sizes, r.failed_mtimes_ns, strict=False
            )
        }
    plan = _Plan({}, {}, {}, [], 0)

    def same(path: str, size: int, mtime: int, stored_hash: str, e, pos: int) -> bool:
        if size != e.size:
            return False
        if mtime == e.mtime_ns and not check_content:
            plan.hashes[pos] = stored_hash
            return True
        if not stored_hash or hasher(path) != stored_hash:
            return False
        plan.hashes[pos] = stored_hash
        plan.touched += mtime != e.mtime_ns
        return True

    entries = tqdm(
        manifest.entries,
        desc="check content",
        unit="file",
        disable=not (progress and check_content),
        leave=False,
    )
    for pos, e in enumerate(entries):
        i = old_index.get(e.path)
        if i is not None and same(
            e.path, int(old.sizes[i]), int(old.mtimes_ns[i]), old_hashes[i], e, pos
        ):  # type: ignore[union-attr, index]
            plan.from_store[pos] = i
            continue
        j = journal_rows.index.get(e.path)
        if j is not None and same(
            e.path,
            journal_rows.sizes[e.path],
            journal_rows.mtimes_ns[e.path],
            journal_rows.hashes[e.path],
            e,
            pos,
        ):
            plan.from_journal[pos] = j
            continue
        for failed in (journal_rows.failed, old_failed):
            rec = failed.get(e.path)
            if (
                rec is not None
                and rec[1] == e.size
                and rec[2] == e.mtime_ns
                and not (retry_unreadable and rec[0].startswith(UNREADABLE))
            ):
                plan.failed_known[pos] = rec[0]
                break
        else:
            plan.todo.append(pos)
    plan.removed = sum(1 for p in old_index if p not in all_paths)  # gone from the folder
    return plan


def _unchanged(old: FeatureStore, manifest: Manifest, plan: _Plan, attrs: dict[str, Any]) -> bool:
    """True when rewriting the store would produce the same rows and labels."""
    if plan.todo or plan.from_journal or plan.removed or plan.touched:
        return False
    if old.classes != manifest.classes or len(plan.failed_known) != len(old.failed):
        return False
    if old.metadata.get("split_config") != attrs["split_config"]:
        return False
    ok = [e for pos, e in enumerate(manifest.entries) if pos in plan.from_store]
    if len(ok) != len(old):
        return False
    labels = np.fromiter((e.label for e in ok), dtype=np.int32, count=len(ok))
    splits = np.asarray([e.split for e in ok], dtype=object)
    return bool(np.array_equal(labels, old.labels) and np.array_equal(splits, old.splits))


def extract(
    root: str | os.PathLike[str],
    backbone: str | BackboneSpec = DEFAULT_BACKBONE,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str = "auto",
    runtime: str = "auto",
    image_size: int | None = None,
    strict: bool = False,
    split: SplitConfig | None = None,
    labels: str | os.PathLike[str] | None = None,
    dtype: str = "float16",
    progress: bool = False,
    lock_timeout: float = -1,
    allow_download: bool | None = None,
    shard: tuple[int, int] | None = None,
    follow_links: str = "inside",
    check_content: bool = False,
    precision: str = "auto",
    compile: bool = False,
    decoder: str = "auto",
) -> FeatureStore:
    """Extract pooled features of every image under ``root`` into its store; return the store.

    Reruns are incremental: unchanged files are reused without building the model, new or
    changed files are computed, removed files drop out. An interrupted run resumes from its
    journal. Corrupt images are recorded in ``/failed`` and skipped (``strict=True``: raise).
    The returned store's ``last_extraction`` holds an :class:`ExtractStats`.

    A file counts as unchanged when its size and mtime are those recorded; ``check_content``
    also re-hashes every file (it reads them all) and re-extracts those whose bytes changed.
    ``follow_links``: ``"inside"`` (symbolic links are followed when they resolve inside
    ``root``), ``"all"`` or ``"none"``. ``lock_timeout``: seconds to wait for another process
    writing the same store (< 0: as long as it takes; 0: fail at once).

    On a GPU (:mod:`embedtl.runtime`, :mod:`embedtl.tensor_decode`): ``precision`` ``auto``
    (float16 autocast on CUDA, float32 elsewhere), ``fp32``, ``fp16`` or ``bf16`` -- a reduced
    precision is checked against float32 on the first batch and dropped, visibly, when a row's
    cosine falls under 0.999; ``compile`` runs the model through ``torch.compile``; ``decoder``
    ``auto`` (nvJPEG on CUDA), ``pil`` or ``torchvision``. Without ``batch_size`` a large CUDA
    job tunes it, and out-of-memory halves it instead of failing.

    ``shard=(i, n)`` extracts every n-th image of the sorted folder, starting at the i-th, into
    a shard store beside the store; :func:`embedtl.cache.merge_stores` joins the shards into the
    store a single process would have written.
    """
    t_start = time.perf_counter()
    if batch_size is not None and batch_size < 1:
        raise EmbedTLError(f"--batch-size must be >= 1, got {batch_size}")
    if dtype not in _DTYPES:
        raise EmbedTLError(f"unknown feature dtype {dtype!r}: use float16 or float32")
    if workers is not None and workers < 0:
        raise EmbedTLError(f"--workers must be >= 0, got {workers}")
    if runtime not in RUNTIMES:
        raise EmbedTLError(f"unknown runtime {runtime!r}: use {', '.join(RUNTIMES)}")
    if decoder not in DECODERS:
        raise EmbedTLError(f"unknown decoder {decoder!r}: use {', '.join(DECODERS)}")
    split = split or SplitConfig()
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    spec = get_backbone(backbone, image_size=image_size)
    fingerprint = spec.fingerprint()
    manifest = scan(root, split, labels, follow_links)
    if manifest.n_skipped:
        log.info(
            "%d files are not images (by extension), hidden or links not "
            "followed: skipped (e.g. %s)",
            manifest.n_skipped,
            ", ".join(manifest.skipped_examples),
        )
    path = full_path = store_path(cache_root, manifest.root, spec.name, fingerprint)
    all_paths = {e.path for e in manifest.entries}
    if shard is not None:
        manifest, path = _shard(manifest, path, shard)

    attrs = {
        "backbone": spec.to_dict(),
        "fingerprint": fingerprint,
        "root": str(manifest.root),
        "classes": manifest.classes,
        "layout": manifest.layout,
        "split_config": split.to_dict(),
        "versions": library_versions(),
        "shard": f"{shard[0]}/{shard[1]}" if shard is not None else None,
    }

    with store_lock(path, timeout=lock_timeout):
        remove_stale_temporaries(path)
        old = _open_existing(path, fingerprint, dtype)
        if old is None and shard is not None:
            old = _open_existing(full_path, fingerprint, dtype)  # a shard reuses merged rows
        if old is not None:
            attrs["created"] = old.metadata.get("created")
        dim = old.dim if old is not None else spec.dim  # spec.dim builds a meta-device model
        journal = Journal(path, fingerprint, dim, dtype)
        journal_rows = journal.load()
        hasher = _Hasher(manifest.root)
        plan = _plan(manifest, old, journal_rows, all_paths, hasher, check_content, progress)
        if strict and plan.failed_known:
            pos = min(plan.failed_known)
            raise ImageDecodeError(
                _strict_message(manifest, pos, plan.failed_known[pos], len(plan.failed_known))
            )

        if old is not None and _unchanged(old, manifest, plan, attrs):
            journal.clear()  # left by a run killed after it replaced the store
            stats = ExtractStats(
                store=str(path),
                n_images=len(old),
                n_failed=len(old.failed),
                n_skipped=manifest.n_skipped,
                dim=dim,
                backbone=spec.name,
                fingerprint=fingerprint,
                cached=len(old),
                extracted=0,
                removed=0,
                seconds=time.perf_counter() - t_start,
                images_per_second=0.0,
                runtime=None,
                runtime_reason="cache hit: every file unchanged, no model built",
                device=None,
                model_built=False,
                failed=[{"path": p, "error": e} for p, e in old.failed],
                content_checked=check_content,
            )
            old.last_extraction = stats
            return old

        stages = {"decode": 0.0, "h2d": 0.0, "model": 0.0, "write": 0.0}
        n_resumed = len(plan.from_journal)
        eng: _Engine | None = None
        run: dict[str, Any] = {}  # how the model ran (eng.summary()), when it ran
        reason = "no new or changed files: store rewritten without the model"
        t_compute = 0.0
        if plan.todo:
            t0 = time.perf_counter()
            eng = _engine(
                spec,
                cache_root,
                device,
                runtime,
                len(plan.todo),
                batch_size,
                workers,
                allow_download,
                precision,
                compile,
                decoder,
            )
            _run_model(eng, spec, manifest, plan.todo, journal, strict, progress, stages)
            t_compute = time.perf_counter() - t0
            reason, run = eng.final_reason(), eng.summary()
            journal_rows = journal.load()
            plan = _plan(
                manifest,
                old,
                journal_rows,
                all_paths,
                hasher,
                check_content,
                retry_unreadable=False,
            )
            if plan.todo:
                raise StoreError(
                    f"internal error: {len(plan.todo)} files neither extracted nor failed"
                )

        t_w = time.perf_counter()
        if eng is not None:
            n_new = len(plan.from_journal) - n_resumed
            attrs.update(
                runtime=eng.runtime,
                device=eng.device,
                amp=run["precision"] if run["precision"] != "fp32" else "none",
                decoder=eng.decoder_name,
                # the last run that computed features: how fast and how this backbone ran here
                extraction={
                    "images": n_new,
                    "seconds": round(t_compute, 3),
                    "images_per_second": round(n_new / t_compute, 2) if t_compute > 0 else None,
                    **run,
                },
            )
        elif old is not None:  # rows and labels rewritten, features as the last run made them
            attrs.update(
                {
                    k: old.metadata.get(k)
                    for k in ("runtime", "device", "amp", "decoder", "extraction")
                }
            )
        rows = _fold(manifest, plan, old, journal_rows, path, dim, dtype, attrs)
        pause_point("store-replaced")
        journal.clear()
        stages["write"] += time.perf_counter() - t_w

    store = FeatureStore(path)
    n_extracted = len(plan.from_journal) - n_resumed
    stats = ExtractStats(
        store=str(path),
        n_images=len(rows.paths),
        n_failed=len(rows.failed_paths),
        n_skipped=manifest.n_skipped,
        dim=dim,
        backbone=spec.name,
        fingerprint=fingerprint,
        cached=len(plan.from_store) + n_resumed,
        extracted=n_extracted,
        removed=plan.removed,
        seconds=time.perf_counter() - t_start,
        images_per_second=n_extracted / t_compute if t_compute > 0 else 0.0,
        runtime=run.get("runtime"),
        runtime_reason=reason,
        device=run.get("device"),
        model_built=eng is not None,
        batch_size=run.get("batch_size"),
        workers=eng.workers if eng is not None else None,
        stages={k: round(v, 4) for k, v in stages.items()},
        failed=[
            {"path": p, "error": e}
            for p, e in zip(rows.failed_paths, rows.failed_errors, strict=True)
        ],
        touched=plan.touched,
        content_checked=check_content,
        precision=run.get("precision"),
        decoder=run.get("decoder"),
        decode_fallback=run.get("decode_fallback", {}),
        autotune=run.get("autotune"),
    )
    store.last_extraction = stats
    return store


def _strict_message(manifest: Manifest, pos: int, err: str, n: int) -> str:
    more = f" (and {n - 1} more)" if n > 1 else ""
    return (
        "cannot read "
        f"{manifest.root / manifest.entries[pos].path}{more}: {err} "
        "(--strict; without it unreadable images are recorded and skipped)"
    )


def extract_distributed(root: str | os.PathLike[str], **kw: Any) -> FeatureStore | None:
    """:func:`extract` under torchrun: each rank extracts its shard (on its own GPU when there
    are GPUs), then rank 0 merges the shards into the single-process store and returns it; the
    other ranks return None. A rerun reuses the merged store's rows and builds no model."""
    import torch

    from .cache import merge_stores, remove_shards

    rank, world = torchrun_rank() or (0, 1)
    if kw.get("device", "auto") in ("auto", "cuda") and torch.cuda.is_available():
        kw["device"] = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    error: Exception | None = None
    try:
        store = extract(root, shard=(rank, world), **kw)
        store.close()
        mine = (str(store.path), store.last_extraction.to_dict(), None)
    except Exception as e:  # meet the other ranks anyway, so that none of them waits forever
        error, mine = e, (None, None, " ".join(str(e).split()))
    with process_group() as gather:  # a shard may take hours: the gather waits for the slowest
        everyone = gather(mine)
    if error is not None:
        raise error
    failed = [f"rank {r}: {m[2]}" for r, m in enumerate(everyone) if m[2] is not None]
    if failed:
        raise EmbedTLError(
            f"{len(failed)} of {world} ranks failed ({'; '.join(failed)}); the other shards "
            "are kept: rerun the same command to resume"
        )
    if rank != 0:
        return None
    t = time.perf_counter()
    merged = merge_stores([p for p, _, _ in everyone])
    remove_shards([p for p, _, _ in everyone])  # the merged store now holds these rows
    merged.last_extraction = _combine([s for _, s, _ in everyone], merged)
    merged.last_extraction.stages["merge"] = round(time.perf_counter() - t, 4)
    return merged


def _combine(parts: list[dict[str, Any]], merged: FeatureStore) -> ExtractStats:
    first = parts[0]
    ran = [p for p in parts if p["model_built"]]
    return ExtractStats(
        store=str(merged.path),
        n_images=len(merged),
        n_failed=len(merged.failed),
        n_skipped=sum(p["n_skipped"] for p in parts),
        dim=merged.dim,
        backbone=first["backbone"],
        fingerprint=merged.fingerprint,
        cached=sum(p["cached"] for p in parts),
        extracted=sum(p["extracted"] for p in parts),
        removed=first["removed"],
        seconds=max(p["seconds"] for p in parts),
        images_per_second=sum(p["images_per_second"] for p in parts),
        runtime=ran[0]["runtime"] if ran else None,
        runtime_reason=f"{len(parts)} torchrun ranks; " + first["runtime_reason"],
        device=",".join(sorted({str(p["device"]) for p in ran})) or None,
        model_built=bool(ran),
        batch_size=first["batch_size"],
        workers=first["workers"],
        stages={k: max(p["stages"].get(k, 0.0) for p in parts) for k in first["stages"]},
        precision=ran[0]["precision"] if ran else None,
        decoder=ran[0]["decoder"] if ran else None,
        decode_fallback=dict(sum((Counter(p["decode_fallback"]) for p in parts), Counter())),
        failed=[{"path": p, "error": e} for p, e in merged.failed],
        ranks=[
            {
                k: p[k]
                for k in (
                    "n_images",
                    "n_failed",
                    "extracted",
                    "cached",
                    "seconds",
                    "images_per_second",
                    "runtime",
                    "device",
                )
            }
            | {"rank": r}
            for r, p in enumerate(parts)
        ],
    )


def shard_bounds(n_items: int, i: int, n: int) -> tuple[int, int]:
    """[lo, hi) of the i-th of n contiguous, near-equal slices of n_items sorted items: the
    shards of a sorted folder, in order, concatenate to the whole (merging is appending)."""
    return i * n_items // n, (i + 1) * n_items // n


def _shard(manifest: Manifest, path: Path, shard: tuple[int, int]) -> tuple[Manifest, Path]:
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise EmbedTLError(f"--shard must be I/N with 0 <= I < N, got {i}/{n}")
    lo, hi = shard_bounds(len(manifest.entries), i, n)
    part = Manifest(
        root=manifest.root,
        entries=manifest.entries[lo:hi],
        classes=manifest.classes,
        layout=manifest.layout,
        n_skipped=manifest.n_skipped if i == 0 else 0,
    )
    return part, path.with_name(f"{path.stem}.shard-{i}-of-{n}.h5")


def _open_existing(path: Path, fingerprint: str, dtype: str) -> FeatureStore | None:
    """The current store, if it can be reused; anything else is rebuilt (with a warning)."""
    if not path.exists():
        return None
    try:
        old = FeatureStore(path)
    except StoreError as e:
        log.warning("rebuilding %s: %s", path, e)
        return None
    if old.fingerprint != fingerprint:
        log.warning("rebuilding %s: it holds features of another backbone fingerprint", path)
        return None
    if old.dtype != dtype:
        log.warning("rebuilding %s: stored as %s, %s asked for", path, old.dtype, dtype)
        return None
    return old


@dataclass
class _Engine:
    model: Any  # a runtime from embedtl.runtime
    device: str
    runtime: str
    reason: str
    batch_size: int
    workers: int
    decoder: TensorDecoder | None  # JPEGs decoded on the model's device; None: PIL in the workers
    decoder_reason: str
    autotune: dict[int, float] | None = None  # batch size -> images/s, when it was tuned
    decode_fallback: Counter = field(default_factory=Counter)  # why images went to PIL instead

    @property
    def decoder_name(self) -> str:
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
#: this many images; smaller ones run at :data:`_CUDA_BATCH`.
_AUTOTUNE_MIN_IMAGES = 2048


def _pick_decoder(
    decoder: str, device: str, spec: BackboneSpec
) -> tuple[TensorDecoder | None, str]:
    """The tensor decoder for ``--decoder`` (None: PIL in the workers) and why."""
    if decoder not in DECODERS:
        raise EmbedTLError(f"unknown decoder {decoder!r}: use {', '.join(DECODERS)}")
    cuda = device.startswith("cuda")
    on = device if cuda else "cpu"  # torchvision decodes on CUDA or the CPU (not MPS)
    if decoder == "pil" or (decoder == "auto" and not cuda):
        return None, "PIL in the loader workers" + (" (asked for)" if decoder == "pil" else "")
    err = probe(on)
    if err is not None:
        if decoder == "torchvision":
            raise EmbedTLError(f"--decoder torchvision does not work on {on}: {err}")
        log.warning(
            "JPEG decoding on the GPU is unavailable (%s): decoding with PIL on the CPU", err
        )
        return None, f"PIL in the loader workers (nvJPEG unavailable: {err})"
    return TensorDecoder(spec.preprocess, on), "JPEGs on " + (
        "the GPU (nvJPEG)" if cuda else "the CPU (libjpeg-turbo, asked for)"
    )


def _engine(
    spec: BackboneSpec,
    cache_root: Path,
    device: str,
    runtime: str,
    n_images: int,
    batch_size: int | None,
    workers: int | None,
    allow_download: bool | None,
    precision: str = "auto",
    compile: bool = False,
    decoder: str = "auto",
) -> _Engine:
    """Device, runtime (and why), decoder, batch size and workers for ``n_images``; the model
    built. On CUDA without ``batch_size`` the batch is tuned for large jobs."""
    run_device = resolve_device(device)
    onnx_path = onnx_model_path(cache_root, spec.name, spec.fingerprint())
    run_runtime, reason = resolve_runtime(
        runtime, run_device, n_images, onnx_path, precision, compile
    )
    tensor_decoder, decoder_reason = _pick_decoder(decoder, run_device, spec)
    model, fallback = load_runtime(
        run_runtime, spec, run_device, onnx_path, allow_download, precision, compile
    )
    if fallback is not None:
        run_runtime, reason = model.name, fallback
    tuned = None
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
        workers=default_workers(run_device) if workers is None else workers,
        decoder=tensor_decoder,
        decoder_reason=decoder_reason,
        autotune=tuned,
    )


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


#: The GPU counts as starved when it is idle for more than this share of the streaming time.
_IDLE_WARNING = 0.3


def idle_warning(wall: float, busy: float, workers: int, decoder: str) -> str | None:
    """The warning when the GPU spent more than :data:`_IDLE_WARNING` of ``wall`` seconds
    waiting on the loader (``busy``: seconds it computed), with what to change."""
    if wall < 1.0 or busy >= (1 - _IDLE_WARNING) * wall:
        return None
    hint = (
        "use --decoder torchvision (JPEGs decoded on the GPU) or more --workers"
        if decoder == DECODER
        else "use more --workers (files are read and non-JPEGs decoded there)"
    )
    return (
        f"the GPU was idle {100 * (1 - busy / wall):.0f}% of the "
        f"extraction, waiting for images from {workers} loader "
        f"workers: {hint}"
    )


def _stream(
    eng: _Engine,
    spec: BackboneSpec,
    root: Path,
    paths: Sequence[str],
    progress: bool,
    stages: dict[str, float],
    desc: str,
) -> Iterator[tuple[list[int], np.ndarray | None, list[tuple[int, str]], list[str]]]:
    """The engine's inner loop: decode ``paths`` (under ``root``) in batches and run the model.

    Yields (positions, features (B, D) float32 | None, [(position, error)], content hashes of
    the positions) per batch, in order. On CUDA a batch's result is collected after the next
    batch is launched, so the GPU has work queued while the CPU fetches; ``stages`` accumulates
    decode, h2d and model seconds (CUDA: from events) and, on CUDA, idle seconds: the streaming
    time not spent in h2d, model or on-device decoding.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    model = eng.model
    transform = ImageTransform(spec.preprocess)
    dataset = _Images(root, paths, transform, tensor_jpeg=eng.decoder is not None)
    loader = DataLoader(
        dataset,
        batch_size=eng.batch_size,
        shuffle=False,
        num_workers=eng.workers,
        collate_fn=_collate,
        pin_memory=eng.device.startswith("cuda"),
        prefetch_factor=4 if eng.workers > 0 else None,
        persistent_workers=False,
    )
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False)
    busy = 0.0

    def collect(idx, job, failed, hashes):
        nonlocal busy
        feats = None
        if job is not None:
            feats, times = job.result()
            for k, v in times.items():
                stages[k] += v
                busy += v
        bar.update(len(idx) + len(failed))
        return idx, feats, failed, hashes

    t_start = time.perf_counter()
    in_flight = None
    try:
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                idx, x, failed, hashes, jpeg_idx, jpegs, jpeg_hashes, why = next(it)
            except StopIteration:
                break
            eng.decode_fallback.update(why)
            if jpegs:
                t1 = time.perf_counter()
                x = _decode_on_device(
                    eng, transform, x, idx, failed, hashes, jpeg_idx, jpegs, jpeg_hashes
                )
                busy += time.perf_counter() - t1  # the GPU decodes (nvJPEG returns when done)
            stages["decode"] += time.perf_counter() - t0
            job = model.submit(x) if x is not None else None
            if in_flight is not None:
                yield collect(*in_flight)
                in_flight = None
            if job is None or isinstance(job, Finished):
                yield collect(idx, job, failed, hashes)
            else:
                in_flight = (idx, job, failed, hashes)
        if in_flight is not None:
            yield collect(*in_flight)
    finally:
        bar.close()
    if eng.device.startswith("cuda"):
        wall = time.perf_counter() - t_start
        stages["idle"] = stages.get("idle", 0.0) + max(0.0, wall - busy)
        warning = idle_warning(wall, busy, eng.workers, eng.decoder_name)
        if warning:
            log.warning("%s", warning)


def _decode_on_device(
    eng: _Engine, transform, x, idx, failed, hashes, jpeg_idx, jpegs, jpeg_hashes
):
    """Decode a batch's JPEG bytes with the tensor decoder and append them to the batch (``idx``,
    ``hashes`` and ``failed`` are extended in place); a JPEG it fails on is decoded with PIL."""
    import torch

    assert eng.decoder is not None
    out, errors = eng.decoder(jpegs)
    keep = []
    for pos, t, err, h, raw in zip(jpeg_idx, out, errors, jpeg_hashes, jpegs, strict=True):
        if t is None:
            eng.decode_fallback["tensor decoder failed"] += 1
            log.info(
                "%s could not decode image %d (%s): decoding it with PIL",
                eng.decoder.name,
                pos,
                err,
            )
            try:
                t = transform(decode_image(raw.numpy().tobytes(), transform.draft_size))
            except ImageDecodeError as e:
                failed.append((pos, str(e)))
                continue
            t = t.to(eng.decoder.device)
        keep.append((pos, t, h))
    if not keep:
        return x
    idx.extend(p for p, _, _ in keep)
    hashes.extend(h for _, _, h in keep)
    on_device = torch.stack([t for _, t, _ in keep])
    if x is None:
        return on_device
    return torch.cat([x.to(on_device.device, non_blocking=True), on_device])


class _Writer:
    """Journal appends on a background thread, so that the model never waits on the disk.
    At most ``depth`` appends wait in the queue (bounded memory); a write error is raised in the
    caller at its next :meth:`put`, :meth:`check` or :meth:`close`."""

    def __init__(self, journal: Journal, stages: dict[str, float], depth: int = 2) -> None:
        import queue
        import threading

        self.journal, self.stages = journal, stages
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="embedtl-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                t = time.perf_counter()
                try:
                    self.journal.append(*item)
                except BaseException as e:  # handed to the caller
                    self.error = e
                self.stages["write"] += time.perf_counter() - t

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, item: tuple) -> None:
        self.check()
        self.queue.put(item)

    def close(self) -> None:
        """Wait for every queued append; raise the first write error."""
        self.queue.put(None)
        self.thread.join()
        self.check()


def _run_model(
    eng: _Engine,
    spec: BackboneSpec,
    manifest: Manifest,
    todo: list[int],
    journal: Journal,
    strict: bool,
    progress: bool,
    stages: dict[str, float],
) -> None:
    """Compute features of the ``todo`` manifest positions; every finished row goes to the
    journal, written on a background thread."""
    entries = [manifest.entries[i] for i in todo]
    pending_feats: list[np.ndarray] = []
    pending_rows: list[int] = []
    pending_hashes: list[str] = []
    pending_failed: list[tuple[str, str, int, int]] = []
    last_flush = time.perf_counter()
    writer = _Writer(journal, stages)

    def flush() -> None:
        nonlocal last_flush
        if pending_rows or pending_failed:
            feats = (
                np.concatenate(pending_feats)
                if pending_feats
                else np.zeros((0, spec.dim), np.float32)
            )
            es = [entries[i] for i in pending_rows]
            writer.put(
                (
                    feats,
                    [e.path for e in es],
                    [e.size for e in es],
                    [e.mtime_ns for e in es],
                    list(pending_hashes),
                    list(pending_failed),
                )
            )
            pending_feats.clear()
            pending_rows.clear()
            pending_hashes.clear()
            pending_failed.clear()
        last_flush = time.perf_counter()

    batches = _stream(
        eng,
        spec,
        manifest.root,
        [e.path for e in entries],
        progress,
        stages,
        f"extract {spec.name}",
    )
    try:
        for idx, feats, failed, hashes in batches:
            for i, err in failed:
                e = entries[i]
                if strict:
                    raise ImageDecodeError(_strict_message(manifest, todo[i], err, 1))
                log.info("failed: %s: %s", e.path, err)
                pending_failed.append((e.path, err, e.size, e.mtime_ns))
            if feats is not None:
                pending_feats.append(feats)
                pending_rows.extend(idx)
                pending_hashes.extend(hashes)
            writer.check()
            pause_point("batch")
            if (
                len(pending_rows) >= _FLUSH_ROWS
                or time.perf_counter() - last_flush > _FLUSH_SECONDS
            ):
                flush()
    finally:
        batches.close()
        try:
            flush()  # keep what was computed, even on Ctrl-C or an error
        finally:
            writer.close()


@dataclass
class Embedded:
    """Features of loose image files (not cached): what :func:`embed_files` returns."""

    paths: list[str]  # the files that decoded, in input order
    features: np.ndarray  # (N, D) float32
    failed: list[tuple[str, str]]  # (path, error) of the files that did not
    runtime: str
    runtime_reason: str
    seconds: float


def embed_files(
    files: Sequence[str | os.PathLike[str]],
    backbone: str | BackboneSpec = DEFAULT_BACKBONE,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    runtime: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    image_size: int | None = None,
    progress: bool = False,
    allow_download: bool | None = None,
    precision: str = "auto",
    compile: bool = False,
    decoder: str = "auto",
) -> Embedded:
    """Features of image files through the same engine and runtimes as :func:`extract`, without
    writing a store (for predicting and querying new images). Unreadable files are returned in
    ``failed``, not raised."""
    t0 = time.perf_counter()
    spec = get_backbone(backbone, image_size=image_size)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    paths = [str(Path(f).expanduser().resolve()) for f in files]
    eng = _engine(
        spec,
        cache_root,
        device,
        runtime,
        len(paths),
        batch_size,
        workers,
        allow_download,
        precision,
        compile,
        decoder,
    )
    stages = {"decode": 0.0, "h2d": 0.0, "model": 0.0}
    feats: list[np.ndarray] = []
    ok: list[int] = []
    failed: list[tuple[str, str]] = []
    for idx, f, bad, _ in _stream(
        eng, spec, Path("/"), paths, progress, stages, f"embed {spec.name}"
    ):
        failed.extend((paths[i], err) for i, err in bad)
        if f is not None:
            feats.append(f)
            ok.extend(idx)
    dim = feats[0].shape[1] if feats else spec.dim
    return Embedded(
        paths=[paths[i] for i in ok],
        features=np.concatenate(feats) if feats else np.zeros((0, dim), np.float32),
        failed=failed,
        runtime=eng.runtime,
        runtime_reason=eng.final_reason(),
        seconds=time.perf_counter() - t0,
    )


def _fold(
    manifest: Manifest,
    plan: _Plan,
    old: FeatureStore | None,
    journal_rows,
    path: Path,
    dim: int,
    dtype: str,
    attrs: dict[str, Any],
) -> StoreRows:
    """Write the new store: reused + new rows in sorted-path order, failures recorded."""
    ok_pos = sorted(set(plan.from_store) | set(plan.from_journal))
    es = [manifest.entries[p] for p in ok_pos]
    failed_pos = sorted(plan.failed_known)
    fes = [manifest.entries[p] for p in failed_pos]
    rows = StoreRows(
        paths=np.asarray([e.path for e in es], dtype=object),
        labels=np.asarray([e.label for e in es], dtype=np.int32),
        splits=np.asarray([e.split for e in es], dtype=object),
        sizes=np.asarray([e.size for e in es], dtype=np.int64),
        mtimes_ns=np.asarray([e.mtime_ns for e in es], dtype=np.int64),
        failed_paths=[e.path for e in fes],
        failed_errors=[plan.failed_known[p] for p in failed_pos],
        failed_sizes=np.asarray([e.size for e in fes], dtype=np.int64),
        failed_mtimes_ns=np.asarray([e.mtime_ns for e in fes], dtype=np.int64),
        hashes=np.asarray(
            [
                plan.hashes.get(p) or journal_rows.hashes.get(e.path, "")
                for p, e in zip(ok_pos, es, strict=True)
            ],
            dtype=object,
        ),
    )

    def fill(ds) -> None:
        chunk = 8192
        for start in range(0, len(ok_pos), chunk):
            part = ok_pos[start : start + chunk]
            block = np.empty((len(part), dim), dtype=dtype)
            in_store = [k for k, p in enumerate(part) if p in plan.from_store]
            if in_store:
                # both orders are sorted by path, so the rows increase: one h5py selection
                block[in_store] = old.read_rows([plan.from_store[part[k]] for k in in_store])  # type: ignore[union-attr]
            in_journal = [k for k, p in enumerate(part) if p in plan.from_journal]
            if in_journal:
                block[in_journal] = journal_rows.features[
                    [plan.from_journal[part[k]] for k in in_journal]
                ]
            ds[start : start + len(part)] = block

    write_store(path, rows, dim, dtype, fill, attrs)
    return rows
