"""`embedtl fit-head` and `evaluate`: heads over cached features (`predict` and `export` run a
head on images: cli/predict.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import DataError
from ._options import (
    apply_options,
    backbone_options,
    head_backbone_options,
    json_option,
    memory_budget_option,
    positive_ints,
    progress_option,
    split_options,
)
from ._output import emit, pct, want_progress
from ._source import open_source, source_args


def head_options(f):
    """Every HeadConfig field as an option; None means the kind's default."""
    from ..heads import ACTIVATIONS, HEAD_KINDS, NORMALIZATIONS

    return apply_options(
        f,
        [
            click.option(
                "--head",
                "kind",
                type=click.Choice(HEAD_KINDS),
                default="linear",
                show_default=True,
                help="Head kind.",
            ),
            click.option(
                "--hidden",
                callback=positive_ints,
                default=None,
                help="mlp: hidden sizes, e.g. 1024,256 [default: 512].",
            ),
            click.option(
                "--dropout",
                type=click.FloatRange(0, 1, max_open=True),
                default=None,
                help="mlp: dropout [0.2].",
            ),
            click.option(
                "--activation",
                type=click.Choice(ACTIVATIONS),
                default=None,
                help="mlp: activation [gelu].",
            ),
            click.option(
                "--epochs",
                type=click.IntRange(min=1),
                default=None,
                help="Most epochs (early stopping on val may end sooner) [60].",
            ),
            click.option(
                "--lr",
                type=click.FloatRange(min=0, min_open=True),
                default=None,
                help="AdamW peak learning rate [3e-3].",
            ),
            click.option(
                "--weight-decay",
                type=click.FloatRange(min=0),
                default=None,
                help="AdamW weight decay [0.05].",
            ),
            click.option(
                "--batch-size",
                "head_batch_size",
                type=click.IntRange(min=1),
                default=None,
                help="Rows per step [scales with the data, 16..1024].",
            ),
            click.option(
                "--label-smoothing",
                type=click.FloatRange(0, 1, max_open=True),
                default=None,
                help="Label smoothing of the cross-entropy (linear, mlp) [0.0].",
            ),
            click.option(
                "--class-weight",
                type=click.Choice(["none", "balanced"]),
                default=None,
                help="balanced: weigh classes against imbalance [none].",
            ),
            click.option(
                "--normalize",
                type=click.Choice(NORMALIZATIONS),
                default=None,
                help="Feature normalisation [standardize; kNN always l2].",
            ),
            click.option(
                "--patience",
                type=click.IntRange(min=1),
                default=None,
                help="Epochs without a better val accuracy before stopping [6].",
            ),
            click.option(
                "--train-seed",
                type=int,
                default=None,
                help="Seed of initialisation and shuffling [0].",
            ),
            click.option(
                "-k",
                "--k",
                "k",
                type=click.IntRange(min=1),
                default=None,
                help="knn: neighbours [20].",
            ),
            click.option(
                "--temperature",
                type=click.FloatRange(min=0, min_open=True),
                default=None,
                help="knn: vote temperature [0.07].",
            ),
            click.option(
                "--C",
                "C",
                type=click.FloatRange(min=0, min_open=True),
                default=None,
                help="logreg: inverse regularisation [1.0].",
            ),
            memory_budget_option,
        ],
    )


def _head_config(kw: dict[str, Any]):
    from ..heads import HeadConfig

    names = {
        "kind": "kind",
        "hidden": "hidden",
        "dropout": "dropout",
        "activation": "activation",
        "epochs": "epochs",
        "lr": "lr",
        "weight_decay": "weight_decay",
        "head_batch_size": "batch_size",
        "label_smoothing": "label_smoothing",
        "normalize": "normalize",
        "patience": "patience",
        "train_seed": "seed",
        "k": "k",
        "temperature": "temperature",
        "C": "C",
    }
    values = {field: kw.pop(opt) for opt, field in names.items()}
    cw = kw.pop("class_weight")
    if cw is not None:
        values["class_weight"] = None if cw == "none" else cw
    return HeadConfig(**{k: v for k, v in values.items() if v is not None})


@click.command("fit-head")
@click.argument("source", metavar="DATA_DIR|STORE", type=click.Path(exists=True))
@head_options
@click.option(
    "--out",
    type=click.Path(),
    default=None,
    help="Head artifact folder [default: "
    "heads/<folder>-<backbone>-<kind>; replaced if it is a head].",
)
@backbone_options
@split_options
@progress_option
@json_option
def fit_head_cmd(
    source: str,
    out: str | None,
    memory_budget: int | None,
    as_json: bool,
    progress: bool | None,
    **kw,
) -> None:
    """Train a head on the cached features of DATA_DIR (extracted first if needed) or a STORE.

    Model selection (early stopping, best epoch) reads the validation split only; the test split
    is evaluated once at the end. Writes the head (safetensors + JSON), its training curve and
    the test confusion matrix, calibration and coverage plots into the artifact folder.
    """
    from ..report import plot_worker

    with plot_worker():  # matplotlib loads in another process while this one loads torch
        from ..heads import default_head_dir, fit_head

        cfg = _head_config(kw)
        args = source_args(kw)
        store = open_source(source, args, want_progress(progress))
        head = fit_head(
            store,
            cfg,
            device=args.options.device,
            memory_budget=memory_budget,
            progress=want_progress(progress),
        )
        path = head.save(out or default_head_dir(store, cfg.kind))
    m, fit = head.info["metrics"], head.info["fit"]
    payload = head.to_dict()

    def human() -> None:
        click.echo(
            f"head      {path}  ({head.kind}, {len(head.classes)} "
            f"classes, backbone {payload['backbone']})"
        )
        click.echo(f"rows      train {m['n']['train']}, val {m['n']['val']}, test {m['n']['test']}")
        ep = f", {fit['epochs']} epochs (best {fit['best_epoch']})" if fit["epochs"] else ""
        click.echo(f"fit       {fit['seconds']:.2f} s on {fit['device']}{ep}")
        click.echo(f"val       accuracy {pct(m['val_accuracy'])}")
        click.echo(
            f"test      accuracy {pct(m['test_accuracy'])}, top-5 "
            f"{pct(m['test_top5_accuracy'])}, macro-F1 {pct(m['test_macro_f1'])}"
        )
        if payload["confusion_png"]:
            click.echo(f"confusion {payload['confusion_png']}")

    emit(as_json, payload, human)


def _load(head_path: str):
    from ..heads import load_head

    return load_head(head_path)


@click.command("evaluate")
@click.argument("head_path", metavar="HEAD", type=click.Path(exists=True))
@click.argument("source", metavar="DATA_DIR|STORE", type=click.Path(exists=True))
@click.option(
    "--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Report folder [default: HEAD/eval-<folder>-<split>].",
)
@head_backbone_options
@split_options
@progress_option
@json_option
def evaluate_cmd(
    head_path: str,
    source: str,
    split: str,
    out: str | None,
    as_json: bool,
    progress: bool | None,
    **kw,
) -> None:
    """Evaluate HEAD on a split of DATA_DIR or STORE: accuracy, top-5, macro-F1, per-class
    precision/recall, confusion matrix, calibration (ECE, reliability plot) and the
    accuracy-vs-coverage curve of an "unsure" threshold, as JSON and PNG files."""
    from ..report import plot_worker

    with plot_worker():  # matplotlib loads in another process while this one loads torch
        from ..heads import default_eval_dir, evaluate_head

        head = _load(head_path)
        args = source_args(kw)
        if args.backbone is None:
            args = args.with_backbone(head.backbone_spec)
        store = open_source(source, args, want_progress(progress))
        ev = evaluate_head(head, store, split)
        if not len(ev.y_true):
            raise DataError(f"the {split} split of {store.root} has no labelled rows")
        report_dir = Path(out) if out else default_eval_dir(head_path, store, split)
        files = ev.write(report_dir)
    m = ev.metrics()
    payload = {
        "head": str(head_path),
        "store": str(store.path),
        "split": split,
        "n": m["n"],
        "accuracy": m["accuracy"],
        "top5_accuracy": m["top5_accuracy"],
        "macro_f1": m["macro_f1"],
        "ece": m["calibration"]["ece"],
        "per_class": m["per_class"],
        "coverage": m["coverage"],
        "report": str(report_dir),
        "files": files,
    }

    def human() -> None:
        click.echo(f"{split} of {store.root}: {m['n']} images")
        click.echo(
            f"accuracy  {pct(m['accuracy'])}  top-{m['top_k']} "
            f"{pct(m['top5_accuracy'])}  macro-F1 {pct(m['macro_f1'])}  "
            f"ECE {m['calibration']['ece']:.3f}"
        )
        w = max(len(c) for c in head.classes)
        click.echo(f"{'class':<{w}}  precision  recall  support")
        for c, r in m["per_class"].items():
            if r["support"]:
                click.echo(
                    f"{c:<{w}}  {r['precision']:9.3f}  {r['recall']:6.3f}  {r['support']:7d}"
                )
        for p in m["coverage"]:
            if p["threshold"] in (0.5, 0.8, 0.9):
                click.echo(
                    f"unsure below {p['threshold']:.1f}: answers "
                    f"{pct(p['coverage'])} of images at accuracy {pct(p['accuracy'])}"
                )
        click.echo(
            f"report    {report_dir} (confusion.png, reliability.png, coverage.png, metrics.json)"
        )

    emit(as_json, payload, human)
