"""`embedtl demo`: the whole pipeline on the packaged demo data."""

from __future__ import annotations

from pathlib import Path

import click

from ..cache import default_cache_dir
from ..datasets import export_dataset
from ..extract import extract
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
@progress_option
@json_option
def demo_cmd(
    workdir: str | None, cache_dir: str | None, device: str, progress: bool | None, as_json: bool
) -> None:
    """Export the Tux Paint stamp photos (animals, food, plants, vehicles) and extract features."""
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
    payload = {
        "data_dir": str(data_dir),
        "dataset": DEMO_DATASET,
        "extract": {k: v for k, v in stats.to_dict().items() if k != "failed"},
        "store": str(store.path),
    }
    emit(as_json, payload, lambda: print_extract_summary(stats))
