"""The ASGI app (FastAPI: its OpenAPI schema at ``/openapi.json``, :mod:`._schema`) over an
opened :class:`~embedtl.serve.Catalog`, its error contract, and running it with uvicorn."""

from __future__ import annotations

import errno
import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import json_text
from .._version import __version__
from ..errors import (
    DataError,
    EmbedTLError,
    ImageDecodeError,
    NotFoundError,
    UploadTooLargeError,
    UsageError,
)
from ._catalog import Catalog
from ._security import MIN_TOKEN_CHARS, Guard, Tokens, is_loopback
from ._uploads import DecodeBudget

__all__ = ["ServeConfig", "check_exposure", "create_app", "run_server"]

log = logging.getLogger(__name__)

HERE = Path(__file__).parent

#: status of each error class a request can meet (the first match in this order)
_STATUS: list[tuple[type[BaseException], int]] = [
    (UploadTooLargeError, 413),
    (NotFoundError, 404),
    (ImageDecodeError, 415),
    (UsageError, 422),  # a parameter's value the request cannot have (an unknown class)
    (DataError, 400),
    (EmbedTLError, 400),
]


@dataclass(frozen=True)
class ServeConfig:
    """How the server listens and what it accepts."""

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    insecure: bool = False
    max_upload_bytes: int = 20_000_000
    max_upload_pixels: int = 40_000_000  # per uploaded image, checked before it is decoded
    decode_budget_bytes: int = 1 << 30  # what the decodes in flight may take together
    allowed_hosts: tuple[str, ...] = ()  # names it answers for, beside its own address
    thumb_size: int = 160
    unsure: float = 0.5  # the head page lists images under this confidence
    login_interval: float = 0.5  # seconds between two login checks while they come faster

    def hosts(self) -> list[str]:
        """The Host header names accepted: loopback names on loopback; with a token or
        --insecure on all interfaces, any name (the token is the guard)."""
        names = {"localhost", "127.0.0.1", "::1"} if is_loopback(self.host) else {self.host}
        if self.host in ("0.0.0.0", "::") and not is_loopback(self.host):
            names = {"*"}
        return sorted(names | set(self.allowed_hosts))


def check_exposure(config: ServeConfig) -> None:
    """Refuse to listen beyond loopback with neither a token nor an explicit --insecure; warn
    about a token short enough to guess."""
    if not is_loopback(config.host) and config.token is None and not config.insecure:
        raise EmbedTLError(
            f"--host {config.host} exposes the server beyond this machine: pass --token TOKEN "
            "(clients send it; the page asks for it once), or --insecure to serve anyone"
        )
    if config.token is not None and len(config.token) < MIN_TOKEN_CHARS:
        log.warning(
            "the token has %d characters, few enough to guess: use %d or more "
            "(--token with no value makes one)",
            len(config.token),
            MIN_TOKEN_CHARS,
        )


def _error(exc: BaseException, catalog: Catalog | None = None) -> tuple[int, dict[str, str]]:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            text = " ".join(str(exc).split())
            if catalog is not None:
                text = catalog.redact(text)
            return status, {"error": text, "type": type(exc).__name__}
    return 500, {
        "error": "internal server error (the server's log has the details)",
        "type": "InternalError",
    }


def create_app(catalog: Catalog, config: ServeConfig | None = None):
    """The web app and JSON API over ``catalog`` behind the :class:`Guard`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException

    from ._api import api_router
    from ._pages import page_router, render_error
    from ._schema import openapi_document

    class StrictJSON(JSONResponse):
        """Strict JSON (:func:`embedtl._io.json_text`): an undefined metric is null, never NaN
        (which would fail the response)."""

        def render(self, content) -> bytes:
            return json_text(content, separators=(",", ":")).encode()

    cfg = config or ServeConfig()
    app = FastAPI(
        default_response_class=StrictJSON,
        title="embedtl",
        version=__version__,
        description="Search, browse and check heads over cached image embeddings.",
        docs_url=None,  # the docs pages load their scripts from a CDN: none here
        redoc_url=None,
    )
    app.state.catalog = catalog
    app.state.config = cfg
    app.state.tokens = Tokens(cfg.token, cfg.login_interval)
    app.state.budget = DecodeBudget(cfg.decode_budget_bytes)

    def respond(request: Request, status: int, body: dict[str, str]):
        if request.url.path.startswith("/api/") or "json" in request.headers.get("accept", ""):
            return StrictJSON(body, status_code=status)
        return render_error(request, status, body["error"])

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        parts = [
            f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
            for e in errs[:3]
        ]
        return respond(request, 422, {"error": "; ".join(parts), "type": "ValidationError"})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if isinstance(exc.__cause__, EmbedTLError):  # raised while the body was parsed
            return respond(request, *_error(exc.__cause__, catalog))
        msg = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            msg = f"not found: {request.url.path[:200]}"
        return respond(request, exc.status_code, {"error": msg, "type": "HTTPError"})

    @app.exception_handler(EmbedTLError)
    async def refused(request: Request, exc: EmbedTLError):
        return respond(request, *_error(exc, catalog))

    @app.exception_handler(Exception)  # a bug: logged here, one line to the client
    async def failed(request: Request, exc: Exception):
        status, body = _error(exc)
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return respond(request, status, body)

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(api_router(catalog, cfg, app.state.budget))
    app.include_router(page_router(catalog, cfg))
    app.openapi = lambda: openapi_document(app)
    return Guard(app, cfg.hosts(), app.state.tokens, cfg.max_upload_bytes)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port); one line when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY on accepted sockets only when the protocol
    # says TCP; without it every keep-alive response waited ~40 ms (Nagle + delayed ACK)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise EmbedTLError(
                f"port {port} on {host} is in use (another embedtl serve?): pass --port N, "
                "or --port 0 for a free one"
            ) from None
        raise EmbedTLError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_server(
    app: Any,
    config: ServeConfig,
    ready: Callable[[str], None] | None = None,
) -> str | None:
    """Serve ``app`` until SIGINT or SIGTERM, then shut down gracefully (requests in flight
    finish). ``ready(url)`` is called once the port listens. Returns the signal's name."""
    import uvicorn

    sock = bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"

    class Server(uvicorn.Server):
        stopped_by: int | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:  # stop; do not re-raise after
            self.stopped_by = sig
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    server = Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            server_header=False,
        )
    )
    if ready is not None:
        ready(url)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return signal.Signals(server.stopped_by).name if server.stopped_by else None
