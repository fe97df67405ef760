"""`embedtl cache ls | info | verify | gc | export`."""

from __future__ import annotations

import click

from ..cache import export_store, gc_cache, list_stores, merge_shards, open_store, verify_store
from ._app import EmbedTLGroup
from ._options import cache_dir_option, json_option, store_options
from ._output import emit
from ._source import refuse_store_options


@click.group("cache", cls=EmbedTLGroup)
def cache_group() -> None:
    """Inspect and manage the feature cache. STORE is a .h5 file or an image folder (+
    --backbone)."""


@cache_group.command("ls")
@cache_dir_option
@json_option
def ls_cmd(cache_dir: str | None, as_json: bool) -> None:
    """List the stores in the cache folder."""
    rows = list_stores(cache_dir)

    def human() -> None:
        if not rows:
            click.echo("no stores")
        for r in rows:
            if "error" in r:
                click.echo(f"{r['store']}  ERROR {r['error']}")
                continue
            gone = "" if r["root_exists"] else "  (image folder gone)"
            newer = ", ".join(s["backbone"] for s in r["superseded_by"])
            stale = f"  (superseded by fine-tuned {newer})" if newer else ""
            click.echo(
                f"{r['rows']:>8} rows  {r['bytes'] / 1e6:8.1f} MB  "
                f"{r['backbone']:<20} {r['root']}{gone}{stale}"
            )

    emit(as_json, {"stores": rows}, human)


@cache_group.command("info")
@click.argument("store")
@store_options
@click.option(
    "--failed",
    "list_failed",
    is_flag=True,
    help="List the files that could not be read, with the reason "
    "(path<TAB>reason per line; --json: failed_files).",
)
@json_option
def info_cmd(
    store: str,
    backbone: str,
    image_size: int | None,
    cache_dir: str | None,
    list_failed: bool,
    as_json: bool,
) -> None:
    """Metadata and row counts of one store."""
    refuse_store_options([store])
    s = open_store(store, backbone=backbone, cache_dir=cache_dir, image_size=image_size)
    summary = s.summary()
    summary["backbone_spec"] = s.backbone
    summary["versions"] = s.metadata.get("versions")
    if list_failed:
        summary["failed_files"] = [{"path": p, "error": e} for p, e in s.failed]
        if not as_json:
            for p, e in s.failed:
                click.echo(f"{p}\t{e}")
            return

    def human() -> None:
        for k in (
            "store",
            "root",
            "rows",
            "dim",
            "dtype",
            "backbone",
            "fingerprint",
            "runtime",
            "splits",
            "unlabelled",
            "failed",
            "updated",
        ):
            click.echo(f"{k:<12}{summary[k]}")
        for c, n in summary["per_class"].items():
            click.echo(f"  {c:<24}{n}")

    emit(as_json, summary, human)


@cache_group.command("verify")
@click.argument("store")
@store_options
@click.option("--no-files", is_flag=True, help="Do not compare rows with the image files on disk.")
@json_option
def verify_cmd(
    store: str,
    backbone: str,
    image_size: int | None,
    cache_dir: str | None,
    no_files: bool,
    as_json: bool,
) -> None:
    """Check a store against the schema and the image files; exit 1 on problems."""
    refuse_store_options([store])
    s = open_store(store, backbone=backbone, cache_dir=cache_dir, image_size=image_size)
    report = verify_store(s.path, check_files=not no_files)

    def human() -> None:
        click.echo(
            f"{report['store']}: {'ok' if report['ok'] else 'PROBLEMS'} ({report['rows']} rows)"
        )
        for p in report["problems"]:
            click.echo(f"  problem: {p}")
        if report["stale"] or report["missing"]:
            click.echo(
                f"  {len(report['stale'])} changed and "
                f"{len(report['missing'])} missing files: rerun `embedtl "
                "extract` to update"
            )

    emit(as_json, report, human)
    if not report["ok"]:
        raise click.exceptions.Exit(1)


@cache_group.command("gc")
@cache_dir_option
@click.option(
    "--older-than",
    "older_than_days",
    type=click.FloatRange(min=0),
    default=None,
    help="Also remove stores not updated for this many days.",
)
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@json_option
def gc_cmd(
    cache_dir: str | None, older_than_days: float | None, dry_run: bool, as_json: bool
) -> None:
    """Remove stores whose image folder is gone, and leftovers of killed runs."""
    r = gc_cache(cache_dir, older_than_days=older_than_days, dry_run=dry_run)

    def human() -> None:
        verb = "would remove" if dry_run else "removed"
        for p in r["removed"]:
            click.echo(f"{verb} {p}")
        click.echo(f"{verb} {len(r['removed'])} items, {r['bytes_freed'] / 1e6:.1f} MB")

    emit(as_json, r, human)


@cache_group.command("export")
@click.argument("store")
@click.argument("out", type=click.Path(dir_okay=False))
@store_options
@json_option
def export_cmd(
    store: str,
    out: str,
    backbone: str,
    image_size: int | None,
    cache_dir: str | None,
    as_json: bool,
) -> None:
    """Write features + paths + labels + splits to OUT (.npz or .parquet)."""
    from .._io import check_outputs

    refuse_store_options([store])
    s = open_store(store, backbone=backbone, cache_dir=cache_dir, image_size=image_size)
    check_outputs({"OUT": out}, reads=[s.path, store])
    r = export_store(s.path, out)
    emit(as_json, r, lambda: click.echo(f"{r['rows']} rows x {r['dim']} -> {r['out']}"))


@cache_group.command("merge")
@click.argument("shards", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="The merged store's file [default: the shards' name without .shard-I-of-N].",
)
@click.option(
    "--keep", is_flag=True, help="Keep the shard files (they are removed after a successful merge)."
)
@click.option(
    "--virtual",
    is_flag=True,
    help="Write an HDF5 virtual dataset that reads the features from "
    "the shard files (kept) instead of copying them.",
)
@click.option(
    "--partial",
    is_flag=True,
    help="Merge shards that are not all N of their --shard I/N run (the store then holds "
    "their rows only).",
)
@json_option
def merge_cmd(
    shards: tuple[str, ...],
    out: str | None,
    keep: bool,
    virtual: bool,
    partial: bool,
    as_json: bool,
) -> None:
    """Join shard stores of one folder and backbone (`extract --shard I/N`) into its store.

    Every shard of the run must be given (--partial merges fewer). The features are copied into
    one file (the shards are then removed, unless --keep), so the merged store takes incremental
    updates like any other; --virtual maps them instead."""
    r = merge_shards(shards, out, virtual=virtual, keep=keep, partial=partial).to_dict()
    emit(
        as_json,
        r,
        lambda: click.echo(f"{r['rows']} rows from {r['shards']} shards -> {r['store']}"),
    )
