"""`embedtl serve`: open stores and heads once, then answer pages and API requests."""

from __future__ import annotations

from pathlib import Path

import click

from ._options import (
    apply_options,
    backbone_options,
    engine_options,
    json_option,
    progress_option,
    split_options,
)
from ._output import emit, want_progress
from ._source import refuse_store_options, source_args
from .search import index_args, index_options

#: --token given without a value: make one
GENERATE = "\0generate"
#: Pillow's own hard limit on an image's pixels (2 x its MAX_IMAGE_PIXELS), in millions: the
#: header check needs the image to open
UPLOAD_MPX_CEILING = 178.0


def _serve_options(f):
    return apply_options(
        f,
        [
            click.option(
                "--head",
                "heads",
                multiple=True,
                type=click.Path(exists=True),
                help="Head artifact to predict with and to show (repeatable).",
            ),
            click.option(
                "--host", default="127.0.0.1", show_default=True, help="Address to listen on."
            ),
            click.option(
                "--port",
                type=click.IntRange(0, 65535),
                default=8765,
                show_default=True,
                help="Port (0: a free one, printed).",
            ),
            click.option(
                "--token",
                envvar="EMBEDTL_TOKEN",
                default=None,
                is_flag=False,
                flag_value=GENERATE,
                help="Secret every request must carry (header X-Embedtl-Token; the page asks "
                "for it once) [env: EMBEDTL_TOKEN]; needed beyond loopback. Alone (no value: "
                "put it after the DATA_DIRs or before another option), a strong one is made "
                "and printed. Under 16 characters is warned about.",
            ),
            click.option(
                "--insecure",
                is_flag=True,
                help="Listen beyond loopback without a token: anyone who reaches the port can "
                "search and see the images.",
            ),
            click.option(
                "--allow-host",
                "allow_hosts",
                multiple=True,
                help="Another Host header name to answer (a proxy's, a DNS name); repeatable.",
            ),
            click.option(
                "--max-upload-mb",
                type=click.FloatRange(min=0.01),
                default=20.0,
                show_default=True,
                help="Largest request body accepted.",
            ),
            click.option(
                "--max-upload-mpx",
                type=click.FloatRange(min=0.01, max=UPLOAD_MPX_CEILING),
                default=40.0,
                show_default=True,
                help="Most pixels of an uploaded image, in millions, checked on its header "
                "before it is decoded (far below the decompression-bomb limit of "
                f"{UPLOAD_MPX_CEILING:.0f} Mpx); over it: 413.",
            ),
            click.option(
                "--decode-budget-mib",
                type=click.IntRange(min=16),
                default=1024,
                show_default=True,
                help="Memory the uploads being decoded may take together (each one's is "
                "estimated from its header); more uploads wait for room. An image that alone "
                "needs more: 413.",
            ),
            click.option(
                "--max-batch",
                type=click.IntRange(min=1),
                default=32,
                show_default=True,
                help="Most uploads embedded in one forward pass.",
            ),
            click.option(
                "--batch-wait-ms",
                type=click.FloatRange(min=0),
                default=2.0,
                show_default=True,
                help="How long a forward pass waits for more uploads to join it.",
            ),
        ],
    )


@click.command("serve")
@click.argument("sources", metavar="[DATA_DIR|STORE]...", nargs=-1, type=click.Path(exists=True))
@_serve_options
@index_options
@backbone_options
@engine_options
@split_options
@progress_option
@json_option
def serve_cmd(
    sources: tuple[str, ...],
    heads: tuple[str, ...],
    host: str,
    port: int,
    token: str | None,
    insecure: bool,
    allow_hosts: tuple[str, ...],
    max_upload_mb: float,
    max_upload_mpx: float,
    decode_budget_mib: int,
    max_batch: int,
    batch_wait_ms: float,
    as_json: bool,
    progress: bool | None,
    **kw,
) -> None:
    """Serve DATA_DIRs and STOREs (and --head HEADs) as a local web app and JSON API.

    On start it does what `search` does (a folder is extracted on a miss, its index built or
    brought up to date), opens the heads and keeps the models warm; then it answers: / (search
    by an uploaded or clicked image), /stores/ID (classes, failed files, images), /heads/ID
    (metrics, confusion matrix, mistakes, unsure images), /stores/ID/duplicates, and the API
    under /api (schema: /openapi.json). It listens on 127.0.0.1 unless told otherwise, and
    never writes while serving. Uploads are held to --max-upload-mb bytes and --max-upload-mpx
    pixels, and decoded within --decode-budget-mib of memory together. Ctrl-C or SIGTERM
    stops it.
    """
    from ..serve import ServeConfig, check_exposure, create_app, open_catalog, require, run_server

    require()
    generated = token == GENERATE
    if generated:
        import secrets

        token = secrets.token_urlsafe(24)
    elif token and Path(token).exists():
        raise click.BadParameter(
            f"{token!r} is a file or folder: give the token a value, or put --token (alone) "
            "after the DATA_DIRs",
            param_hint="--token",
        )
    config = ServeConfig(
        host=host,
        port=port,
        token=token or None,
        insecure=insecure,
        max_upload_bytes=int(max_upload_mb * 1e6),
        max_upload_pixels=int(max_upload_mpx * 1e6),
        decode_budget_bytes=decode_budget_mib * 2**20,
        allowed_hosts=allow_hosts,
    )
    check_exposure(config)  # before minutes of extraction, not after
    if not sources and not heads:
        raise click.UsageError("give at least one DATA_DIR, STORE or --head HEAD to serve")
    refuse_store_options(sources)
    build = index_args(kw)
    args = source_args(kw)
    catalog = open_catalog(
        sources,
        heads,
        backbone=args.backbone,
        options=args.options,
        store_options=args.store,
        index_args=build,
        max_batch=max_batch,
        max_wait=batch_wait_ms / 1000,
        progress=want_progress(progress),
    )

    def ready(url: str) -> None:  # the address, once it listens (--json: as one line)
        def human() -> None:
            for e in catalog.stores:
                click.echo(f"store     {e.name}: {len(e.store)} rows, index {e.index.kind}")
            for h in catalog.heads:
                click.echo(f"head      {h.name}: {h.info.kind}, on {h.runtime}")
            if generated:
                click.echo(f"token     {token}  (made for this run: the page asks for it once)")
            click.echo(f"serving   {url}  (Ctrl-C stops)")

        payload = {
            "url": url,
            "stores": [
                {"id": e.id, "name": e.name, "store": str(e.store.path)} for e in catalog.stores
            ],
            "heads": [
                {"id": h.id, "name": h.name, "head": str(h.info.folder)} for h in catalog.heads
            ],
            **({"token": token} if generated else {}),
        }
        emit(as_json, payload, human)

    try:
        stopped = run_server(create_app(catalog, config), config, ready)
    finally:
        catalog.close()
    click.echo(f"stopped{f' ({stopped})' if stopped else ''}: nothing was written", err=True)
