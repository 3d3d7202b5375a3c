"""Who may talk to the server from a browser: the Host check (DNS rebinding) and CORS (``--allowed-origins``).

    request --Host not in the allowed names (when a list is set)--> 403 host_not_allowed
            --Origin header (sent by browsers) not allowed--> 403 origin_not_allowed
            --OPTIONS preflight from an allowed origin--> 204 with the CORS headers
            --otherwise--> the route; an allowed origin gets Access-Control-Allow-Origin on the answer

No origin is allowed by default: a web page can neither read an answer nor send JSON (the JSON routes
take only ``application/json``, which needs a preflight). A server bound to a loopback address answers
only Host names that are loopback (``localhost``, ``127.0.0.1``, ``[::1]``) unless told otherwise, so a
page on a rebinding DNS name cannot reach it through the browser either.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from jaxserve.serving.fields import ApiError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_list(raw: str | None) -> frozenset[str] | None:
    """A comma-separated flag value -> names (lowercased); None: unset; ``*``: {"*"} (any)."""
    if raw is None:
        return None
    return frozenset(s.strip().lower().rstrip("/") for s in raw.split(",") if s.strip())


def allowed_hosts(flag: str | None, bind_host: str) -> frozenset[str] | None:
    """The Host names to accept: the flag's list, or loopback names (``LOOPBACK_NAMES`` and any loopback
    address, e.g. 127.0.0.2) for a loopback bind; None: any."""
    names = parse_list(flag)
    if names is not None:
        return None if "*" in names else names
    return LOOPBACK_NAMES if is_loopback(bind_host) else None


def _host_name(http: web.Request) -> str:
    host = (http.headers.get("Host") or "").strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def make_middleware(origins: Iterable[str], hosts: frozenset[str] | None) -> Callable[..., Any]:
    allowed = frozenset(o.lower().rstrip("/") for o in origins)

    @web.middleware
    async def origin_middleware(http: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        name = _host_name(http)
        if hosts is not None and name not in hosts and not (hosts is LOOPBACK_NAMES and is_loopback(name)):
            raise ApiError(403, "this server does not answer for that Host name (see --allowed-hosts)",
                           code="host_not_allowed")
        origin = http.headers.get("Origin")
        if origin is None:
            return await handler(http)
        if "*" not in allowed and origin.lower().rstrip("/") not in allowed:
            raise ApiError(403, "cross-origin requests from this origin are not allowed (see --allowed-origins)",
                           code="origin_not_allowed")
        if http.method == "OPTIONS":  # the preflight (its Allow-Origin comes from cors_headers)
            return web.Response(status=204, headers={"Access-Control-Allow-Methods": CORS_METHODS,
                                                     "Access-Control-Allow-Headers": CORS_HEADERS,
                                                     "Access-Control-Max-Age": "600"})
        return await handler(http)

    return origin_middleware


async def cors_headers(http: web.Request, resp: web.StreamResponse) -> None:
    """``on_response_prepare``: an answer to an allowed origin says so (streams too, before their headers)."""
    origin = http.headers.get("Origin")
    if origin is not None and resp.status != 403:  # 403: a refused origin or Host
        resp.headers["Access-Control-Allow-Origin"] = origin
        resp.headers["Vary"] = "Origin"
