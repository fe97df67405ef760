"""`embedtl audit`: likely label errors, outliers and leaks of DATA_DIR, from its store."""

from __future__ import annotations

import click

from ._options import backbone_options, json_option, progress_option, split_options
from ._output import emit, want_progress
from ._source import open_source, source_args


@click.command("audit")
@click.argument("source", metavar="DATA_DIR|STORE", type=click.Path(exists=True))
@click.option(
    "--folds",
    type=click.IntRange(min=2),
    default=5,
    show_default=True,
    help="Stratified folds of the out-of-fold probabilities.",
)
@click.option(
    "--head",
    "kind",
    type=click.Choice(["linear", "mlp", "logreg", "knn"]),
    default="logreg",
    show_default=True,
    help="Model of each fold: logreg (L2 logistic regression, C = 0.1, all folds solved at "
    "once), linear / mlp (trained 40 epochs), knn (k = 10, no training).",
)
@click.option(
    "--threshold",
    type=click.FloatRange(-1, 1),
    default=None,
    help="Cosine similarity of near-duplicates (leaks) [dedup's: 0.88].",
)
@click.option(
    "--reviewed",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True),
    help="CSV whose first column lists images already checked (e.g. the last "
    "label_issues.csv): they are not flagged again. Repeatable.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Report folder [default: audit-<folder>].",
)
@backbone_options
@split_options
@progress_option
@json_option
def audit_cmd(
    source: str,
    folds: int,
    kind: str,
    threshold: float | None,
    reviewed: tuple[str, ...],
    out: str | None,
    as_json: bool,
    progress: bool | None,
    **kw,
) -> None:
    """Find likely label errors, outliers and train/test leaks in DATA_DIR (or STORE).

    Out-of-fold probabilities of every labelled image come from --folds heads, each trained
    without the images it predicts; cleanlab's confident learning ranks the likely label errors
    among them. Outliers are the images farthest from their nearest neighbours; leaks are
    near-duplicates in different splits. Writes audit.json, label_issues.csv
    (path,given,suggested,score), corrected_labels.csv (every labelled image, suggested labels in
    place of the flagged: `embedtl extract DATA_DIR --labels corrected_labels.csv` after review),
    map.png and audit.html. Finding issues is a success (exit 0).
    """
    from ..audit import audit_head, audit_store, read_reviewed, write_audit

    done = read_reviewed(reviewed)
    store = open_source(source, source_args(kw), want_progress(progress))
    a = audit_store(
        store,
        audit_head(kind),
        folds=folds,
        threshold=threshold,
        reviewed=done,
        progress=want_progress(progress),
    )
    files = write_audit(a, out)
    s = a.summary()
    keys = (
        "store",
        "rows",
        "labelled",
        "head",
        "folds",
        "oof_accuracy",
        "n_label_issues",
        "n_outliers",
        "n_leaked_rows",
        "n_duplicate_groups",
        "reviewed_skipped",
        "seconds",
    )
    payload = {k: s[k] for k in keys} | {"files": files}

    def human() -> None:
        acc = s["oof_accuracy"]
        click.echo(
            f"audit     {s['rows']} images ({s['labelled']} labelled), {folds}-fold {s['head']} "
            f"head: out-of-fold accuracy {'-' if acc is None else f'{acc:.4f}'}"
        )
        click.echo(f"labels    {s['n_label_issues']} likely label errors: {files['label_issues']}")
        for r in s["label_issues"][:5]:
            click.echo(
                f"          {r['path']}: {r['given']} -> {r['suggested']} ({r['score']:.3f})"
            )
        click.echo(f"outliers  {s['n_outliers']} (distance to the nearest images)")
        click.echo(f"leaks     {s['n_leaked_rows']} images with a near-copy in another split")
        if s["reviewed_skipped"]:
            click.echo(f"reviewed  {s['reviewed_skipped']} images checked before: not flagged")
        click.echo(f"report    {files['html']}")
        click.echo(
            f"fix       review {files['corrected_labels']}, then: embedtl extract "
            f"{store.root} --labels {files['corrected_labels']}"
        )

    emit(as_json, payload, human)
