"""The connection layer under the HTTP app: a cap on open connections, answers to malformed HTTP, quiet logs.

    accept --GuardedSite's protocol factory--> over ``max_connections`` open: a 503 JSON answer, closed
        (one rate-limited WARNING for all of them, never a line per connection)
    --else--> aiohttp's RequestHandler, as ``_Handler``:
        malformed HTTP (a 64 KB header, 200 headers, CL + TE, a bad chunk size) --> 400 JSON in OpenAI's
            error shape naming the kind of fault, never echoing the client's bytes; one WARNING per
            client address a minute at most, no traceback
        a client that half-closes after its request --> still answered (``probe_half_closed`` tells a
            client that left entirely from one that only closed its sending side)
        headers that do not arrive --> closed by aiohttp's keep-alive timer (``--keep-alive-timeout``),
            which runs from the connection's start and is not reset by a trickle of header bytes;
            bodies are bounded by ``--body-timeout`` in the app (``api_server.read_body``)

``quiet_accept_errors`` installs a loop exception handler that turns asyncio's per-connection
``accept()`` errors (e.g. out of file descriptors) into one WARNING every 10 s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import time
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)


class RateLimited:
    """Log at most one line per ``key`` per ``every_s`` seconds; counts what it held back."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last: dict[Any, float] = {}
        self.held: dict[Any, int] = {}

    def warn(self, key: Any, msg: str, *args: Any) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -1e18) < self.every_s:
            self.held[key] = self.held.get(key, 0) + 1
            return False
        if len(self._last) > 10_000:  # many clients: forget the old ones
            self._last.clear()
        self._last[key] = now
        more = self.held.pop(key, 0)
        log.warning(msg + (f" ({more} more like it not logged)" if more else ""), *args)
        return True


_PARSE_LOG = RateLimited(60.0)
_REFUSE_LOG = RateLimited(10.0)
_ACCEPT_LOG = RateLimited(10.0)


def error_body(status: int, message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500 else
                                 "server_error", "param": None, "code": code}}).encode()


def _fault(exc: BaseException | None) -> str:
    """The kind of HTTP fault, from the parser's exception class only (its message may quote the client)."""
    name = type(exc).__name__ if exc is not None else "BadHttpMessage"
    return {"LineTooLong": "a request line or header is too long",
            "BadStatusLine": "the request line is malformed", "BadHttpMethod": "the request method is malformed",
            "InvalidHeader": "a header is malformed", "TransferEncodingError": "the chunked body is malformed",
            "ContentLengthError": "the body does not match its Content-Length",
            "InvalidURLError": "the request target is malformed"}.get(name, "the HTTP request is malformed")


_HALF_CLOSED: dict[int, float] = {}  # handler id -> last probe time: its client half-closed mid-request
PROBE_EVERY_S = 0.2
_PROBE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Handler(RequestHandler):
    """aiohttp's handler with JSON answers to malformed HTTP and half-closed clients served (see the
    module docstring)."""

    __slots__ = ()

    def eof_received(self) -> bool | None:
        """A client that half-closes after sending its request (``shutdown(SHUT_WR)``) still gets the
        answer: the write side stays open while a request is queued or running, then closes (requests
        pipelined behind the first are not answered). One that half-closes inside a body waits for
        ``--body-timeout`` and gets its 408."""
        idle = self._waiter is not None and not self._waiter.done()  # waiting for a request to arrive
        if idle and not self._messages:
            return None  # nothing to answer: close
        _HALF_CLOSED[id(self)] = 0.0
        self.close()  # no request can follow: close once the answers are out
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        _HALF_CLOSED.pop(id(self), None)
        super().connection_lost(exc)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # the response has started: nothing more can be said
            raise ConnectionError("response already started")
        what = _fault(exc) if status < 500 else "internal server error"
        peer = request.remote or "?"
        _PARSE_LOG.warn(peer, "HTTP %d to %s: %s (%s)", status, peer, what, type(exc).__name__ if exc else "-")
        code = "invalid_http" if status < 500 else ("timeout" if status == 504 else "internal_error")
        resp = web.Response(status=status, body=error_body(status, what, code), content_type="application/json")
        resp.force_close()
        return resp


def probe_half_closed(http: web.Request) -> None:
    """A half-closed client may have left entirely (a FIN looks the same): while its answer has not
    started, send it an interim ``100 Continue`` (which HTTP/1.1 clients must skip) at most every
    ``PROBE_EVERY_S``; a client that is gone answers the first with a reset, so the next write fails
    and the transport closes, which is how the request learns to abort."""
    key = id(http.protocol)
    last = _HALF_CLOSED.get(key)
    if last is None or http.version < (1, 1) or http.writer.output_size > 0 or http.transport is None:
        return
    now = time.monotonic()
    if now - last >= PROBE_EVERY_S:
        _HALF_CLOSED[key] = now
        http.transport.write(_PROBE)


class _Refuse(asyncio.Protocol):
    """Answers one connection over the cap with 503 and closes it."""

    def __init__(self, cap: int) -> None:
        self.cap = cap

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        body = error_body(503, f"too many open connections (limit {self.cap}); retry shortly", "too_many_connections")
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        transport.write(head + body)  # type: ignore[attr-defined]
        # closing with the client's request unread would send a reset that can beat the answer: end our
        # side, drop what arrives, close a moment later
        if transport.can_write_eof():  # type: ignore[attr-defined]
            transport.write_eof()  # type: ignore[attr-defined]
        asyncio.get_running_loop().call_later(0.1, transport.close)
        _REFUSE_LOG.warn("cap", "refusing connections: %d open (--max-connections %d)", self.cap, self.cap)

    def data_received(self, data: bytes) -> None:
        pass


BACKLOG = 100  # connections asyncio may accept in one go, before any is refused and closed


def default_max_connections(margin: int = 2 * BACKLOG + 28) -> int:
    """What the process's file-descriptor limit leaves after the descriptors open now (the engine's,
    XLA's, Ray's) and ``margin``: asyncio accepts up to ``BACKLOG`` sockets per loop turn before their
    protocols exist (and so before any is counted or refused), so a burst can hold about two turns'
    worth beyond the cap. Should ``accept()`` still run out (a tiny limit, a huge burst), asyncio
    pauses accepting for a second and ``quiet_accept_errors`` logs it once per 10 s."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: assume a modest count
        used = 64
    return max(8, soft - used - margin)


class GuardedSite(web.TCPSite):
    """A TCPSite whose connections go through the cap and ``_Handler`` (see the module docstring)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, max_connections: int) -> None:
        super().__init__(runner, host, port)
        self.max_connections = max_connections
        self.refused = 0

    def _protocol(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        assert server is not None
        if len(server.connections) >= self.max_connections:
            self.refused += 1
            return _Refuse(self.max_connections)
        handler = server()
        handler.__class__ = _Handler  # same slots: only handle_error differs
        return handler

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, self._host, self._port, reuse_address=True,
                                                backlog=BACKLOG)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio's accept() failures (no file descriptors left) as one WARNING per 10 s, no traceback."""
    default = loop.get_exception_handler()

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        msg = str(context.get("message", ""))
        if "accept" in msg:
            _ACCEPT_LOG.warn("accept", "%s: %s", msg, context.get("exception"))
        elif default is not None:
            default(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)
