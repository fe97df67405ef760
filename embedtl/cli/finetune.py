"""`embedtl fine-tune`: backbone + trained head end to end; a new backbone, re-extracted."""

from __future__ import annotations

import click

from ._options import (
    cache_dir_option,
    json_option,
    progress_option,
    runtime_options,
    split_options,
    workers_option,
)
from ._output import emit, pct, want_progress
from ._source import source_args


@click.command("fine-tune")
@click.argument("data_dir", metavar="DATA_DIR", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--head",
    "head_path",
    required=True,
    type=click.Path(exists=True),
    help="A linear, mlp or logreg head fitted on DATA_DIR (`embedtl "
    "fit-head`); its backbone is the one fine-tuned.",
)
@click.option(
    "--unfreeze",
    default="last:1",
    show_default=True,
    help="last:N trains the N blocks next to the head (timm's stages; "
    "ResNet layerN; features.N), all trains everything.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Most epochs; early stopping on val may end sooner.",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=1e-3,
    show_default=True,
    help="The head's learning rate (AdamW).",
)
@click.option(
    "--backbone-lr-ratio",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.1,
    show_default=True,
    help="The block next to the head trains at LR x this; each block below at 0.7x the one above.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=2),
    default=32,
    show_default=True,
    help="Images per step.",
)
@click.option(
    "--patience",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Epochs without a better val accuracy before stopping.",
)
@click.option(
    "--weight-decay",
    type=click.FloatRange(min=0),
    default=0.01,
    show_default=True,
    help="AdamW weight decay (weights only).",
)
@click.option(
    "--train-bn",
    is_flag=True,
    help="Let BatchNorm layers of the unfrozen blocks update their "
    "running statistics (default: fixed, as the head saw them).",
)
@click.option(
    "--augment/--no-augment",
    default=True,
    show_default=True,
    help="Random resized crop and flip while training.",
)
@click.option(
    "--train-seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of shuffling, augmentation and dropout.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Output folder [default: finetuned/<folder>-<backbone>-<unfreeze>].",
)
@click.option(
    "--restart",
    is_flag=True,
    help="Ignore a checkpoint or a finished run in --out and train from the head again.",
)
@workers_option
@cache_dir_option
@runtime_options
@split_options
@progress_option
@json_option
def fine_tune_cmd(
    data_dir: str,
    head_path: str,
    train_seed: int,
    out: str | None,
    restart: bool,
    progress: bool | None,
    as_json: bool,
    **kw,
) -> None:
    """Fine-tune the backbone of HEAD on DATA_DIR end to end, starting from the trained head.

    All but the last blocks stay frozen (their BatchNorm statistics too); the unfrozen blocks
    train at a smaller learning rate than the head; val accuracy picks the epoch. The new
    backbone is saved in the output folder (load it with --backbone FOLDER), DATA_DIR is
    extracted again into a new store and the head re-fitted there: before/after val and test
    accuracy are printed. Ctrl-C keeps a checkpoint; the same command resumes.
    """
    import dataclasses

    from ..finetune import FineTuneConfig, fine_tune

    # the training's options (its --batch-size is images per step; its seed is --train-seed:
    # --seed is the split's) into its config, the rest into the engine's and the store's records
    fields = {f.name for f in dataclasses.fields(FineTuneConfig)} - {"seed"}
    cfg = FineTuneConfig(seed=train_seed, **{k: kw.pop(k) for k in list(kw) if k in fields})
    args = source_args(kw)
    r = fine_tune(
        data_dir,
        head_path,
        cfg,
        args.options,
        out=out,
        split=args.store.split,
        labels=args.store.labels,
        restart=restart,
        progress=want_progress(progress),
    )
    payload = r.to_dict()

    def human() -> None:
        how = (
            "reused (same settings, already trained)"
            if r.reused
            else f"{r.epochs} epochs, best {r.best_epoch}, {r.seconds['train']:.1f} s on {r.device}"
        )
        if r.resumed_from:
            how += f", resumed at epoch {r.resumed_from['epoch']} step {r.resumed_from['step']}"
        click.echo(
            f"trained   {', '.join(r.blocks)} + head ({r.trainable_parameters:,} parameters): {how}"
        )
        click.echo(f"backbone  {r.backbone}  {r.backbone_path}")
        click.echo(f"store     {r.store}  (parent's store kept: {r.parent_store})")
        click.echo(f"head      {r.head}")
        click.echo(f"           {'val':>10} {'test':>10}")
        for name, m in (("before", r.before), ("after", r.after)):
            click.echo(f"{name:<10} {pct(m['val_accuracy']):>10} {pct(m['test_accuracy']):>10}")
        if r.start_val_accuracy is not None:
            click.echo(
                f"end to end: val {pct(r.start_val_accuracy)} at the start "
                f"(the head alone), {pct(r.end_to_end_val_accuracy)} at the "
                "best epoch"
            )
        if (r.after["val_accuracy"] or 0) < (r.before["val_accuracy"] or 0):
            click.echo(
                "note: val accuracy went down; the parent backbone and its "
                "head remain the better choice",
                err=True,
            )

    emit(as_json, payload, human)
