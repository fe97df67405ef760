"""The process boundary of the command line: the group class every command runs under (a
command's error -> one line on stderr and its exit status, ``--json`` errors as one JSON line,
Ctrl-C and SIGTERM -> 130 with what to do next, a closed stdout -> 141, quietly)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from .._io import json_text
from ..errors import EmbedTLError, UsageError
from ._output import _LINES, _STDOUT

_DEBUG_ENV = "EMBEDTL_DEBUG"
#: Exit statuses (ARCHITECTURE.md, "CLI surface"; README, "Exit codes"): 0 success, 1 an error,
#: 2 a usage error, 3 partial success (the work is done but some inputs failed: unreadable
#: images in a store, images predict or search could not read), 130 interrupted, 141 stdout
#: closed early (a pipe).
EXIT_ERROR, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED, EXIT_PIPE = 1, 2, 3, 130, 141


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
        """Run the command; an error other than click's own becomes one line
        (:class:`click.ClickException`) unless ``$EMBEDTL_DEBUG`` is set, and a closed stdout is
        passed on to :meth:`main`, which exits quietly."""
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
        except Exception as e:  # one line; EMBEDTL_DEBUG=1 shows the traceback instead
            if os.environ.get(_DEBUG_ENV):
                raise
            raise _one_line_error(e) from e

    def main(  # type: ignore[override]
        self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra
    ):
        """Run the command line and exit with its status; an error is one line on stderr (and the
        JSON line under ``--json``, while anything else printed goes to stderr)."""
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


def _one_line_error(e: Exception) -> click.ClickException:
    """The click exception a command's error becomes: a usage error (exit 2), or a failure
    (exit 1) with the error's type name, whatever raised it."""
    if isinstance(e, UsageError):  # arguments that cannot work together
        return click.UsageError(_one_line(str(e)))
    if isinstance(e, EmbedTLError):
        return _Failed(_one_line(str(e)), type(e).__name__)
    if isinstance(e, OSError):
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        return _Failed(_one_line(f"{e.strerror or e}{where}"), type(e).__name__)
    if isinstance(e, MemoryError):
        return _Failed("out of memory: use a smaller --batch-size or --image-size", "MemoryError")
    if type(e).__name__ == "OutOfMemoryError":  # torch's, on a GPU
        return _Failed(
            f"out of GPU memory ({_one_line(str(e))[:160]}): use a smaller "
            "--batch-size or --image-size",
            "OutOfMemoryError",
        )
    cause = _system_cause(e)
    if cause is not None:  # the system refused: the user can act, not a bug to report
        return _Failed(cause, type(e).__name__)
    return _Failed(  # a bug: still one line
        _one_line(
            f"internal error: {type(e).__name__}: {e} (EMBEDTL_DEBUG=1 shows the "
            "traceback; please report it)"
        ),
        type(e).__name__,
    )


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
