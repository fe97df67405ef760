"""`embedtl index`, `search`, `dedup`, `knn-eval`: nearest neighbours over cached features."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import DataError
from ._app import EXIT_INTERRUPTED, EXIT_PARTIAL
from ._options import (
    apply_options,
    backbone_options,
    engine_options,
    json_option,
    positive_ints,
    progress_option,
    split_options,
)
from ._output import emit, want_progress
from ._source import open_source, source_args


def index_options(f):
    """Which index a command uses, and whether it may be brought up to date."""
    from ..search import DEFAULT_TARGET_RECALL, INDEX_KINDS

    return apply_options(
        f,
        [
            click.option(
                "--index-type",
                "index_type",
                type=click.Choice(["auto", *INDEX_KINDS]),
                default="auto",
                show_default=True,
                help="auto: exact flat up to 50k rows, ivf above, ivfsq8 when raw "
                "vectors exceed the memory budget.",
            ),
            click.option(
                "--target-recall",
                type=click.FloatRange(0, 1),
                default=DEFAULT_TARGET_RECALL,
                show_default=True,
                help="recall@10 the search parameter (nprobe/efSearch) is tuned "
                "to reach when the index is built.",
            ),
            click.option(
                "--index",
                "index_file",
                type=click.Path(dir_okay=False),
                default=None,
                help="Index file [default: beside the store, <store>.h5.index].",
            ),
            click.option(
                "--no-update",
                is_flag=True,
                help="Refuse a stale or incomplete index instead of rebuilding or extending it.",
            ),
        ],
    )


def index_args(kw: dict) -> dict:
    """Pop :func:`index_options` out of a command's keyword arguments, as
    :func:`embedtl.search.open_or_build_index` takes them."""
    return {
        "kind": kw.pop("index_type"),
        "target_recall": kw.pop("target_recall"),
        "path": kw.pop("index_file"),
        "update": not kw.pop("no_update"),
    }


def _open(
    source: str,
    kw: dict,
    progress: bool,
    metric: str = "cosine",
    rebuild: bool = False,
    parts: int = 1,
):
    """(store, its index) of DATA_DIR|STORE as the index options ask; the command's backbone
    and engine options (:class:`SourceArgs`) as the third."""
    from ..search import open_or_build_index

    opts = index_args(kw)
    args = source_args(kw)
    store = open_source(source, args, progress)
    ix = open_or_build_index(
        store,
        metric=metric,
        **opts,
        rebuild=rebuild,
        parts=parts,
        progress=progress,
    )
    return store, ix, args


def _index_line(ix) -> str:
    s = ix.summary()
    r = s.get("recall_at_10")
    par = ", ".join(f"{k}={v}" for k, v in s["params"].items())
    par = f", {par}" if par else ""
    recall = f", recall@10 {r:.3f}" if r is not None else ""
    what = f"{s['type']}, {s['rows']} rows{par}{recall}"
    return f"index     {s['index']} ({what}): {ix.info.get('action')}"


@click.command("index")
@click.argument("source", metavar="DATA_DIR|STORE", type=click.Path(exists=True))
@click.option("--metric", type=click.Choice(["cosine", "l2"]), default="cosine", show_default=True)
@click.option("--rebuild", is_flag=True, help="Build from scratch even if the index is up to date.")
@click.option(
    "--parts",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Build from N contiguous parts of the rows, each added to "
    "its own copy of the trained index, then merged (under "
    "torchrun: one part per rank).",
)
@index_options
@backbone_options
@split_options
@progress_option
@json_option
def index_cmd(
    source: str, metric: str, rebuild: bool, parts: int, as_json: bool, progress: bool | None, **kw
) -> None:
    """Build (or bring up to date) the nearest-neighbour index of DATA_DIR's store or a STORE.

    The index records the store's fingerprint and rows: rows added since are appended; removed or
    changed rows, or another backbone, make it stale and it is rebuilt. The type is chosen from
    the store's size (or --index-type) and its search parameter tuned to --target-recall.
    Under torchrun (or with --parts N) it is built in parts and merged; only rank 0 prints.
    """
    store, ix, _ = _open(source, kw, want_progress(progress), metric, rebuild, parts)
    if ix is None:
        return  # a rank other than 0: its part is merged by rank 0
    payload = {
        "store": str(store.path),
        **ix.summary(),
        "action": ix.info.get("action"),
        "action_reason": ix.info.get("action_reason"),
        "tune": ix.info.get("tune"),
    }
    emit(
        as_json,
        payload,
        lambda: click.echo(
            _index_line(ix)
            + (f"\nwhy       {ix.info['reason']}" if ix.info.get("action") == "built" else "")
        ),
    )


@click.command("search")
@click.argument("source", metavar="DATA_DIR|STORE", type=click.Path(exists=True))
@click.option(
    "--query",
    "-q",
    "queries",
    multiple=True,
    required=True,
    type=click.Path(exists=True),
    help="Query image or folder of images; repeat for more. Images of "
    "the store reuse their cached features.",
)
@click.option(
    "-k",
    "--k",
    "k",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Neighbours per query.",
)
@click.option(
    "--split",
    "splits",
    multiple=True,
    type=click.Choice(["train", "val", "test"]),
    help="Only neighbours from this split (repeatable).",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    help="Only neighbours of this class (repeatable).",
)
@click.option("--exclude-self", is_flag=True, help="Never return the query image itself.")
@click.option(
    "--html",
    "html_out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write a page with each query and its neighbours as thumbnails.",
)
@click.option(
    "--grid",
    "grid_out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the same as one PNG grid [default with --html: beside it].",
)
@index_options
@backbone_options
@engine_options
@split_options
@progress_option
@json_option
def search_cmd(
    source: str,
    queries: tuple[str, ...],
    k: int,
    splits: tuple[str, ...],
    labels: tuple[str, ...],
    exclude_self: bool,
    html_out: str | None,
    grid_out: str | None,
    as_json: bool,
    progress: bool | None,
    **kw,
) -> None:
    """Find the images of DATA_DIR (or STORE) most like each --query image (cosine similarity of
    the cached embeddings); new query images run through the store's backbone."""
    from .._io import check_outputs
    from ..gallery import search_grid, search_html
    from ..search import query_vectors, search_store

    grid_name = "--grid"
    if html_out and not grid_out:
        grid_out, grid_name = str(Path(html_out).with_suffix(".png")), "the grid PNG of --html"
    check_outputs({"--html": html_out, grid_name: grid_out}, reads=[*queries, source])
    store, ix, args = _open(source, kw, want_progress(progress))
    q = query_vectors(store, queries, args.options, progress=want_progress(progress))
    if not len(q.names):
        raise DataError(
            "no query image could be read: " + "; ".join(f"{p}: {e}" for p, e in q.failed)
        )
    nb = search_store(
        store,
        ix,
        q.features,
        k,
        split=list(splits) or None,
        query_rows=q.rows,
        exclude_self=exclude_self,
        names=q.names,
        label=list(labels) or None,
    )
    results = nb.records(store)
    files = {}
    if html_out:
        files["html"] = str(search_html(results, html_out))
    if grid_out:
        files["grid"] = str(search_grid(results, grid_out))
    payload = {
        "store": str(store.path),
        "index": ix.kind,
        "metric": ix.metric,
        "k": k,
        "results": results,
        "failed": [{"path": p, "error": e} for p, e in q.failed],
        **files,
    }

    def human() -> None:
        for r in results:
            click.echo(f"{r['query']}" + (" (in the store)" if r["query_row"] is not None else ""))
            for n in r["neighbors"]:
                click.echo(
                    f"  {n['rank']:>3}  {n['score']:.4f}  "
                    f"{str(n['label'] or '-'):<14} {n['split']:<5}  {n['path']}"
                )
        for p, e in q.failed:
            click.echo(f"failed    {p}: {e}", err=True)
        for name, path in files.items():
            click.echo(f"{name:<9} {path}")

    emit(as_json, payload, human)
    if q.failed:  # some queries answered, some images unreadable: partial success
        click.get_current_context().exit(EXIT_PARTIAL)


@click.command("dedup")
@click.argument("source", metavar="DATA_DIR|STORE", type=click.Path(exists=True))
@click.option(
    "--threshold",
    type=click.FloatRange(-1, 1),
    default=None,
    help="Cosine similarity at or above which two images are duplicates [0.88].",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Report folder (duplicates.json, duplicates.html) [default: dedup-<folder>].",
)
@index_options
@backbone_options
@split_options
@progress_option
@json_option
def dedup_cmd(
    source: str,
    threshold: float | None,
    out: str | None,
    as_json: bool,
    progress: bool | None,
    **kw,
) -> None:
    """Find groups of near-duplicate images in DATA_DIR (or STORE): resized copies, re-encoded
    JPEGs, the same photo twice. Flags groups that span splits (test leakage) or whose labels
    differ, and names the largest file of each group as the one to keep."""
    from ..dedup import DEFAULT_THRESHOLD, find_duplicates, write_dedup_report

    store, ix, _ = _open(source, kw, want_progress(progress))
    rep = find_duplicates(
        store,
        DEFAULT_THRESHOLD if threshold is None else threshold,
        index=ix,
        progress=want_progress(progress),
    )
    files = write_dedup_report(rep, out)
    payload = {**rep, "report": files}

    def human() -> None:
        click.echo(
            f"{rep['n_groups']} groups of near-duplicates "
            f"({rep['n_redundant']} redundant images of "
            f"{rep['n_images']}, similarity >= {rep['threshold']})"
        )
        if rep["cross_split_groups"] or rep["label_conflicts"]:
            click.echo(
                f"warning   {rep['cross_split_groups']} groups span splits "
                f"(test leakage), {rep['label_conflicts']} have conflicting labels"
            )
        for g in rep["groups"][:10]:
            click.echo(
                f"  {len(g['members'])} images, min similarity "
                f"{g['min_similarity']:.3f}: keep {g['keep']}"
            )
        if rep["n_groups"] > 10:
            click.echo(f"  ... {rep['n_groups'] - 10} more")
        click.echo(f"report    {files['html']}")

    emit(as_json, payload, human)
    _stopped_early(rep, "dedup", f"{files['json']} holds the groups among the rows searched")


def _stopped_early(rep: dict, command: str, what: str) -> None:
    """After an interrupt that left a partial result (emitted already): say so, exit 130."""
    if rep.get("complete", True):
        return
    click.echo(f"interrupted: {what} (marked incomplete); run {command} again for all", err=True)
    click.get_current_context().exit(EXIT_INTERRUPTED)


@click.command("knn-eval")
@click.argument("source", metavar="DATA_DIR|STORE", type=click.Path(exists=True))
@click.option(
    "-k",
    "--k",
    "ks",
    default="10,20,50",
    show_default=True,
    callback=positive_ints,
    help="Comma-separated k values.",
)
@click.option(
    "--temperature", type=click.FloatRange(min=0, min_open=True), default=0.07, show_default=True
)
@click.option(
    "--max-rows",
    type=click.IntRange(min=0),
    default=None,
    help="Classify at most N random rows per split, 0 for all [all up to 50,000 train rows; "
    "20,000 above, where the neighbours come from the index].",
)
@backbone_options
@split_options
@progress_option
@json_option
def knn_eval_cmd(
    source: str,
    ks: tuple[int, ...],
    temperature: float,
    max_rows: int | None,
    as_json: bool,
    progress: bool | None,
    **kw,
) -> None:
    """How well the embeddings separate the classes, with no training: weighted kNN over the train
    rows (cosine, votes exp(s/T)), accuracy on val and test for each k."""
    from ..search import knn_eval

    store = open_source(source, source_args(kw), want_progress(progress))
    rep = knn_eval(
        store, list(ks), temperature, progress=want_progress(progress), max_rows=max_rows
    )

    def human() -> None:
        click.echo(
            f"kNN on {store.path.name} ({rep['backbone']}): {rep['bank']} "
            f"train rows, T={temperature}"
        )
        for r in rep["results"]:
            click.echo(
                f"  {r['split']:<5} k={r['k']:<3} accuracy "
                f"{100 * r['accuracy']:.2f}%  top-5 "
                f"{100 * r['top5_accuracy']:.2f}%  (n={r['n']}"
                + (f" of {r['of']}, +-{100 * r['stderr']:.2f} pt)" if r["n"] < r["of"] else ")")
            )
        if rep.get("recall_at_k") is not None:
            click.echo(
                f"  neighbours from the {rep['index']} index: recall@{rep['recall_k']} "
                f"{rep['recall_at_k']:.3f} against exact search ({rep['recall_queries']} queries)"
            )

    emit(as_json, rep, human)
    _stopped_early(rep, "knn-eval", f"accuracy over the {rep['rows_evaluated']} rows classified")
