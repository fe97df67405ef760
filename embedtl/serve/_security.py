"""The server's guards, as one ASGI middleware in front of the app: the Host header (a page on
another site cannot reach a loopback server through DNS rebinding), the origin (a page on
another site cannot make the browser send it requests), the token (when the server listens
beyond loopback), the upload cap (counted on the bytes received, whatever the request
declares) and headers that keep pages from loading anything from elsewhere. HEAD is answered
as GET, without the body."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from ..errors import UploadTooLargeError

__all__ = [
    "MIN_TOKEN_CHARS",
    "TOKEN_COOKIE",
    "TOKEN_HEADER",
    "Guard",
    "Tokens",
    "TooManyLogins",
    "is_loopback",
]

TOKEN_HEADER = "x-embedtl-token"
TOKEN_COOKIE = "embedtl_token"
#: A token shorter than this is warned about (`embedtl serve --token` alone makes a longer one).
MIN_TOKEN_CHARS = 16
#: Paths served without the token: the page that asks for it, and what that page loads.
OPEN_PATHS = ("/login", "/static/")
#: Sec-Fetch-Site values of a request made by this server's own pages (or typed by the user).
OWN_SITES = ("same-origin", "none")

_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
        b"style-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        b"form-action 'self'",
    ),
]


def is_loopback(host: str) -> bool:
    """True when ``host`` (a name or IP, IPv6 maybe in brackets) is ``localhost`` or a loopback
    address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _split_host(value: str) -> tuple[str, str]:
    """(name, port) of a Host header; the port is "" when it names none
    (``[::1]:80`` -> (``::1``, ``80``))."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return value, ""
        rest = value[end + 1 :]
        return value[1:end], rest[1:] if rest.startswith(":") else ""
    if value.count(":") == 1:
        name, _, port = value.partition(":")
        return name, port
    return value, ""


def _host_name(value: str) -> str:
    """The name of a Host header, without its port (``[::1]:80`` -> ``::1``)."""
    return _split_host(value)[0]


_DEFAULT_PORTS = {"http": "80", "https": "443"}


def same_origin(origin: str, scheme: str, host: str) -> bool:
    """Whether an Origin header names the server as the request reached it: the same host name
    and port as the Host header (a default port, 80 or 443, may be left out by either)."""
    try:
        o = urlsplit(origin.strip().lower())
        o_port = str(o.port) if o.port is not None else ""
    except ValueError:
        return False
    if not o.hostname or o.scheme not in _DEFAULT_PORTS:
        return False  # "null" (a sandboxed frame, a file), another scheme
    name, port = _split_host(host)
    o_port = "" if o_port == _DEFAULT_PORTS[o.scheme] else o_port
    port = "" if port == _DEFAULT_PORTS.get(scheme) else port
    return o.hostname.strip("[]") == name and o_port == port


def cross_site(scope: dict[str, Any], headers: dict[str, str]) -> str | None:
    """Why a request was sent by a page of another site, or None. An ``Origin`` other than the
    server's own, or a ``Sec-Fetch-Site`` other than same-origin (or none: typed, bookmarked).
    A top-level GET navigation (a link to the server followed from elsewhere) is allowed: the
    page that had the link cannot read what it opens. A request with neither header (curl, a
    script) is allowed as before."""
    origin = headers.get("origin")
    if origin is not None and not same_origin(
        origin, scope.get("scheme", "http"), headers.get("host", "")
    ):
        return f"a request from the page of another site ({origin[:100]}): refused"
    site = headers.get("sec-fetch-site")
    if site is not None and site not in OWN_SITES:
        navigation = headers.get("sec-fetch-mode") == "navigate" and scope["method"] in (
            "GET",
            "HEAD",
        )
        if not navigation:
            return f"a request from the page of another site (Sec-Fetch-Site: {site[:40]}): refused"
    return None


class TooManyLogins(Exception):
    """More failed logins are queued than the throttle lets through in ``wait`` seconds."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"too many attempts: try again in {wait:.0f} s")
        self.wait = wait


class Tokens:
    """The server's token and what stands for it. The cookie holds an HMAC of the token with a
    key made for this process, never the token: a leaked cookie does not give the token away,
    and logins end with the process (a restart asks for the token again). Logins are checked
    one at a time, ``interval`` seconds apart while they come faster; a login that would wait
    more than ``max_wait`` seconds is refused at once."""

    def __init__(self, token: str | None, interval: float = 0.5, max_wait: float = 30.0) -> None:
        self.token = token
        self.interval, self.max_wait = interval, max_wait
        self._key = secrets.token_bytes(32)
        self.cookie = (
            hmac.new(self._key, token.encode(), hashlib.sha256).hexdigest() if token else None
        )
        self._lock = threading.Lock()
        self._next = 0.0
        self.attempts = 0

    def _same(self, given: str | None, expected: str | None) -> bool:
        if given is None or expected is None:
            return False
        return hmac.compare_digest(given.encode(), expected.encode())

    def accepts(self, headers: dict[str, str]) -> bool:
        """Whether a request carries the token (header) or the login cookie."""
        given = headers.get(TOKEN_HEADER)
        auth = headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if given is not None:
            return self._same(given, self.token)
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == TOKEN_COOKIE and self._same(value, self.cookie):
                return True
        return False

    async def login(self, given: str) -> bool:
        """Whether ``given`` is the token, answered in turn (see the class)."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            if start - now > self.max_wait:
                raise TooManyLogins(start - now)
            self._next = start + self.interval
            self.attempts += 1
        if start > now:
            await asyncio.sleep(start - now)
        return self._same(given, self.token)


@dataclass
class Guard:
    """ASGI middleware: ``allowed_hosts`` ("*" allows any), ``tokens`` (its token None: none
    asked), ``max_body`` bytes per request."""

    app: Any
    allowed_hosts: Iterable[str]
    tokens: Tokens
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
        why = cross_site(scope, headers)
        if why is not None:
            return await _json(send, 403, why, "CrossSiteRequest")
        path = scope.get("path", "")
        if (
            self.tokens.token is not None
            and not path.startswith(OPEN_PATHS)
            and not self.tokens.accepts(headers)
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

        head = scope["method"] == "HEAD"
        if head:  # answered as GET: the same status and headers, no body
            scope = {**scope, "method": "GET"}
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
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app(scope, limited_receive, send_with_headers)

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
