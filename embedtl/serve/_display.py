"""Text as a page can show it. Class names and paths come from folder and file names, and a
name that is not valid UTF-8 is kept with lone surrogates (Python's ``surrogateescape``): JSON
carries them as escapes, but an HTML page is UTF-8 and cannot. Such a name is shown, and sent
back in links and forms, with each byte that was not UTF-8 written ``\\xNN``; the server
accepts that form wherever it accepts the name (:meth:`Catalog.class_name`)."""

from __future__ import annotations

from typing import Any

__all__ = ["display", "display_value"]


def display(text: str) -> str:
    """``text`` encodable as UTF-8: unchanged when it is; else each byte that a lone surrogate
    stands for as ``\\xNN`` (any other lone surrogate as ``\\udXXX``)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate surrogateescape did not make
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def display_value(value: Any) -> Any:
    """:func:`display` for a string (markup stays markup), anything else unchanged: Jinja's
    ``finalize``, applied to every value a template prints."""
    if isinstance(value, str):
        shown = display(value)
        if shown is value:
            return value
        return type(value)(shown) if type(value) is not str else shown
    return value
