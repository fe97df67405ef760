"""Drawing the report's figures in a plot-worker process, and its pipe protocol.

:func:`plot_worker` starts the worker (``python -c "from embedtl.report._worker import serve;
serve()"``, in the folder that holds this ``embedtl``, so it imports the same code): it imports
matplotlib at once, while the command imports torch and trains, then draws the figures it is
sent. :func:`draw` sends a figure to it (or draws it here when none runs) and :func:`wait_drawn`
waits until every figure sent is written.

The protocol: one JSON line per figure, ``[name, absolute path, args]`` (a :data:`._plots.DRAWERS`
name), answered in order by one line each, ``ok`` or ``error ...``. The parent draws a figure
itself when the answer is an error, and every one still owed when the worker dies or stays
silent. On Linux the worker draws the figures it holds side by side, each in a process forked
from it (matplotlib already imported): as many as there are cores, and at least
:data:`AT_ONCE`.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ._plots import DRAWERS

__all__ = ["draw", "plot_training_curve", "plot_worker", "serve", "wait_drawn"]

_WORKERS: contextvars.ContextVar[list[_PlotWorker] | None] = contextvars.ContextVar(
    "embedtl_plot_workers", default=None
)
#: Figures a worker draws at once at least, whatever the cores: fit-head's four took 0.40 s
#: two at a time and 0.34 s all at once on 2 cores (medians of 4 runs; 0.51 s one by one).
AT_ONCE = 4
#: The worker's command: imports ``embedtl`` from the folder it is started in (the parent's).
_WORKER_CODE = "from embedtl.report._worker import serve; serve()"


class _PlotWorker:
    """A Python process that imports matplotlib at once and then draws the figures it is sent
    (one JSON line each; it answers one line each), on other cores."""

    def __init__(self) -> None:
        import subprocess

        package_root = Path(__file__).resolve().parents[2]  # the folder holding embedtl/
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE],
            cwd=package_root,  # first on the worker's sys.path: this embedtl, not another
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,  # answers are read with select(): no buffer may hide one
        )
        self.pending: list[tuple[str, Path, tuple]] = []
        self._answers = b""

    @property
    def alive(self) -> bool:
        """Whether the worker process is still running."""
        return self.proc.poll() is None

    def send(self, name: str, path: Path, args: tuple) -> None:
        """Ask for figure ``name`` at ``path`` (absolute: the worker runs in another folder)."""
        if self.proc.stdin is None:
            raise OSError("the plot worker has no input pipe")
        line = json.dumps([name, str(path.absolute()), list(args)], default=_plain)
        data = memoryview(line.encode() + b"\n")
        while data:  # an unbuffered pipe may take a large figure's data in parts
            data = data[self.proc.stdin.write(data) :]
        self.pending.append((name, path, args))

    def wait(self, timeout: float = 120.0) -> None:
        """Wait for every figure sent; one the worker could not draw is drawn here, and when
        the worker is gone or silent for ``timeout`` seconds, every one it still owes."""
        pending, self.pending = self.pending, []
        for i, (name, path, args) in enumerate(pending):
            answer = self._answer(timeout)
            if answer == "ok":
                continue
            if answer:  # it could not draw this one (it goes on with the next)
                DRAWERS[name](path, *args)
                continue
            self.close()  # dead or hung: the rest are drawn here
            for name, path, args in pending[i:]:
                DRAWERS[name](path, *args)
            return

    def _answer(self, timeout: float) -> str:
        """The worker's next answer line; "" when it is gone or silent for ``timeout`` s."""
        import select
        import time

        if self.proc.stdout is None:
            return ""
        fd, end = self.proc.stdout.fileno(), time.monotonic() + timeout
        while b"\n" not in self._answers:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return ""
            chunk = os.read(fd, 4096)
            if not chunk:  # the worker is gone
                return ""
            self._answers += chunk
        line, _, self._answers = self._answers.partition(b"\n")
        return line.decode(errors="replace").strip()

    def close(self) -> None:
        """End the process now: every answer is in (waiting for its interpreter to tear down
        matplotlib would cost a quarter second)."""
        if self.alive:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:  # its pipe is broken: nothing more to flush
                    pass


def draw(name: str, path: str | os.PathLike[str], *args: Any) -> None:
    """Draw figure ``name`` at ``path``: sent to the least busy :func:`plot_worker` process
    when there is one (finished by :func:`wait_drawn`), else drawn here."""
    workers = [w for w in _WORKERS.get() or [] if w.alive]
    if workers:
        worker = min(workers, key=lambda w: len(w.pending))
        try:
            worker.send(name, Path(path), args)
            return
        except (OSError, ValueError, TypeError):  # the worker is gone, or the args are not JSON
            pass
    DRAWERS[name](Path(path), *args)


def plot_training_curve(
    curve: list[dict[str, float]],
    path: str | os.PathLike[str],
    best_epoch: int | None = None,
    start_accuracy: float | None = None,
) -> None:
    """Train/val loss and val accuracy per epoch (``start_accuracy``: val before the first
    step, drawn as a dotted line), drawn by a :func:`plot_worker` when one runs (finished by
    :func:`wait_drawn`)."""
    draw("curve", path, curve, best_epoch, start_accuracy)


def _plain(o: Any) -> Any:
    """numpy scalars and arrays as JSON for the worker."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON")


def wait_drawn() -> None:
    """Block until every figure sent to the workers is written."""
    for w in _WORKERS.get() or []:
        w.wait()


@contextlib.contextmanager
def plot_worker(processes: int = 1) -> Iterator[None]:
    """Draw this block's figures in ``processes`` worker processes started now: they import
    matplotlib (about a second here) while this process imports torch and trains, then draw
    (side by side, each worker forking one process per figure on Linux) while this one waits.
    The command line's fit-head and evaluate use one: on 2 cores a second one slowed fit-head
    (its import competing with torch's; ``benchmarks/latency.py`` measures the command). The
    figures are those drawn in-process."""
    workers = []
    try:
        for _ in range(processes):
            workers.append(_PlotWorker())
    except OSError:  # no more processes can start: draw in these (or in this one)
        pass
    token = _WORKERS.set(workers)
    try:
        yield
        wait_drawn()
    finally:
        _WORKERS.reset(token)
        for w in workers:
            w.close()


# -- the worker's side -----------------------------------------------------------------------
def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _draw_line(line: bytes) -> str:
    """Draw the figure one request line names; the answer line (without its newline)."""
    try:
        name, path, args = json.loads(line)
        DRAWERS[name](Path(path), *args)
        return "ok"
    except Exception as e:  # the parent draws it itself
        return " ".join(f"error {type(e).__name__}: {e}".split())


def _warm_up() -> None:
    """Draw a small figure into memory: fonts and the Agg renderer load now, while the parent
    still imports torch, and not once in every process forked to draw."""
    import io

    from ._plots import drawable, new_figure

    fig = new_figure((2, 2))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], label=drawable(["warm"])[0])
    ax.legend()
    fig.tight_layout()
    fig.savefig(io.BytesIO(), format="png")


def serve(parallel: int | None = None) -> None:
    """The worker's loop: import matplotlib, then draw each figure read from stdin, answering
    each on stdout in the order asked. On Linux up to ``parallel`` (default: the cores, at
    least :data:`AT_ONCE`) are drawn at once, each in a forked process; elsewhere one after the
    other, here."""
    import select

    import matplotlib.backends.backend_agg  # noqa: F401 - the import is what overlaps
    import matplotlib.figure  # noqa: F401

    _warm_up()
    fork = sys.platform.startswith("linux") and hasattr(os, "fork")
    parallel = max(1, parallel or max(_cores(), AT_ONCE)) if fork else 1
    fd_in, out = sys.stdin.fileno(), sys.stdout
    running: deque[int] = deque()  # forked drawers' pids, in the order asked

    def answer_oldest() -> None:
        _, status = os.waitpid(running.popleft(), 0)
        code = os.waitstatus_to_exitcode(status)
        out.write("ok\n" if code == 0 else f"error the drawing process exited with {code}\n")
        out.flush()

    buf = b""
    while True:
        while b"\n" not in buf:
            if running and not select.select([fd_in], [], [], 0)[0]:
                answer_oldest()  # nothing more asked yet: answer in order meanwhile
                continue
            chunk = os.read(fd_in, 1 << 16)
            if not chunk:  # the parent closed the pipe
                while running:
                    answer_oldest()
                return
            buf += chunk
        line, _, buf = buf.partition(b"\n")
        if not fork:
            out.write(_draw_line(line) + "\n")
            out.flush()
            continue
        if len(running) >= parallel:
            answer_oldest()
        pid = os.fork()
        if pid == 0:  # the drawing process: one figure, then gone without any cleanup
            code = 0 if _draw_line(line) == "ok" else 1
            os._exit(code)
        running.append(pid)
