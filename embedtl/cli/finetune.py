"""`embedtl fine-tune`: backbone + trained head end to end; a new backbone, re-extracted."""

from __future__ import annotations

import click

from ._base import (
    _runtime_options,
    emit,
    json_option,
    pct,
    progress_option,
    split_options,
    want_progress,
)


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
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Decoding worker processes [0 on a 2-core CPU].",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Feature cache folder [default: $EMBEDTL_CACHE or the user cache folder].",
)
@_runtime_options
@split_options
@progress_option
@json_option
def fine_tune_cmd(
    data_dir: str,
    head_path: str,
    unfreeze: str,
    epochs: int,
    lr: float,
    backbone_lr_ratio: float,
    batch_size: int,
    patience: int,
    weight_decay: float,
    train_bn: bool,
    augment: bool,
    train_seed: int,
    out: str | None,
    restart: bool,
    workers: int | None,
    cache_dir: str | None,
    device: str,
    runtime: str,
    seed: int,
    val_fraction: float,
    labels_csv: str | None,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Fine-tune the backbone of HEAD on DATA_DIR end to end, starting from the trained head.

    All but the last blocks stay frozen (their BatchNorm statistics too); the unfrozen blocks
    train at a smaller learning rate than the head; val accuracy picks the epoch. The new
    backbone is saved in the output folder (load it with --backbone FOLDER), DATA_DIR is
    extracted again into a new store and the head re-fitted there: before/after val and test
    accuracy are printed. Ctrl-C keeps a checkpoint; the same command resumes.
    """
    from ..data import SplitConfig
    from ..engine import EngineOptions
    from ..finetune import FineTuneConfig, fine_tune

    cfg = FineTuneConfig(
        unfreeze=unfreeze,
        epochs=epochs,
        lr=lr,
        backbone_lr_ratio=backbone_lr_ratio,
        batch_size=batch_size,
        patience=patience,
        weight_decay=weight_decay,
        train_bn=train_bn,
        augment=augment,
        seed=train_seed,
    )
    options = EngineOptions(device=device, runtime=runtime, workers=workers, cache_dir=cache_dir)
    r = fine_tune(
        data_dir,
        head_path,
        cfg,
        options,
        out=out,
        split=SplitConfig(seed=seed, val_fraction=val_fraction),
        labels=labels_csv,
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
