"""What a command prints: ``--json`` as one line on the real stdout (:func:`emit`), log records
and progress lines on stderr (:func:`setup_logging`), and the small formatters commands share."""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from .._io import json_text
from .._progress import LOGGER as PROGRESS_LOGGER
from .._progress import progress_bar, restart_clock

#: Where ``--json`` output goes: the process's stdout as it was when the command started (while
#: the command runs, anything else written to stdout, a library's print included, goes to
#: stderr, so that stdout holds exactly one JSON line).
_STDOUT: contextvars.ContextVar[Any] = contextvars.ContextVar("embedtl_stdout", default=None)
#: Whether this command logs plain progress lines (no bars: stderr is not a terminal, and
#: neither --progress nor --no-progress was given).
_LINES: contextvars.ContextVar[bool] = contextvars.ContextVar("embedtl_lines", default=False)


class _ClickHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        """Write ``record`` to stderr as one ``kind: message`` line."""
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


def pct(v: float | None, unit: str = "%", missing: str = "n/a") -> str:
    """A share as a percentage (``unit`` after it), ``missing`` when undefined (None or NaN: no
    rows to count)."""
    return missing if v is None or v != v else f"{100 * v:.2f}{unit}"


def want_progress(flag: bool | None) -> bool:
    """Progress bars: when stderr is a terminal, or as --progress/--no-progress say. Without
    bars, and unless --no-progress, long work logs a plain line at least every 10 s
    (:mod:`embedtl._progress`; set up with the logging), so that a log file or CI never sees
    minutes of silence."""
    return sys.stderr.isatty() if flag is None else flag
