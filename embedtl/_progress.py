"""Progress of long work: a tqdm bar on a terminal; elsewhere (stderr a log file, a notebook's
capture, CI) a plain line at least every :data:`LINE_SECONDS`, so that a minutes-long phase is
never silent.

The lines are log records of the ``embedtl.progress`` logger at INFO level: library code never
prints. Nothing is emitted (no thread is started) unless that logger is enabled for INFO, which
the command line does when stderr is not a terminal and ``--no-progress`` was not given.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["LINE_SECONDS", "LOGGER", "progress_bar"]

#: The longest a phase goes without a progress line when there is no bar.
LINE_SECONDS = 10.0
#: The logger of the progress lines.
LOGGER = "embedtl.progress"
log = logging.getLogger(LOGGER)


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
        while not self._done.wait(LINE_SECONDS):
            log.info("%s", self.line())

    def line(self) -> str:
        """``desc: n/total unit (p%), s s[, postfix]``."""
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        post = f", {self.postfix}" if self.postfix else ""
        seconds = time.perf_counter() - self.t0
        return f"{self.desc}: {self.n}{of} {self.unit}{pct}, {seconds:.0f} s{post}"

    def __iter__(self) -> Iterator:
        try:
            for x in self.iterable or ():
                yield x
                self.n += 1
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **kwargs: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if not self._done.is_set():
            self._done.set()
            if self._thread is not None and time.perf_counter() - self.t0 >= LINE_SECONDS:
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
