"""`embedtl demo`: the whole pipeline on the packaged demo data (:mod:`embedtl.demo`)."""

from __future__ import annotations

import click

from ._options import cache_dir_option, device_option, json_option, progress_option
from ._output import emit, want_progress
from .extract import print_extract_summary


@click.command("demo")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the demo images go [default: <cache>/demo].",
)
@cache_dir_option
@device_option
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
    from ..demo import DEMO_DATASET, demo_dir, export_demo_data, run_demo
    from ..engine import EngineOptions

    base = demo_dir(workdir, cache_dir)
    exported = export_demo_data(base, progress=want_progress(progress))
    if not as_json:
        click.echo(f"demo data  {exported['images']} images in {base / DEMO_DATASET}")
    options = EngineOptions(device=device, cache_dir=cache_dir)
    r = run_demo(base, options, fine_tune_epochs, progress=want_progress(progress))
    emit(as_json, r.to_dict(), lambda: _print_demo(r))


def _print_demo(r) -> None:
    from ..bench import config_str

    m, fit, bench = r.head.info["metrics"], r.head.info["fit"], r.bench
    best = bench.variants[0]
    print_extract_summary(r.extraction)
    click.echo(f"head      {r.head_dir} (linear, fit in {fit['seconds']:.2f} s)")
    click.echo(
        f"accuracy  val {100 * m['val_accuracy']:.1f}%, test "
        f"{100 * m['test_accuracy']:.1f}% ({m['n']['test']} test images)"
    )
    click.echo(f"confusion {r.confusion_png}")
    sel = f"{bench.folds}-fold CV" if bench.folds else "val"
    std = f" ± {100 * best['val_accuracy_std']:.1f}" if best["val_accuracy_std"] is not None else ""
    test = f", test {100 * best['test_accuracy']:.1f}%" if best["test_accuracy"] is not None else ""
    click.echo(
        f"bench     {len(bench.variants)} head variants in "
        f"{bench.seconds:.1f} s; best on {sel}: {best['kind']} "
        f"{config_str(best['config'])}, val {100 * best['val_accuracy']:.1f}%{std}{test}"
    )
    click.echo(f"          {r.bench_files['csv']}, {r.bench_files['plot']}")
    click.echo(
        f"search    {len(r.search)} test images, nearest train image "
        f"of the same class for {r.same_class}: {r.search_html}"
    )
    ft = r.fine_tune
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
    click.echo(f"next      embedtl predict {r.head_dir} IMAGE...")
    click.echo(f"browse    {r.serve}")
