"""Old public names kept for one release: :func:`deprecated_alias` wraps the new function so
that calling the old name works and warns (``DeprecationWarning``) naming the new one."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["deprecated_alias"]


def deprecated_alias(new: Callable[..., Any], old: str, target: str) -> Callable[..., Any]:
    """``new`` under its former name ``old``: the same call, with a ``DeprecationWarning``
    naming ``target``, the public name of ``new`` (both as ``module.name``); removed in the
    release after the rename."""

    @functools.wraps(new)
    def alias(*args: Any, **kwargs: Any) -> Any:
        warnings.warn(
            f"{old} is deprecated and will be removed in the next release: use {target}",
            DeprecationWarning,
            stacklevel=2,
        )
        return new(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old.rsplit(".", 1)[-1]
    alias.__doc__ = f"Deprecated: the former name of :func:`{target}` (same arguments)."
    return alias
