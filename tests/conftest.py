"""Shared fixtures: tiny seeded image folders made in tmp_path, an isolated cache, no downloads."""

from __future__ import annotations

import os
import struct
import subprocess
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

#: A real architecture with explicitly random weights, at a resolution that runs in milliseconds.
TINY_BACKBONE = "efficientnet_lite0@random"
TINY_SIZE = 32
#: The stages an extraction that ran the model reports in --json (README, "How extraction works").
EXTRACT_STAGES = {
    "fingerprint",
    "scan",
    "plan",
    "startup",
    "read",
    "decode",
    "h2d",
    "model",
    "write",
    "wait",
    "stream",
    "fold",
}


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    """No test touches the user's cache or the network."""
    monkeypatch.setenv("EMBEDTL_CACHE", str(tmp_path_factory.mktemp("default-cache")))
    monkeypatch.setenv("EMBEDTL_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))


COLORS = [(220, 40, 40), (40, 180, 60), (50, 70, 220), (230, 200, 40)]


def write_image(path: Path, rgb, size=(40, 30), seed=0, fmt=None) -> Path:
    """A seeded noisy image around colour ``rgb``."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.asarray(rgb)[None, None, :] + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path, format=fmt)
    return path


def png_header_only(w: int, h: int) -> bytes:
    """A PNG declaring w x h pixels with almost no data behind it (a decompression bomb)."""

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def make_class_folder(
    root: Path, n_per_class=8, classes=("cat", "dog", "fox"), splits=None, ext=".png"
) -> Path:
    """class folders (``splits=None``) or split folders holding class folders."""
    seed = 0
    for split in splits or [None]:
        for c, name in enumerate(classes):
            for i in range(n_per_class):
                base = root / split if split else root
                write_image(
                    base / name / f"{name}_{i:03d}{ext}", COLORS[c % len(COLORS)], seed=seed
                )
                seed += 1
    return root


@pytest.fixture
def class_folder(tmp_path) -> Path:
    return make_class_folder(tmp_path / "imgs")


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def tiny():
    """kwargs for embedtl.extract with the tiny backbone."""
    return {"backbone": TINY_BACKBONE, "image_size": TINY_SIZE, "workers": 0, "batch_size": 8}


def synthetic_store(
    path: Path,
    n_per_class=(60, 60, 60),
    dim=16,
    seed=0,
    separation=4.0,
    fingerprint=None,
    classes=None,
    poison_test=False,
    splits=(0.6, 0.2, 0.2),
    dtype="float32",
):
    """A feature store of seeded Gaussian clusters (one per class), written with the store API.

    ``poison_test`` rewrites the test rows with noise and shuffled labels (same rows otherwise).
    """
    from embedtl.backbones import get_backbone
    from embedtl.cache import FeatureStore, StoreRows, write_store

    rng = np.random.default_rng(seed)
    classes = list(classes or [f"c{i}" for i in range(len(n_per_class))])
    centers = rng.normal(0, separation, (len(classes), dim))
    feats, labels, split_names = [], [], []
    for c, n in enumerate(n_per_class):
        feats.append(centers[c] + rng.normal(0, 1, (n, dim)))
        labels += [c] * n
        cut = np.cumsum([int(round(f * n)) for f in splits])
        split_names += ["train"] * cut[0] + ["val"] * (cut[1] - cut[0]) + ["test"] * (n - cut[1])
    x = np.concatenate(feats).astype(np.float32)
    y = np.asarray(labels, np.int32)
    sp = np.asarray(split_names, dtype=object)
    if poison_test:
        t = sp == "test"
        x[t] = np.random.default_rng(99).normal(0, 50, (t.sum(), dim))
        y[t] = np.random.default_rng(98).permutation(y[t])
    n = len(y)
    paths = np.asarray([f"{classes[y[i]]}/{i:05d}.png" for i in range(n)], dtype=object)
    order = np.argsort(paths.astype(str))
    x, y, sp, paths = x[order], y[order], sp[order], paths[order]
    spec = get_backbone(TINY_BACKBONE, image_size=TINY_SIZE)
    rows = StoreRows(
        paths=paths,
        labels=y,
        splits=sp,
        sizes=np.ones(n, np.int64),
        mtimes_ns=np.ones(n, np.int64),
        failed_paths=[],
        failed_errors=[],
        failed_sizes=np.zeros(0, np.int64),
        failed_mtimes_ns=np.zeros(0, np.int64),
    )

    def fill(ds):
        for i in range(0, n, 65536):  # in chunks, as extraction writes
            ds[i : i + 65536] = x[i : i + 65536]

    attrs = {
        "backbone": spec.to_dict(),
        "fingerprint": fingerprint or spec.fingerprint(),
        "root": str(path.parent / "images"),
        "classes": classes,
    }
    write_store(path, rows, dim, dtype, fill, attrs)
    return FeatureStore(path)


#: `embedtl` in a fresh interpreter (``python -c EMBEDTL_WITH_SMALL_JOURNAL ARGS...``) that
#: writes a journal segment every 4 rows, so a process stopped early has left some behind
EMBEDTL_WITH_SMALL_JOURNAL = (
    "import importlib, sys; importlib.import_module('embedtl.engine._stream')._FLUSH_ROWS = 4; "
    "from embedtl.cli import main; sys.argv[0] = 'embedtl'; main()"
)


def _default_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Paused:
    """A real `embedtl extract` process that stops at a pause point."""

    def __init__(self, cmd: list[str], point: str, where: Path) -> None:
        self.dir = where
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = point.partition("@")[0]
        env = {**os.environ, "EMBEDTL_TEST_PAUSE": point, "EMBEDTL_TEST_PAUSE_DIR": str(self.dir)}
        self.err = open(self.dir / "stderr.txt", "w+")  # noqa: SIM115
        # a shell without job control starts background jobs with SIGINT ignored, and Python
        # keeps it ignored: give the child the default, so that Ctrl-C reaches it here too
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            preexec_fn=_default_sigint,
        )

    def paused_pids(self) -> list[int]:
        return sorted(int(p.name.split(".")[-2]) for p in self.dir.glob(f"{self.name}.*.paused"))

    def wait_paused(self, count: int = 1, timeout: float = 240) -> None:
        end = time.monotonic() + timeout
        while len(self.paused_pids()) < count:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"exited {self.proc.returncode} before {self.name}: {self.stderr()}"
                )
            if time.monotonic() > end:
                self.proc.kill()
                raise AssertionError(f"never reached {self.name}")
            time.sleep(0.02)

    def resume(self) -> None:
        (self.dir / f"{self.name}.resume").touch()

    def finish(self, sig: int | None = None, timeout: float = 240) -> int:
        if sig is not None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        self.out = self.proc.stdout.read()
        return rc

    def stderr(self) -> str:
        self.err.flush()
        return (self.dir / "stderr.txt").read_text()


def reference_extraction(base: Path, **folder: Any) -> tuple[Path, list[str], np.ndarray]:
    """A class folder under ``base`` (``folder``: :func:`make_class_folder`'s arguments) and
    the store one uninterrupted single-process run makes of it (tiny backbone, inline pipeline,
    batches of 4): (root, its paths, its features), what sharded, resumed or killed runs must
    reproduce."""
    import embedtl

    root = make_class_folder(base / "imgs", **folder)
    ref = embedtl.extract(
        root,
        cache_dir=base / "reference",
        backbone=TINY_BACKBONE,
        image_size=TINY_SIZE,
        workers=0,
        batch_size=4,
    )
    return root, list(ref.paths), ref.features()


def error_shape(r, status: int) -> dict:
    """The server's error body of response ``r``: status ``status``, exactly ``{"error",
    "type"}``, the error one line without a traceback."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "type"}, body
    assert "\n" not in body["error"] and "Traceback" not in body["error"]
    return body
