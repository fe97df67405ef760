"""Every option more than one command takes, declared once and reused as decorators (as
rasterio's ``rio/options.py`` keeps them); a command's own options stay with the command."""

from __future__ import annotations

from collections.abc import Callable

import click

from ..backbones import DEFAULT_BACKBONE, MIN_IMAGE_SIZE


def positive_ints(ctx, param, value: str | None) -> tuple[int, ...] | None:
    """A click callback: ``1024,256`` -> (1024, 256); anything but positive integers is a
    usage error naming the option."""
    if value is None:
        return None
    try:
        out = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise click.BadParameter(
            f"expected positive integers such as 20 or 10,20,50, got {value!r}"
        )
    return out


json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object on stdout."
)
progress_option = click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bars on stderr (default: when it is a terminal).",
)


cache_dir_option = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Feature cache folder [default: $EMBEDTL_CACHE or the user cache folder].",
)


def _mib(ctx, param, value: int | None) -> int | None:
    return None if value is None else value * 2**20


memory_budget_option = click.option(
    "--memory-budget",
    type=click.IntRange(min=1),
    default=None,
    callback=_mib,  # the command receives bytes
    metavar="MIB",
    help="MiB of features to hold in memory; more streams from the store [a quarter of RAM].",
)


def apply_options(f: Callable, opts: list[Callable]) -> Callable:
    """``f`` decorated with each of ``opts``, the first one outermost (listed first in --help)."""
    for opt in reversed(opts):
        f = opt(f)
    return f


def _store_options(
    default_backbone: str | None, backbone_help: str, multiple: bool = False
) -> Callable[[Callable], Callable]:
    def decorate(f: Callable) -> Callable:
        backbone = (
            click.option("--backbone", "-b", multiple=True, help=backbone_help)
            if multiple
            else click.option(
                "--backbone",
                "-b",
                default=default_backbone,
                show_default=default_backbone is not None,
                help=backbone_help,
            )
        )
        return apply_options(
            f,
            [
                backbone,
                cache_dir_option,
                click.option(
                    "--image-size",
                    type=click.IntRange(min=MIN_IMAGE_SIZE),  # the maximum: with its estimate
                    default=None,
                    help="Crop size in pixels (default: the weights' own).",
                ),
            ],
        )

    return decorate


#: --backbone, --cache-dir, --image-size: which store of a folder a command means.
store_options = _store_options(
    DEFAULT_BACKBONE,
    "Backbone name (see `embedtl backbones`), tv:NAME, timm:NAME, or ARCH@CHECKPOINT.",
)


device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto, cpu, cuda or cuda:N; a missing GPU is an error.",
)


def runtime_options(f: Callable) -> Callable:
    """--device and --runtime: where and how the backbone runs."""
    return apply_options(
        f,
        [
            device_option,
            click.option(
                "--runtime",
                type=click.Choice(["auto", "torch", "onnxruntime"]),
                default="auto",
                show_default=True,
                help="auto: ONNX Runtime on CPU for larger jobs, PyTorch on CUDA.",
            ),
        ],
    )


def backbone_options(f: Callable) -> Callable:
    """store_options + --device, --runtime: every command that may run the backbone."""
    return store_options(runtime_options(f))


def backbones_options(f: Callable) -> Callable:
    """backbone_options with --backbone repeatable (commands that compare backbones)."""
    return _store_options(
        None,
        "Backbone (see `embedtl backbones`); repeat it to compare "
        f"several [default: {DEFAULT_BACKBONE}].",
        multiple=True,
    )(runtime_options(f))


def head_backbone_options(f: Callable) -> Callable:
    """backbone_options for commands given a head: the backbone defaults to the head's own."""
    return _store_options(
        None,
        "Backbone to run [default: the one the head was trained on]; "
        "its fingerprint must match the head's.",
    )(runtime_options(f))


def split_options(f: Callable) -> Callable:
    """How rows get labels and splits."""
    return apply_options(
        f,
        [
            click.option(
                "--seed",
                type=int,
                default=None,
                help="Seed of the train/val/test split [default: the store's own; 0 for a new "
                "store]. Another value re-splits the store (heads trained on the old split are "
                "then refused by evaluate).",
            ),
            click.option(
                "--val-fraction",
                type=click.FloatRange(0, 1, max_open=True),
                default=None,
                help="Share of train/ carved into val when there is no val/ folder [default: "
                "the store's own; 0.1 for a new store].",
            ),
            click.option(
                "--labels",
                "labels_csv",
                type=click.Path(dir_okay=False, exists=True),
                default=None,
                help="CSV of path,label rows (paths relative to DATA_DIR).",
            ),
        ],
    )


_BATCH_SIZE = click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Images per forward pass [default: 256 on CUDA; on CPU sized "
    "to the cache, e.g. 4 at 224 px].",
)
workers_option = click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Threads that read and decode images while the model runs [default: on a 2-core CPU "
    "0 with PyTorch, 2 with ONNX Runtime; a quarter of the cores with more; with a GPU, every "
    "core but one].",
)
_PRECISION = click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
    default="auto",
    show_default=True,
    help="PyTorch autocast: auto = fp16 on CUDA, fp32 elsewhere; "
    "checked against fp32 on the first batch (float32 when a "
    "row's cosine < 0.998).",
)
_DECODER = click.option(
    "--decoder",
    type=click.Choice(["auto", "pil", "torchvision"]),
    default="auto",
    show_default=True,
    help="JPEG decoding: auto = torchvision (nvJPEG) on the GPU when "
    "there is one, else PIL in the input pipeline's threads.",
)
_COMPILE = click.option(
    "--compile",
    "compile_model",
    is_flag=True,
    help="Run the backbone through torch.compile (PyTorch runtime; "
    "pays a compile once per process).",
)
_STORE_WRITE = [
    click.option(
        "--strict",
        is_flag=True,
        help="Stop at the first unreadable image instead of recording and skipping it.",
    ),
    click.option(
        "--dtype",
        type=click.Choice(["float16", "float32"]),
        default="float16",
        show_default=True,
        help="Stored feature precision.",
    ),
    click.option(
        "--follow-links",
        type=click.Choice(["inside", "all", "none"]),
        default="inside",
        show_default=True,
        help="Symbolic links followed: those resolving inside DATA_DIR, "
        "all, or none (loops are never followed).",
    ),
    click.option(
        "--check-content",
        is_flag=True,
        help="Re-hash every file (reads them all) and re-extract those "
        "whose bytes changed even where size and mtime did not.",
    ),
    click.option(
        "--lock-timeout",
        type=float,
        default=-1,
        metavar="SECONDS",
        help="How long to wait while another process writes the same "
        "store; 0 fails at once [default: wait].",
    ),
]


def engine_options(f: Callable) -> Callable:
    """--batch-size, --workers, --precision, --decoder, --compile: how the backbone runs, for
    commands that embed images (beside backbone_options' --device and --runtime)."""
    return apply_options(f, [_BATCH_SIZE, workers_option, _PRECISION, _DECODER, _COMPILE])


def extract_options(f: Callable) -> Callable:
    """How extraction runs and writes the store, and split_options."""
    opts = [_BATCH_SIZE, workers_option, *_STORE_WRITE, _PRECISION, _DECODER, _COMPILE]
    return split_options(apply_options(f, opts))
