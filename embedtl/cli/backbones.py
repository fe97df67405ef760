"""`embedtl backbones`."""

from __future__ import annotations

import click

from ..backbones import backbone_table
from ._options import json_option
from ._output import emit


@click.command("backbones")
@json_option
def backbones_cmd(as_json: bool) -> None:
    """List the registered backbones, their feature dim, and whether their weights are here.

    Any other torchvision model works as tv:NAME, any timm model as timm:NAME, and a local
    checkpoint as ARCH@PATH.
    """
    rows = backbone_table()

    def human() -> None:
        click.echo(f"{'name':<22}{'dim':>6}{'px':>6}  weights  description")
        for r in rows:
            if "error" in r:
                click.echo(f"{r['name']:<22}  error: {r['error']}")
                continue
            here = "here" if r["weights_available"] else "missing"
            click.echo(
                f"{r['name']:<22}{r['dim']:>6}{r['image_size']:>6}  {here:<7}  {r['description']}"
            )

    emit(as_json, {"backbones": rows}, human)
