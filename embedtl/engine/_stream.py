"""The engine's inner loop: images streamed through the job's model (chosen and built by
:mod:`._setup`) in batches prepared by the input pipeline (:mod:`._pipeline`), rows that are not
finite or not meaningful caught, and finished rows written to the journal on a background
thread."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .._io import pause_point
from ..backbones import BackboneSpec
from ..cache import FailedFile, Journal, JournalSegment
from ..data import DECODER, ImageTransform, Manifest
from ..errors import DegenerateFeaturesError, ImageDecodeError
from ..runtime import (
    Finished,
)
from ._pipeline import Pipeline, Prepared
from ._plan import strict_message
from ._setup import _Engine

__all__ = ["Computed", "idle_warning"]

log = logging.getLogger(__name__)

#: The journal takes a segment every this many computed rows, or this many seconds.
_FLUSH_ROWS = 4096
_FLUSH_SECONDS = 30.0


class Computed(NamedTuple):
    """One batch through the model."""

    positions: list[int]  # of the images that decoded, in the order of ``features``
    features: np.ndarray | None  # (B, D) float32, None when no image of the batch decoded
    failed: list[tuple[int, str]]  # (position, error)
    hashes: list[str]  # content hashes of ``positions``


#: The GPU counts as starved when it is idle for more than this share of the streaming time.
_IDLE_WARNING = 0.3


def idle_warning(wall: float, busy: float, workers: int, decoder: str) -> str | None:
    """The warning when the GPU spent more than :data:`_IDLE_WARNING` of ``wall`` seconds
    waiting on the input pipeline (``busy``: seconds it computed), with what to change."""
    if wall < 1.0 or busy >= (1 - _IDLE_WARNING) * wall:
        return None
    hint = (
        "use --decoder torchvision (JPEGs decoded on the GPU) or more --workers"
        if decoder == DECODER
        else "use more --workers (files are read and non-JPEGs decoded there)"
    )
    return (
        f"the GPU was idle {100 * (1 - busy / wall):.0f}% of the "
        f"extraction, waiting for images from {workers} input pipeline "
        f"threads: {hint}"
    )


def _stream(
    eng: _Engine,
    spec: BackboneSpec,
    root: Path,
    paths: Sequence[str],
    progress: bool,
    stages: dict[str, float],
    desc: str,
    spill: list[Computed] | None = None,
    sizes: Sequence[int] | None = None,
) -> Iterator[Computed]:
    """The engine's inner loop: the input pipeline (:class:`~._pipeline.Pipeline`) prepares
    batches of ``paths`` (under ``root``; ``sizes``: their sizes at the scan) in threads while
    the model runs the batch before.

    Yields a :class:`Computed` per batch, in order. On CUDA a batch's result is collected after
    the next batch is launched, so the GPU has work queued while the CPU fetches. ``stages``
    accumulates the pipeline's busy seconds (``read``, ``decode``, ``device_decode``: summed
    over its threads), the model's (``h2d``, ``model``: CUDA events on a GPU), ``wait`` (the
    seconds this loop waited for a batch: the model idle for want of images) and ``stream``
    (the loop's wall time); ``idle`` on CUDA is ``wait``. When the loop ends early (Ctrl-C,
    SIGTERM, an error, the consumer closing it), the batches still in flight are collected into
    ``spill``: what the model computed is never dropped.
    """
    from .._progress import progress_bar

    model = eng.model
    pipeline = Pipeline(
        root,
        paths,
        ImageTransform(spec.preprocess),
        eng.batch_size,
        threads=eng.workers,
        sizes=sizes,
        tensor=eng.decoder,
        split=eng.decoder is not None,
    )
    bar = progress_bar(total=len(paths), desc=desc, unit="img", progress=progress, leave=False)

    def collect(b: Prepared, job) -> Computed:
        feats = None
        if job is not None:
            feats, times = job.result()
            for k, v in times.items():
                stages[k] = stages.get(k, 0.0) + v
        bar.update(len(b.positions) + len(b.failed))
        return _finite_rows(Computed(b.positions, feats, b.failed, b.hashes))

    t_start = time.perf_counter()
    wait = 0.0
    submitted: deque[tuple[Prepared, Any]] = deque()  # batches run (or running), not yet yielded
    try:
        it = iter(pipeline)
        while True:
            t0 = time.perf_counter()
            b: Prepared | None = next(it, None)
            wait += time.perf_counter() - t0
            if b is None:
                break
            eng.decode_fallback.update(b.decoded_here)
            job = model.submit(b.images) if b.images is not None else None
            submitted.append((b, job))
            # all but a batch still running: it is collected after the next one is launched
            while len(submitted) > 1 or (job is None or isinstance(job, Finished)) and submitted:
                yield collect(*submitted.popleft())
        while submitted:
            yield collect(*submitted.popleft())
    finally:
        bar.close()
        if spill is not None:
            for done in submitted:  # ended early: what ran is kept, not computed again
                try:
                    spill.append(collect(*done))
                except Exception as e:  # noqa: BLE001 - the run's own error goes on
                    log.debug("a batch in flight is lost: %s", e)
        wall = time.perf_counter() - t_start
        for k, v in (*pipeline.stats.items(), ("wait", wait), ("stream", wall)):
            stages[k] = stages.get(k, 0.0) + v
    if eng.device.startswith("cuda"):
        stages["idle"] = stages.get("idle", 0.0) + wait
        warning = idle_warning(wall, wall - wait, eng.workers, eng.decoder_name)
        if warning:
            log.warning("%s", warning)


#: The reason of an image whose feature row is not finite.
NOT_FINITE = "the backbone's features of this image are not finite (NaN or inf)"


def _finite_rows(c: Computed) -> Computed:
    """``c`` with the images whose feature row holds NaN or inf moved to its failures."""
    if c.features is None:
        return c
    ok = np.isfinite(c.features).all(axis=1)
    if ok.all():
        return c
    keep = np.flatnonzero(ok)
    failed = c.failed + [(c.positions[i], NOT_FINITE) for i in np.flatnonzero(~ok)]
    return Computed(
        [c.positions[i] for i in keep],
        c.features[keep] if len(keep) else None,
        failed,
        [c.hashes[i] for i in keep],
    )


class _Degenerate:
    """Watches the first :data:`ROWS` images of distinct content of a run: when most of their
    feature rows are all zero, or one and the same row, the backbone does not work (random or
    broken weights, an image size it cannot take), and the run is an error, not a store of
    meaningless rows."""

    ROWS = 64

    def __init__(self, backbone: str) -> None:
        self.backbone = backbone
        self.by_row: dict[bytes, set[str]] = {}  # a row, rounded -> content hashes giving it
        self.zero: set[str] = set()
        self.seen: set[str] = set()
        self.decided = False

    @property
    def done(self) -> bool:
        """Whether the check was made, or :data:`ROWS` distinct images have been seen."""
        return self.decided or len(self.seen) >= self.ROWS

    def add(self, feats: np.ndarray, hashes: list[str]) -> None:
        """Note a batch's feature rows and their images' content hashes (an image seen already, and
        every row once :attr:`done`, is skipped)."""
        for x, h in zip(feats, hashes, strict=True):
            if self.done or h in self.seen:
                continue
            self.seen.add(h)
            scale = float(np.abs(x).max())
            if scale <= 1e-12:
                self.zero.add(h)
            key = np.round(x / max(scale, 1e-30), 3).astype(np.float32).tobytes()
            self.by_row.setdefault(key, set()).add(h)

    def check(self, final: bool = False) -> None:
        """Raise when the rows seen are degenerate (after :data:`ROWS` images, or at the end of
        a run of at least 4)."""
        n = len(self.seen)
        if self.decided or not (self.done or (final and n >= 4)):
            return
        self.decided = True
        same = max((len(v) for v in self.by_row.values()), default=0)
        if len(self.zero) > n / 2:
            what = f"all-zero features for {len(self.zero)} of"
        elif same >= 0.9 * n:
            what = f"one and the same feature row for {same} of"
        else:
            return
        raise DegenerateFeaturesError(
            f"the backbone {self.backbone} gives {what} the first {n} different images: its "
            "weights (random? damaged?) or this --image-size do not give usable features; "
            "nothing was stored"
        )


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
                    self.journal.append(item)
                except BaseException as e:  # handed to the caller
                    self.error = e
                self.stages["write"] += time.perf_counter() - t

    def check(self) -> None:
        """Raise the error of a failed append, if any."""
        if self.error is not None:
            raise self.error

    def put(self, item: JournalSegment) -> None:
        """Queue a journal segment; blocks while ``depth`` appends wait. Raises a failed
        append's error first."""
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
    pending_failed: list[FailedFile] = []
    last_flush = time.perf_counter()
    writer = _Writer(journal, stages)
    degenerate = _Degenerate(spec.name)
    useless = False

    def flush() -> None:
        nonlocal last_flush
        if pending_rows or pending_failed:
            feats = (
                np.concatenate(pending_feats)
                if pending_feats
                else np.zeros((0, journal.dim), np.float32)
            )
            es = [entries[i] for i in pending_rows]
            writer.put(
                JournalSegment(
                    features=feats,
                    paths=[e.path for e in es],
                    sizes=[e.size for e in es],
                    mtimes_ns=[e.mtime_ns for e in es],
                    hashes=list(pending_hashes),
                    failed=list(pending_failed),
                )
            )
            for pending in (pending_feats, pending_rows, pending_hashes, pending_failed):
                pending.clear()
        last_flush = time.perf_counter()

    def take(c: Computed, strict: bool) -> None:
        for i, err in c.failed:
            e = entries[i]
            if strict:
                raise ImageDecodeError(strict_message(manifest, todo[i], err, 1))
            log.info("failed: %s: %s", e.path, err)
            pending_failed.append(
                FailedFile(path=e.path, error=err, size=e.size, mtime_ns=e.mtime_ns)
            )
        if c.features is not None:
            pending_feats.append(c.features)
            pending_rows.extend(c.positions)
            pending_hashes.extend(c.hashes)

    spill: list[Computed] = []  # batches still in flight when the loop ended early
    batches = _stream(
        eng,
        spec,
        manifest.root,
        [e.path for e in entries],
        progress,
        stages,
        f"extract {spec.name}",
        spill,
        [e.size for e in entries],
    )
    try:
        for c in batches:
            take(c, strict)
            if c.features is not None and not degenerate.done:
                degenerate.add(c.features, c.hashes)
                degenerate.check()
            writer.check()
            pause_point("batch")
            if (
                len(pending_rows) >= _FLUSH_ROWS
                or time.perf_counter() - last_flush > _FLUSH_SECONDS
            ):
                flush()
        degenerate.check(final=True)
    except DegenerateFeaturesError:
        useless = True  # no row of this backbone is kept: the journal goes, pending rows too
        raise
    finally:
        batches.close()
        try:
            if not useless:
                for c in spill:  # computed before Ctrl-C or the error: kept too
                    take(c, strict=False)
                flush()  # keep what was computed, even on Ctrl-C or an error
        finally:
            writer.close()
            if useless:
                journal.clear()
