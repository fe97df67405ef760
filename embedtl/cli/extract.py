"""`embedtl extract DATA_DIR`."""

from __future__ import annotations

import click

from .._dist import torchrun_rank
from ._app import EXIT_PARTIAL
from ._options import backbone_options, extract_options, json_option, progress_option
from ._output import emit, want_progress
from ._source import source_args


def print_extract_summary(stats) -> None:
    """Print what an extraction did (rows, speed, stages, decoder, time) as lines on stdout."""
    s = stats
    click.echo(f"store     {s.store}")
    click.echo(
        f"rows      {s.n_images} ({s.extracted} extracted, {s.cached} reused, {s.removed} removed, "
        f"{s.n_failed} failed, {s.n_skipped} non-image files skipped)"
    )
    click.echo(f"backbone  {s.backbone}  dim {s.dim}  fingerprint {s.fingerprint[:16]}")
    if s.model_built:
        st = s.stages
        click.echo(
            f"speed     {s.images_per_second:.1f} img/s on {s.device} ({s.runtime}); stages: "
            + ", ".join(f"{k} {v:.2f}s" for k, v in st.items())
        )
        fallback = ", ".join(f"{n} {why}" for why, n in s.decode_fallback.items())
        click.echo(
            f"          batch {s.batch_size}, {s.precision}, decoder {s.decoder}"
            + (f" (decoded by PIL instead: {fallback})" if fallback else "")
        )
    else:
        click.echo(f"          {s.runtime_reason}")
    click.echo(f"time      {s.seconds:.2f} s")


def print_failed_summary(store: str, failed: list[dict[str, str]], shown: int = 5) -> None:
    """How many files could not be read, a few of them, and how to list them all (stderr)."""
    if not failed:
        return
    n = len(failed)
    click.echo(
        f"{n} file{'s' if n > 1 else ''} could not be read (recorded in the store, not extracted):",
        err=True,
    )
    for f in failed[:shown]:
        click.echo(f"  {f['path']}: {f['error']}", err=True)
    more = f"the other {n - shown}" if n > shown else "them"
    click.echo(f"list {more} with: embedtl cache info {store} --failed", err=True)


def _parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter(
            f"expected I/N such as 0/4, got {value!r}", param_hint="--shard"
        ) from None
    if n < 1 or not 0 <= i < n:
        raise click.BadParameter(f"expected 0 <= I < N, got {value!r}", param_hint="--shard")
    return i, n


@click.command("extract")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@backbone_options
@extract_options
@click.option(
    "--shard",
    type=str,
    default=None,
    metavar="I/N",
    help="Extract the I-th of N contiguous slices of the sorted "
    "folder (0-based) into a shard store; join them with "
    "`embedtl cache merge`.",
)
@progress_option
@json_option
def extract_cmd(
    data_dir: str, as_json: bool, progress: bool | None, shard: str | None, **kw
) -> None:
    """Run the frozen backbone once over DATA_DIR and cache the pooled features.

    Reruns reuse unchanged files without building the model; new or changed files are
    extracted, removed files drop out; an interrupted run resumes where it stopped. Under
    torchrun each rank extracts a shard and rank 0 merges them and prints the summary.

    Files that cannot be read as images are recorded in the store and skipped. Exit status:
    0 every image is stored; 3 the store is complete but some files could not be read (listed
    by `embedtl cache info STORE --failed`); 1 an error (--strict: the first unreadable image).
    """
    from ..engine import extract

    args = source_args(kw)
    rank = torchrun_rank()  # under torchrun each rank extracts a shard; only rank 0 prints
    store = extract(
        data_dir,
        args.backbone,
        args.options,
        args.store,
        progress=want_progress(progress) and (rank is None or rank[0] == 0),
        shard=_parse_shard(shard),
    )
    if store is None:
        return
    stats = store.last_extraction
    payload = stats.to_dict()
    payload.pop("failed")
    payload["failed_files"] = stats.failed[:100]
    emit(as_json, payload, lambda: print_extract_summary(stats))
    print_failed_summary(stats.store, stats.failed)  # stderr, with --json too
    if stats.n_failed:
        raise click.exceptions.Exit(EXIT_PARTIAL)
