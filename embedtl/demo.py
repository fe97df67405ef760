"""`embedtl demo`: the whole pipeline on the Tux Paint stamp photos (animals, food, plants,
vehicles), which ship in a Debian package: export them, extract features, fit a linear head,
compare a grid of head variants, search the train images nearest to one test image per class,
and fine-tune the backbone's last block with the head (re-extracting into a new store)."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bench import BenchResult, bench_heads, load_grid
from .cache import FeatureStore, default_cache_dir
from .datasets import export_dataset
from .engine import EngineOptions, ExtractStats, extract
from .finetune import FineTuneConfig, FineTuneResult, fine_tune
from .gallery import search_grid, search_html
from .heads import Head, HeadConfig, fit_head
from .search import open_store_index, search_store

__all__ = ["DEMO_CLASSES", "DEMO_DATASET", "DemoResult", "demo_dir", "export_demo_data", "run_demo"]

DEMO_DATASET = "tuxpaint-stamps"
DEMO_CLASSES = ("animals", "food", "plants", "vehicles")


def demo_dir(
    workdir: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Where the demo works: ``workdir``, else ``<cache>/demo``."""
    if workdir:
        return Path(workdir)
    return (Path(cache_dir) if cache_dir else default_cache_dir()) / "demo"


def export_demo_data(base: Path, progress: bool = False) -> dict[str, Any]:
    """The demo images written as an image folder under ``base`` (files already there kept)."""
    return export_dataset(
        DEMO_DATASET, base / DEMO_DATASET, classes=DEMO_CLASSES, progress=progress
    )


@dataclass
class DemoResult:
    """What :func:`run_demo` did, step by step."""

    data_dir: Path
    extraction: ExtractStats
    store: FeatureStore
    head: Head
    head_dir: Path
    bench: BenchResult
    bench_files: dict[str, str]
    index: str  # the index type searched
    search: list[dict[str, Any]]  # one record per query: a test image of each class
    same_class: int  # queries whose nearest train image has their class
    search_html: Path
    search_png: Path
    fine_tune: FineTuneResult | None
    serve: str = ""  # the `embedtl serve` command line that opens these results in a browser

    @property
    def confusion_png(self) -> Path:
        """The head's confusion matrix on the test split."""
        return self.head_dir / "test" / "confusion.png"

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` summary of ``embedtl demo``."""
        m = self.head.info["metrics"]
        return {
            "data_dir": str(self.data_dir),
            "dataset": DEMO_DATASET,
            "extract": {k: v for k, v in self.extraction.to_dict().items() if k != "failed"},
            "store": str(self.store.path),
            "head": str(self.head_dir),
            "val_accuracy": m["val_accuracy"],
            "test_accuracy": m["test_accuracy"],
            "fit_seconds": self.head.info["fit"]["seconds"],
            "confusion_png": str(self.confusion_png),
            "bench": {
                "variants": len(self.bench.variants),
                "folds": self.bench.folds,
                "best": self.bench.variants[0],
                "files": self.bench_files,
            },
            "index": self.index,
            "search_html": str(self.search_html),
            "search_png": str(self.search_png),
            "search": self.search,
            "fine_tune": self.fine_tune.to_dict() if self.fine_tune is not None else None,
            "serve": self.serve,
        }


def run_demo(
    base: Path,
    options: EngineOptions | None = None,
    fine_tune_epochs: int = 2,
    progress: bool = False,
) -> DemoResult:
    """Every step of the demo on the images :func:`export_demo_data` wrote under ``base``;
    outputs go to ``base`` too. ``fine_tune_epochs=0`` skips the fine-tune."""
    opts = options or EngineOptions()
    data_dir = base / DEMO_DATASET
    store = extract(data_dir, options=opts, progress=progress)
    head = fit_head(store, HeadConfig(kind="linear"), device=opts.device, progress=progress)
    head_dir = head.save(base / "head-linear")
    bench = bench_heads([store], load_grid("default"), device=opts.device, progress=progress)
    bench_files = bench.write(base / "bench-heads")
    # search: the train images nearest to the first test image of each class
    test = store.indices("test")
    q_rows = np.asarray(
        [
            test[store.labels[test] == c][0]
            for c in range(len(store.classes))
            if (store.labels[test] == c).any()
        ]
    )
    index = open_store_index(store)
    found = search_store(
        store,
        index,
        store.features(rows=q_rows),
        k=6,
        split="train",
        query_rows=q_rows,
        names=[str(store.root / store.paths[r]) for r in q_rows],
    )
    results = found.records(store)
    same = sum(
        store.classes[store.labels[q]] == r["neighbors"][0]["label"]
        for q, r in zip(q_rows, results, strict=True)
    )
    page = search_html(results, base / "search.html")
    grid = search_grid(results, base / "search.png")
    ft = None
    if fine_tune_epochs:
        ft = fine_tune(
            data_dir,
            head_dir,
            FineTuneConfig(epochs=fine_tune_epochs),
            opts,
            out=base / "finetuned",
            progress=progress,
        )
    return DemoResult(
        data_dir=data_dir,
        extraction=store.last_extraction,
        store=store,
        head=head,
        head_dir=head_dir,
        bench=bench,
        bench_files=bench_files,
        index=index.kind,
        search=results,
        same_class=int(same),
        search_html=page,
        search_png=grid,
        fine_tune=ft,
        serve=shlex.join(
            ["embedtl", "serve", str(data_dir), "--head", str(head_dir)]
            + (["--cache-dir", str(opts.cache_dir)] if opts.cache_dir else [])
        ),
    )
