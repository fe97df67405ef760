"""`embedtl predict` and `export`: backbone + head on new images, and as one model."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import DataError
from ._app import EXIT_PARTIAL
from ._options import engine_options, head_backbone_options, json_option, progress_option
from ._output import emit, want_progress
from ._source import source_args


@click.command("predict")
@click.argument("head_path", metavar="HEAD", type=click.Path(exists=True))
@click.argument(
    "inputs", metavar="IMAGE|DIR...", nargs=-1, required=True, type=click.Path(exists=True)
)
@click.option(
    "--unsure",
    type=click.FloatRange(0, 1),
    default=None,
    help="Answer 'unsure' when the top probability is below P.",
)
@click.option("--topk", type=click.IntRange(min=1), default=5, show_default=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the predictions to this CSV.",
)
@head_backbone_options
@engine_options
@progress_option
@json_option
def predict_cmd(
    head_path: str,
    inputs: tuple[str, ...],
    unsure: float | None,
    topk: int,
    out: str | None,
    as_json: bool,
    progress: bool | None,
    **kw,
) -> None:
    """Classify images (files, or folders searched recursively) with the backbone + HEAD.

    The backbone is rebuilt from the spec in the head; a backbone whose fingerprint differs
    from the head's (other weights, other image size) is refused.
    """
    from .._io import check_outputs
    from ..predict import predict_images

    check_outputs({"--out": out}, reads=inputs, protected=[head_path])
    args = source_args(kw)
    preds = predict_images(
        head_path,  # read without torch: ONNX Runtime with the head's export cached needs none
        inputs,
        args.options,
        backbone=args.backbone,
        topk=topk,
        unsure=unsure,
        progress=want_progress(progress),
    )
    if not preds.records:
        raise DataError(
            "no image could be read: "
            + "; ".join(f"{f['path']}: {f['error']}" for f in preds.failed)
        )
    if out:
        preds.write_csv(out)
    payload = {
        "head": str(head_path),
        "predictions": preds.records,
        "failed": preds.failed,
        "runtime": preds.runtime,
        "stages": preds.stages,
        "csv": out,
    }

    def human() -> None:
        for r in preds.records:
            alt = ", ".join(f"{t['label']} {t['p']:.2f}" for t in r["topk"][1:3])
            click.echo(
                f"{r['label']:<16} {r['confidence']:.3f}  {r['path']}"
                + (f"  ({alt})" if alt else "")
            )
        for f in preds.failed:
            click.echo(f"failed    {f['path']}: {f['error']}", err=True)
        if out:
            click.echo(f"wrote {out}", err=True)

    emit(as_json, payload, human)
    if preds.failed:  # some images answered, some unreadable: partial success
        click.get_current_context().exit(EXIT_PARTIAL)


@click.command("export")
@click.argument("head_path", metavar="HEAD", type=click.Path(exists=True))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["onnx", "torchscript"]),
    default=None,
    help="Model format [default: from OUT's suffix: .onnx, or .pt/.ts/.torchscript].",
)
@head_backbone_options
@json_option
def export_cmd(head_path: str, out: str, fmt: str | None, as_json: bool, **kw) -> None:
    """Write backbone + HEAD as one model (uint8 RGB images in, class probabilities out),
    checked against PyTorch on a seeded batch; a JSON sidecar names the classes and the
    resize/crop to apply first."""
    from ..export import export_format, export_head
    from ..heads import load_head

    fmt = export_format(out, fmt)  # before loading the head: a wrong name fails at once
    head = load_head(head_path)
    report = export_head(head, out, fmt, backbone=kw["backbone"], image_size=kw["image_size"])
    payload = {
        "head": str(head_path),
        "out": str(out),
        "format": fmt,
        "sidecar": str(Path(out).with_suffix(".json")),
        "max_abs_diff": report.max_abs_diff,
        "min_cosine": report.min_cosine,
        "bytes": Path(out).stat().st_size,
    }
    emit(
        as_json,
        payload,
        lambda: click.echo(
            f"wrote {out} ({fmt}, {payload['bytes'] / 2**20:.1f} MiB); "
            f"matches PyTorch: max |diff| {report.max_abs_diff:.2e}, min "
            f"cosine {report.min_cosine:.6f}"
        ),
    )
