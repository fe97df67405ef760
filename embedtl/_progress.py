"""Progress of long work: a tqdm bar on a terminal; elsewhere (stderr a log file, a notebook's
capture, CI) a plain line at least every :data:`LINE_SECONDS`, so that a minutes-long phase is
never silent.

The lines are log records of the ``embedtl.progress`` logger at INFO level: library code never
prints. Nothing is emitted (no thread is started) unless that logger is enabled for INFO, which
the command line does when stderr is not a terminal and ``--no-progress`` was not given.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["LINE_SECONDS", "LOGGER", "progress_bar", "restart_clock"]

#: The longest a phase goes without a progress line when there is no bar.
LINE_SECONDS = 10.0
#: The logger of the progress lines.
LOGGER = "embedtl.progress"
log = logging.getLogger(LOGGER)
#: When the last line was logged, by any bar (under ``_lock``); at first, when this module was
#: loaded.
_last_line = [time.perf_counter()]
_lock = threading.Lock()


def restart_clock() -> None:
    """Count the silence from the start of this process (a command's first line comes
    :data:`LINE_SECONDS` after its start; at most 2 s of an older process's life count)."""
    with _lock:
        _last_line[0] = time.perf_counter() - min(_process_age(), 2.0)


def _process_age() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere 0)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: since boot
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def progress_bar(iterable: Iterable | None = None, *, progress: bool = False, **kwargs: Any):
    """``tqdm(iterable, **kwargs)`` when ``progress``; otherwise an object with the same use
    (iterate, ``update``, ``set_postfix``, ``close``, a ``with`` block) that logs a plain line
    every :data:`LINE_SECONDS` while it is open (``kwargs``: tqdm's ``total``, ``desc``,
    ``unit``, ...)."""
    if progress:
        from tqdm.auto import tqdm

        return tqdm(iterable, **{"leave": False, **kwargs})
    return _Lines(iterable, kwargs.get("total"), kwargs.get("desc") or "working", kwargs)


class _Lines:
    """The quiet stand-in of a bar: counts, and from a timer thread logs where it is."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, kw: dict) -> None:
        self.iterable, self.desc = iterable, desc
        self.total = total if total is not None else _len(iterable)
        self.unit = kw.get("unit", "it")
        self.n = 0
        self.postfix = ""
        self.t0 = time.perf_counter()
        self._done = threading.Event()
        self._thread = None
        if log.isEnabledFor(logging.INFO):
            self._thread = threading.Thread(target=self._tick, name="embedtl-progress", daemon=True)
            self._thread.start()

    def _tick(self) -> None:
        """A line when none has been logged for :data:`LINE_SECONDS`, counted from the last
        line of any bar, or from when this module was loaded (about when the process started):
        bars inside bars, and the command's heartbeat, take turns instead of each logging its
        own."""
        while True:
            with _lock:
                quiet = time.perf_counter() - _last_line[0]
                if quiet >= LINE_SECONDS - 0.05:
                    log.info("%s", self.line())
                    _last_line[0], quiet = time.perf_counter(), 0.0
            if self._done.wait(max(0.05, LINE_SECONDS - quiet)):
                return

    def line(self) -> str:
        """``desc: n/total unit (p%), s s[, postfix]``; ``desc: s s`` when nothing is counted."""
        seconds = time.perf_counter() - self.t0
        if not self.total and not self.n:
            return f"{self.desc}: {seconds:.0f} s"
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        post = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {self.n}{of} {self.unit}{pct}, {seconds:.0f} s{post}"

    def __iter__(self) -> Iterator:
        try:
            for x in self.iterable or ():
                yield x
                self.n += 1
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more done (tqdm's ``update``)."""
        self.n += n

    def set_postfix(self, **kwargs: Any) -> None:
        """Show ``k=v, ...`` after the count in the next lines (tqdm's ``set_postfix``)."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def set_description(self, desc: str) -> None:
        """Name the next lines ``desc`` (tqdm's ``set_description``)."""
        self.desc = desc

    def close(self) -> None:
        """Stop the timer thread; a counted task that logged lines and ran :data:`LINE_SECONDS` or
        more logs one last ``done`` line. Calling it again does nothing."""
        if not self._done.is_set():
            self._done.set()
            long = time.perf_counter() - self.t0 >= LINE_SECONDS
            if self._thread is not None and long and self.total:
                log.info("%s: done", self.line())

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _len(iterable: Iterable | None) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None
