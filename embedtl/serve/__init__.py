"""`embedtl serve`: one warm process that serves the opened stores and heads as web pages and
a JSON API (:mod:`._api`, the CLI's ``--json`` shapes; its schema at ``/openapi.json``).

:func:`open_catalog` opens sources as `search` does and heads as `predict` does, with one
batched model per backbone and per head (:class:`Batcher`: concurrent uploads share a forward
pass); :func:`create_app` builds the ASGI app over it, behind the Host, origin, token and
upload-size guards, with uploads held to a pixel limit and a decode memory budget;
:func:`run_server` serves it with uvicorn until SIGINT or SIGTERM. The app is layer 8, beside
the CLI: it translates requests into library calls and never writes while serving.

FastAPI, uvicorn, Jinja2 and python-multipart are the ``serve`` extra
(``pip install 'embedtl[serve]'``); :func:`require` says so when one is missing.
"""

from __future__ import annotations

import importlib.util

from ..errors import EmbedTLError
from ._batcher import Batcher
from ._catalog import Catalog, HeadEntry, StoreEntry
from ._open import open_catalog

__all__ = [
    "Batcher",
    "Catalog",
    "HeadEntry",
    "ServeConfig",
    "StoreEntry",
    "check_exposure",
    "create_app",
    "open_catalog",
    "require",
    "run_server",
]

#: import name -> the distribution that provides it
NEEDS = {
    "fastapi": "fastapi",
    "uvicorn": "uvicorn",
    "jinja2": "jinja2",
    "multipart": "python-multipart",
}


def require() -> None:
    """Refuse, in one line, when a package the server needs is not installed."""
    missing = [dist for mod, dist in NEEDS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise EmbedTLError(
            f"embedtl serve needs {', '.join(missing)}: pip install 'embedtl[serve]'"
        )


def __getattr__(name: str):
    if name in ("ServeConfig", "check_exposure", "create_app", "run_server"):
        from . import _app

        return getattr(_app, name)
    raise AttributeError(f"module 'embedtl.serve' has no attribute {name!r}")
