"""The server's guards, as one ASGI middleware in front of the app: the Host header (a page on
another site cannot reach a loopback server through DNS rebinding), the token (when the
server listens beyond loopback), the upload cap (counted on the bytes received, whatever the
request declares) and headers that keep pages from loading anything from elsewhere."""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ..errors import UploadTooLargeError

__all__ = ["Guard", "TOKEN_COOKIE", "TOKEN_HEADER", "is_loopback"]

TOKEN_HEADER = "x-embedtl-token"
TOKEN_COOKIE = "embedtl_token"
#: Paths served without the token: the page that asks for it, and what that page loads.
OPEN_PATHS = ("/login", "/static/")

_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
        b"style-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    ),
]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(value: str) -> str:
    """The name of a Host header, without its port (``[::1]:80`` -> ``::1``)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@dataclass
class Guard:
    """ASGI middleware: ``allowed_hosts`` ("*" allows any), ``token`` (None: none asked),
    ``max_body`` bytes per request."""

    app: Any
    allowed_hosts: Iterable[str]
    token: str | None
    max_body: int

    def __post_init__(self) -> None:
        self.allowed_hosts = {h.lower().strip("[]") for h in self.allowed_hosts}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = _host_name(headers.get("host", ""))
        if "*" not in self.allowed_hosts and host not in self.allowed_hosts:
            return await _json(send, 421, f"this server does not answer for host {host!r}", "Host")
        path = scope.get("path", "")
        if (
            self.token is not None
            and not path.startswith(OPEN_PATHS)
            and not self._has_token(headers)
        ):
            if path.startswith("/api/") or path == "/openapi.json":
                return await _json(
                    send,
                    401,
                    f"this server needs its token: send it as the {TOKEN_HEADER} header "
                    "(or Authorization: Bearer TOKEN)",
                    "Unauthorized",
                )
            target = path + ("?" + scope["query_string"].decode() if scope["query_string"] else "")
            return await _redirect(send, "/login?next=" + quote(target, safe=""))
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return await _json(send, 413, self._too_large(), "UploadTooLargeError")

        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:  # a body without (or beyond) its Content-Length
                    raise UploadTooLargeError(self._too_large())
            return message

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, limited_receive, send_with_headers)

    def _has_token(self, headers: dict[str, str]) -> bool:
        given = headers.get(TOKEN_HEADER)
        auth = headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if given is None:
            for part in headers.get("cookie", "").split(";"):
                name, _, value = part.strip().partition("=")
                if name == TOKEN_COOKIE:
                    given = value
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def _too_large(self) -> str:
        return f"the request is over this server's upload cap of {self.max_body / 1e6:.0f} MB"


async def _json(send, status: int, message: str, type_name: str) -> None:
    body = json.dumps({"error": message, "type": type_name}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *_SECURITY_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _redirect(send, location: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 303,
            "headers": [(b"location", location.encode()), (b"content-length", b"0")],
        }
    )
    await send({"type": "http.response.body", "body": b""})
