"""Shared fixtures: tiny seeded image folders made in tmp_path, an isolated cache, no downloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

#: A real architecture with explicitly random weights, at a resolution that runs in milliseconds.
TINY_BACKBONE = "efficientnet_lite0@random"
TINY_SIZE = 32


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
