"""`embedtl bench-heads`: a grid of head variants (and backbones), ranked on val."""

from __future__ import annotations

import click

from ..backbones import DEFAULT_BACKBONE
from ._options import (
    backbones_options,
    json_option,
    memory_budget_option,
    progress_option,
    split_options,
)
from ._output import emit, pct, want_progress
from ._source import open_source, source_args


def _folds(ctx, param, value: str) -> int | str:
    if value == "auto":
        return value
    try:
        k = int(value)
    except ValueError:
        raise click.BadParameter(
            f"expected auto, 0 or a number of folds >= 2, got {value!r}"
        ) from None
    if k == 1 or k < 0:
        raise click.BadParameter(f"expected auto, 0 or a number of folds >= 2, got {value!r}")
    return k


def _cell(v: float | None) -> str:
    return pct(v, unit="", missing="-")  # the table's header says %


@click.command("bench-heads")
@click.argument("source", metavar="DATA_DIR|STORE", type=click.Path(exists=True))
@click.option(
    "--grid",
    default="default",
    show_default=True,
    help="A preset (default, lr-wd, full) or a JSON file: an object "
    "or a list of objects of head settings, each list value a "
    'set of choices, e.g. [{"kind": "linear", "lr": [0.001, '
    '0.003]}, {"kind": "knn", "k": [10, 20]}].',
)
@click.option(
    "--folds",
    default="auto",
    callback=_folds,
    show_default=True,
    help="k-fold cross-validation over train+val: auto (5 folds below "
    "1000 labelled rows), 0 (use the val split), or k.",
)
@click.option(
    "--test-top",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Evaluate the N best variants of each backbone and kind on "
    "the test split (chosen on val).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for results.csv, results.json, accuracy_vs_time.png "
    "[default: bench-heads/<folder>].",
)
@click.option(
    "--show",
    type=click.IntRange(min=1),
    default=40,
    show_default=True,
    help="Rows of the ranked table to print (the CSV has all).",
)
@memory_budget_option
@backbones_options
@split_options
@progress_option
@json_option
def bench_heads_cmd(
    source: str,
    grid: str,
    folds,
    test_top: int,
    out: str | None,
    show: int,
    memory_budget: int | None,
    as_json: bool,
    progress: bool | None,
    **kw,
) -> None:
    """Train a grid of head variants on the cached features of DATA_DIR (extracted first if
    needed) or a STORE, rank them on validation accuracy and evaluate the best of each kind on
    the test split once.

    Variants that differ only in learning rate, weight decay or label smoothing train together
    as one batched model; kNN variants share one neighbour search. With several --backbone the
    folder is extracted with each and one table compares them.
    """
    from ..bench import bench_heads, load_grid

    configs = load_grid(grid)
    given = list(kw.pop("backbone"))
    args = source_args(kw)
    stores = [
        open_source(source, args.with_backbone(b), want_progress(progress))
        for b in given or [DEFAULT_BACKBONE]
    ]
    result = bench_heads(
        stores,
        configs,
        folds=folds,
        test_top=test_top,
        device=args.options.device,
        memory_budget=memory_budget,
        progress=want_progress(progress),
    )
    files = result.write(out)
    payload = {**result.to_dict(), "files": files}

    def human() -> None:
        rows = result.rows()
        many = len(result.backbones) > 1
        bw = max(len(r["backbone"]) for r in rows) + 2 if rows else 10
        std = result.folds > 0
        head = (
            f"{'#':>3}  "
            + (f"{'backbone':<{bw}}" if many else "")
            + f"{'kind':<7}{'val %':>13}{'test %':>8}{'F1 %':>7}{'fit s':>8}{'params':>10}  config"
        )
        click.echo(head)
        for r in rows[:show]:
            val = _cell(r["val_accuracy"]) + (f"±{100 * r['val_accuracy_std']:.1f}" if std else "")
            line = f"{r['rank']:>3}  " + (f"{r['backbone']:<{bw}}" if many else "")
            test, f1 = _cell(r["test_accuracy"]), _cell(r["test_macro_f1"])
            line += f"{r['kind']:<7}{val:>13}{test:>8}{f1:>7}{r['fit_seconds']:>8.3g}"
            line += f"{r['parameters']:>10}  {r['config']}"
            click.echo(line)
        if len(rows) > show:
            click.echo(f"... {len(rows) - show} more in {files['csv']}")
        sel = f"{result.folds}-fold cross-validation on train+val" if std else "the val split"
        click.echo(f"ranked on {sel}; test: the best {result.test_top} of each kind, read once")
        for b in result.backbones:
            ext = (
                f"{b['images_per_second']:.1f} img/s "
                f"({b['extract_seconds']:.1f} s for {b['extract_images']} "
                f"images, {b['runtime']})"
                if b["images_per_second"]
                else "extraction time not recorded"
            )
            size = f"{b['model_bytes'] / 2**20:.1f} MiB" if b["model_bytes"] else "size unknown"
            click.echo(
                f"backbone  {b['backbone']}: dim {b['dim']}, "
                f"{b['image_size']} px, weights {size}, {ext}"
            )
        click.echo(
            f"wrote     {files['csv']}, {files['json']}, {files['plot']}  ({result.seconds:.1f} s)"
        )

    emit(as_json, payload, human)
