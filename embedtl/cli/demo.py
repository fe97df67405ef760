"""`embedtl demo`: the whole pipeline on the packaged demo data."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ..bench import bench_heads, config_str, load_grid
from ..cache import default_cache_dir
from ..datasets import export_dataset
from ..extract import extract
from ..finetune import FineTuneConfig, fine_tune
from ..gallery import search_grid, search_html
from ..heads import HeadConfig, fit_head
from ..search import open_store_index, search_store
from ._base import emit, json_option, progress_option, want_progress
from .extract import print_extract_summary

DEMO_DATASET = "tuxpaint-stamps"
DEMO_CLASSES = ("animals", "food", "plants", "vehicles")


@click.command("demo")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the demo images go [default: <cache>/demo].",
)
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--fine-tune-epochs",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Epochs of the fine-tune step (last:1); 0 skips it.",
)
@progress_option
@json_option
def demo_cmd(
    workdir: str | None,
    cache_dir: str | None,
    device: str,
    fine_tune_epochs: int,
    progress: bool | None,
    as_json: bool,
) -> None:
    """The whole pipeline on the Tux Paint stamp photos (animals, food, plants, vehicles):
    export them, extract features, fit a linear head, report its test accuracy, compare a grid
    of head variants (bench-heads), search the train images nearest to one test image per
    class (an HTML page and a PNG grid), and fine-tune the backbone's last block with the head
    (re-extracting into a new store)."""
    base = (
        Path(workdir)
        if workdir
        else (Path(cache_dir) if cache_dir else default_cache_dir()) / "demo"
    )
    data_dir = base / DEMO_DATASET
    exported = export_dataset(
        DEMO_DATASET, data_dir, classes=DEMO_CLASSES, progress=want_progress(progress)
    )
    if not as_json:
        click.echo(f"demo data  {exported['images']} images in {data_dir}")
    store = extract(data_dir, cache_dir=cache_dir, device=device, progress=want_progress(progress))
    stats = store.last_extraction
    head = fit_head(
        store, HeadConfig(kind="linear"), device=device, progress=want_progress(progress)
    )
    head_dir = head.save(base / "head-linear")
    m = head.info["metrics"]
    confusion = head_dir / "test" / "confusion.png"
    bench = bench_heads(
        [store], load_grid("default"), device=device, progress=want_progress(progress)
    )
    bench_files = bench.write(base / "bench-heads")
    best = bench.variants[0]
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
    page, grid = (
        search_html(results, base / "search.html"),
        search_grid(results, base / "search.png"),
    )
    ft = None
    if fine_tune_epochs:
        ft = fine_tune(
            data_dir,
            head_dir,
            FineTuneConfig(epochs=fine_tune_epochs),
            out=base / "finetuned",
            cache_dir=cache_dir,
            device=device,
            progress=want_progress(progress),
        )
    payload = {
        "data_dir": str(data_dir),
        "dataset": DEMO_DATASET,
        "extract": {k: v for k, v in stats.to_dict().items() if k != "failed"},
        "store": str(store.path),
        "head": str(head_dir),
        "val_accuracy": m["val_accuracy"],
        "test_accuracy": m["test_accuracy"],
        "fit_seconds": head.info["fit"]["seconds"],
        "confusion_png": str(confusion),
        "bench": {
            "variants": len(bench.variants),
            "folds": bench.folds,
            "best": best,
            "files": bench_files,
        },
        "index": index.kind,
        "search_html": str(page),
        "search_png": str(grid),
        "search": results,
        "fine_tune": ft.to_dict() if ft is not None else None,
    }

    def human() -> None:
        print_extract_summary(stats)
        click.echo(f"head      {head_dir} (linear, fit in {head.info['fit']['seconds']:.2f} s)")
        click.echo(
            f"accuracy  val {100 * m['val_accuracy']:.1f}%, test "
            f"{100 * m['test_accuracy']:.1f}% ({m['n']['test']} test images)"
        )
        click.echo(f"confusion {confusion}")
        sel = f"{bench.folds}-fold CV" if bench.folds else "val"
        std = (
            f" ± {100 * best['val_accuracy_std']:.1f}"
            if best["val_accuracy_std"] is not None
            else ""
        )
        test = (
            f", test {100 * best['test_accuracy']:.1f}%"
            if best["test_accuracy"] is not None
            else ""
        )
        click.echo(
            f"bench     {len(bench.variants)} head variants in "
            f"{bench.seconds:.1f} s; best on {sel}: {best['kind']} "
            f"{config_str(best['config'])}, val {100 * best['val_accuracy']:.1f}%{std}{test}"
        )
        click.echo(f"          {bench_files['csv']}, {bench_files['plot']}")
        same = sum(
            store.classes[store.labels[q]] == r["neighbors"][0]["label"]
            for q, r in zip(q_rows, results, strict=True)
        )
        click.echo(
            f"search    {len(results)} test images, nearest train image "
            f"of the same class for {same}: {page}"
        )
        if ft is not None:
            b, a = ft.before, ft.after
            click.echo(
                f"fine-tune {ft.unfreeze} ({', '.join(ft.blocks)}), "
                f"{ft.epochs} epochs in {ft.seconds['train']:.1f} s; "
                f"re-extracted in {ft.seconds['extract']:.1f} s: val "
                f"{100 * b['val_accuracy']:.1f}% -> "
                f"{100 * a['val_accuracy']:.1f}%, test "
                f"{100 * b['test_accuracy']:.1f}% -> {100 * a['test_accuracy']:.1f}%"
            )
            click.echo(f"          backbone {ft.backbone_path}; new store {ft.store}")
        click.echo(f"next      embedtl predict {head_dir} IMAGE...")

    emit(as_json, payload, human)
