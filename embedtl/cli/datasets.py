"""`embedtl datasets list | export NAME DIR`."""

from __future__ import annotations

import click

from ..datasets import export_dataset, list_datasets
from ._app import EmbedTLGroup
from ._options import json_option, progress_option
from ._output import emit, want_progress


@click.group("datasets", cls=EmbedTLGroup)
def datasets_group() -> None:
    """Datasets that ship inside installable packages, written out as image folders."""


@datasets_group.command("list")
@json_option
def list_cmd(as_json: bool) -> None:
    """List the packaged datasets and whether their source is installed."""
    rows = list_datasets()

    def human() -> None:
        for r in rows:
            state = "available" if r["available"] else f"missing: {r['install']}"
            click.echo(f"{r['name']:<18}{r['description']}  [{state}]")

    emit(as_json, {"datasets": rows}, human)


@datasets_group.command("export")
@click.argument("name")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--max-per-class",
    type=click.IntRange(min=1),
    default=None,
    help="At most N images per class (per split).",
)
@click.option("--classes", default=None, help="Comma-separated subset of classes.")
@progress_option
@json_option
def export_cmd(
    name: str,
    out_dir: str,
    max_per_class: int | None,
    classes: str | None,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Write dataset NAME as an image folder in OUT_DIR (files already there are kept)."""
    wanted = tuple(c.strip() for c in classes.split(",") if c.strip()) if classes else None
    summary = export_dataset(
        name, out_dir, max_per_class=max_per_class, classes=wanted, progress=want_progress(progress)
    )
    emit(
        as_json,
        summary,
        lambda: click.echo(
            f"{summary['images']} images in {summary['out']} ({summary['written']} written)"
        ),
    )
