"""What every command shares: the group class (errors -> one line), options, --json output."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from .._io import json_text
from .._progress import LOGGER as PROGRESS_LOGGER
from .._progress import progress_bar, restart_clock
from ..backbones import DEFAULT_BACKBONE, MIN_IMAGE_SIZE
from ..errors import EmbedTLError, UsageError

_DEBUG_ENV = "EMBEDTL_DEBUG"
#: Exit statuses (ARCHITECTURE.md, "CLI surface"; README, "Exit codes"): 0 success, 1 an error,
#: 2 a usage error, 3 partial success (the work is done but some inputs failed: unreadable
#: images in a store, images predict or search could not read), 130 interrupted, 141 stdout
#: closed early (a pipe).
EXIT_ERROR, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED, EXIT_PIPE = 1, 2, 3, 130, 141

#: Where ``--json`` output goes: the process's stdout as it was when the command started (while
#: the command runs, anything else written to stdout, a library's print included, goes to
#: stderr, so that stdout holds exactly one JSON line).
_STDOUT: contextvars.ContextVar[Any] = contextvars.ContextVar("embedtl_stdout", default=None)
#: Whether this command logs plain progress lines (no bars: stderr is not a terminal, and
#: neither --progress nor --no-progress was given).
_LINES: contextvars.ContextVar[bool] = contextvars.ContextVar("embedtl_lines", default=False)


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


class _Failed(click.ClickException):
    """An error of the run, with the name of the error class it came from."""

    def __init__(self, message: str, type_name: str) -> None:
        super().__init__(message)
        self.type_name = type_name


#: What a user can do after interrupting a command (every output is written whole or not at all).
_NOTHING_WRITTEN = "nothing was left half-written: run it again"
_AFTER_INTERRUPT = {
    "extract": "an extraction resumes where it stopped: run it again",
    "demo": "its extraction resumes where it stopped: run it again",
    "fine-tune": "run it again: it resumes from its last epoch's checkpoint",
    "serve": "stopped while opening its sources; an extraction resumes: run it again",
}


def _command_of(args: Sequence[str] | None) -> str | None:
    """The command named in a command line (its first word that is not an option)."""
    argv = sys.argv[1:] if args is None else list(args)
    return next((a for a in argv if not a.startswith("-")), None)


def _wants_json(args: Sequence[str] | None) -> bool:
    argv = sys.argv[1:] if args is None else list(args)
    return "--json" in argv[: argv.index("--") if "--" in argv else len(argv)]


class _PipeClosed(Exception):
    """stdout was closed early: raised past click's own handling of EPIPE (which exits 1)."""


class EmbedTLGroup(click.Group):
    """A click group whose errors are one line on stderr, never a traceback; under ``--json``
    stdout is one JSON line, the error's too: ``{"error": ..., "type": ...}``."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError as e:
            raise _PipeClosed from e
        except (
            click.ClickException,
            click.exceptions.Exit,
            click.exceptions.Abort,
            _PipeClosed,
            KeyboardInterrupt,
        ):
            raise
        except UsageError as e:  # arguments that cannot work together: exit 2
            if os.environ.get(_DEBUG_ENV):
                raise
            raise click.UsageError(_one_line(str(e))) from e
        except EmbedTLError as e:
            if os.environ.get(_DEBUG_ENV):
                raise
            raise _Failed(_one_line(str(e)), type(e).__name__) from e
        except OSError as e:
            if os.environ.get(_DEBUG_ENV):
                raise
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            raise _Failed(_one_line(f"{e.strerror or e}{where}"), type(e).__name__) from e
        except MemoryError as e:
            if os.environ.get(_DEBUG_ENV):
                raise
            raise _Failed(
                "out of memory: use a smaller --batch-size or --image-size", "MemoryError"
            ) from e
        except Exception as e:  # a bug: still one line (EMBEDTL_DEBUG=1 shows the traceback)
            if os.environ.get(_DEBUG_ENV):
                raise
            if type(e).__name__ == "OutOfMemoryError":  # torch's, on a GPU
                raise _Failed(
                    f"out of GPU memory ({_one_line(str(e))[:160]}): use a smaller "
                    "--batch-size or --image-size",
                    "OutOfMemoryError",
                ) from e
            cause = _system_cause(e)
            if cause is not None:  # the system refused: the user can act, not a bug to report
                raise _Failed(cause, type(e).__name__) from e
            raise _Failed(
                _one_line(
                    f"internal error: {type(e).__name__}: {e} (EMBEDTL_DEBUG=1 shows the "
                    "traceback; please report it)"
                ),
                type(e).__name__,
            ) from e

    def main(  # type: ignore[override]
        self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra
    ):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        _terminate_as_interrupt()
        as_json = _wants_json(args)
        out = sys.stdout
        token = _STDOUT.set(out)
        given = set(sys.argv[1:] if args is None else args)
        lines = _LINES.set(not sys.stderr.isatty() and not {"--progress", "--no-progress"} & given)
        try:
            with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
                code = self._run(args, prog_name, complete_var, extra, as_json, out)
        finally:
            _STDOUT.reset(token)
            _LINES.reset(lines)
        sys.exit(code)

    def _run(self, args, prog_name, complete_var, extra, as_json: bool, out) -> int:
        def fail(message: str, type_name: str, code: int) -> int:
            click.echo(f"Error: {message}", err=True)
            if as_json:
                line = json_text({"error": message, "type": type_name}, separators=(",", ":"))
                click.echo(line, file=out)
            return code

        try:
            rv = super().main(
                args, prog_name or "embedtl", complete_var, standalone_mode=False, **extra
            )
        except click.UsageError as e:
            return fail(_one_line(e.format_message()), "UsageError", EXIT_USAGE)
        except _Failed as e:
            return fail(_one_line(e.format_message()), e.type_name, e.exit_code)
        except click.ClickException as e:
            return fail(_one_line(e.format_message()), "EmbedTLError", e.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            msg = f"interrupted ({_AFTER_INTERRUPT.get(_command_of(args), _NOTHING_WRITTEN)})"
            return fail(msg, "KeyboardInterrupt", EXIT_INTERRUPTED)
        except (_PipeClosed, BrokenPipeError):
            # stdout was closed early (`embedtl ... | head`): exit quietly, as Unix tools do
            try:  # ``out``: the real stdout (under --json sys.stdout is stderr here)
                os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
            except (OSError, ValueError, AttributeError):  # not a file (a test runner's buffer)
                pass
            return EXIT_PIPE
        return rv if isinstance(rv, int) else 0


#: What a library's own error says when the system refused it (the text it wraps): memory
#: first, then the file system's reasons.
_MEMORY = ("failed to map segment", "Cannot allocate memory", "out of memory")
_SYSTEM = (
    "No space left on device",
    "Disk quota exceeded",
    "File too large",
    "Permission denied",
    "Read-only file system",
    "Too many open files",
)


def _system_cause(e: BaseException) -> str | None:
    """One line for an error of a library (not an OSError) whose cause is the system's: a
    memory limit, a full disk, a permission; None for anything else (a bug)."""
    text = _one_line(str(e))
    if any(m in text for m in _MEMORY):
        return (
            f"out of memory ({text[:160]}): free memory, raise the process's memory limit, or "
            "use a smaller --batch-size or --image-size"
        )
    for reason in _SYSTEM:
        if reason in text:
            return f"{reason.lower()} ({text[:200]})"
    return None


def _terminate_as_interrupt() -> None:
    """SIGTERM (a scheduler's time limit, torchrun stopping the other ranks, `kill`) unwinds like
    Ctrl-C: an extraction saves the batch in flight to its journal before the process ends."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        pass


class _ClickHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            kind = "progress" if record.name == PROGRESS_LOGGER else record.levelname.lower()
            click.echo(f"{kind}: {self.format(record)}", err=True)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup_logging(verbose: int) -> Callable[[], None]:
    """Send embedtl's log records to stderr for one command; returns the undo. Libraries'
    Python warnings (deprecations, hints about their internals: nothing a user of the command
    can act on) are hidden, and shown with -v as log records."""
    import warnings

    logger = logging.getLogger("embedtl")
    handler = _ClickHandler()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    caught = warnings.catch_warnings()
    caught.__enter__()
    if verbose:
        warnings.simplefilter("default")
        logging.captureWarnings(True)
        logging.getLogger("py.warnings").addHandler(handler)
    else:
        warnings.simplefilter("ignore")

    progress = logging.getLogger(PROGRESS_LOGGER)
    heartbeat = None
    if _LINES.get():  # no bars: a plain line at least every 10 s, the command's heartbeat too
        progress.setLevel(logging.INFO)
        restart_clock()
        ctx = click.get_current_context(silent=True)
        heartbeat = progress_bar(desc=(ctx and ctx.invoked_subcommand) or "embedtl")
    else:
        progress.setLevel(logging.WARNING)

    def undo() -> None:
        if heartbeat is not None:
            heartbeat.close()
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        progress.setLevel(logging.NOTSET)
        logging.getLogger("py.warnings").removeHandler(handler)
        logging.captureWarnings(False)
        caught.__exit__(None, None, None)

    return undo


def emit(as_json: bool, payload: dict[str, Any], human: Callable[[], None] | None = None) -> None:
    """--json: exactly one line of JSON on stdout. Otherwise the human rendering."""
    if as_json:
        line = json_text(payload, separators=(",", ":"))
        click.echo(line, file=_STDOUT.get() or sys.stdout)
    elif human is not None:
        human()
    else:
        for k, v in payload.items():
            click.echo(f"{k}: {v}")


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


def pct(v: float | None) -> str:
    """A share as a percentage, ``n/a`` when undefined (None or NaN: no rows to count)."""
    return "n/a" if v is None or v != v else f"{100 * v:.2f}%"


def want_progress(flag: bool | None) -> bool:
    """Progress bars: when stderr is a terminal, or as --progress/--no-progress say. Without
    bars, and unless --no-progress, long work logs a plain line at least every 10 s
    (:mod:`embedtl._progress`; set up with the logging), so that a log file or CI never sees
    minutes of silence."""
    return sys.stderr.isatty() if flag is None else flag


# -- shared options (one place, as rasterio's rio/options.py) --------------------------------------

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object on stdout."
)
progress_option = click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bars on stderr (default: when it is a terminal).",
)


def _apply(f: Callable, opts: list[Callable]) -> Callable:
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
        return _apply(
            f,
            [
                backbone,
                click.option(
                    "--cache-dir",
                    type=click.Path(file_okay=False),
                    default=None,
                    help="Feature cache folder [default: $EMBEDTL_CACHE or the user cache folder].",
                ),
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


def _runtime_options(f: Callable) -> Callable:
    return _apply(
        f,
        [
            click.option(
                "--device",
                default="auto",
                show_default=True,
                help="auto, cpu, cuda or cuda:N; a missing GPU is an error.",
            ),
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
    return store_options(_runtime_options(f))


def backbones_options(f: Callable) -> Callable:
    """backbone_options with --backbone repeatable (commands that compare backbones)."""
    return _store_options(
        None,
        "Backbone (see `embedtl backbones`); repeat it to compare "
        f"several [default: {DEFAULT_BACKBONE}].",
        multiple=True,
    )(_runtime_options(f))


def head_backbone_options(f: Callable) -> Callable:
    """backbone_options for commands given a head: the backbone defaults to the head's own."""
    return _store_options(
        None,
        "Backbone to run [default: the one the head was trained on]; "
        "its fingerprint must match the head's.",
    )(_runtime_options(f))


def split_options(f: Callable) -> Callable:
    """How rows get labels and splits."""
    return _apply(
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
_WORKERS = click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Threads that read and decode images while the model runs [default: on a 2-core CPU "
    "0 with PyTorch, 1 with ONNX Runtime; a quarter of the cores with more; with a GPU, every "
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
    "there is one, else PIL in the workers.",
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
    return _apply(f, [_BATCH_SIZE, _WORKERS, _PRECISION, _DECODER, _COMPILE])


def extract_options(f: Callable) -> Callable:
    """How extraction runs and writes the store, and split_options."""
    opts = [_BATCH_SIZE, _WORKERS, *_STORE_WRITE, _PRECISION, _DECODER, _COMPILE]
    return split_options(_apply(f, opts))


#: command option name -> EngineOptions field
_ENGINE_FIELDS = {
    "device": "device",
    "runtime": "runtime",
    "batch_size": "batch_size",
    "workers": "workers",
    "precision": "precision",
    "decoder": "decoder",
    "compile_model": "compile",
    "image_size": "image_size",
    "cache_dir": "cache_dir",
}
_EXTRACT_ONLY = ("strict", "dtype", "follow_links", "check_content", "lock_timeout")


#: Options that choose or make a folder's store (which backbone, size, cache, split, labels,
#: how it is written): given with a STORE file, they cannot apply.
_STORE_MAKING = (
    "backbone",
    "image_size",
    "cache_dir",
    "seed",
    "val_fraction",
    "labels_csv",
    "strict",
    "dtype",
    "follow_links",
    "check_content",
    "lock_timeout",
)


def given_options(names: Sequence[str]) -> list[str]:
    """The flags (``--seed``) of the current command's parameters ``names`` that the command
    line (or the environment) gave, not their defaults."""
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return []
    flags = {p.name: (p.opts[0] if p.opts else p.name) for p in ctx.command.params}
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return [
        str(flags[n]) for n in names if n in ctx.params and ctx.get_parameter_source(n) in given
    ]


def refuse_store_options(sources: Sequence[str]) -> None:
    """A usage error when a STORE file is given with options that choose or make a folder's
    store (they would be ignored)."""
    stores = [s for s in sources if Path(s).is_file()]
    flags = given_options(_STORE_MAKING)
    if stores and flags:
        raise click.UsageError(
            f"{', '.join(flags)} cannot apply to the store file {stores[0]}: a store holds the "
            "features of its own backbone, size, labels and split; give the image folder "
            "instead to choose them"
        )


@dataclass(frozen=True)
class SourceArgs:
    """A command's backbone and engine options, built once from its command line, and the
    arguments of an extraction on a cache miss (split, labels, ...)."""

    backbone: Any  # a name, a spec, or None (the command's default)
    options: Any  # EngineOptions
    extract: dict[str, Any]

    def with_backbone(self, backbone: Any) -> SourceArgs:
        return SourceArgs(backbone, self.options, self.extract)


def source_args(kw: dict[str, Any]) -> SourceArgs:
    """Pop the backbone, engine and extraction options out of a command's keyword arguments
    (options a command does not have keep the engine's defaults)."""
    from ..data import SplitConfig
    from ..engine import EngineOptions

    settings = {field: kw.pop(opt) for opt, field in _ENGINE_FIELDS.items() if opt in kw}
    extract = {k: kw.pop(k) for k in _EXTRACT_ONLY if k in kw}
    if "seed" in kw:
        extract["split"] = SplitConfig(seed=kw.pop("seed"), val_fraction=kw.pop("val_fraction"))
        extract["labels"] = kw.pop("labels_csv")
    return SourceArgs(kw.pop("backbone", None), EngineOptions(**settings), extract)


def open_source(source: str, args: SourceArgs, progress: bool):
    """DATA_DIR|STORE -> FeatureStore (:func:`embedtl.engine.open_source`)."""
    from ..engine import open_source as open_or_extract

    refuse_store_options([source])
    backbone = DEFAULT_BACKBONE if args.backbone is None else args.backbone
    return open_or_extract(source, backbone, args.options, progress=progress, **args.extract)
