"""The ASGI layers in front of the routes, written against the ASGI protocol alone so that they behave the same
whatever the web framework's version: request accounting for /metrics with the concurrency limit (429), the API
key check (401, before the body is read), the request-size limit (413, before anything is parsed), and the watch
on the client's connection that lets a generation stop the moment its client goes away."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from whale.server.errors import error_body
from whale.server.metrics import Metrics

GENERATION_PATHS = ("/chat/completions", "/completions", "/messages")
WATCH_SCOPE_KEY = "whale.client_watch"
ARRIVAL_SCOPE_KEY = "whale.arrival"


def _is_anthropic(scope: Scope) -> bool:
    return scope["path"].startswith("/anthropic")


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str,
                  headers: dict[str, str] | None = None) -> None:
    body = error_body(status, message, anthropic=_is_anthropic(scope))
    await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)


class RequestAccounting:
    """Counts requests by route and status for /metrics, and turns away generation requests beyond the
    server's concurrency limit with an immediate 429 (as the DeepSeek API does when its limit is reached)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, known_paths: set[str], limit: int | None):
        self.app = app
        self.metrics = metrics
        self.known_paths = known_paths
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[ARRIVAL_SCOPE_KEY] = time.monotonic()
        path: str = scope["path"]
        route = path if path in self.known_paths else "other"
        metrics = self.metrics
        generation = scope["method"] == "POST" and path.endswith(GENERATION_PATHS)
        if generation and self.limit is not None and metrics.in_flight >= self.limit:
            await _refuse(scope, receive, send, 429,
                          f"Rate Limit Reached: {metrics.in_flight} requests are in flight, the limit of this "
                          f"server ({self.limit}); retry after a brief wait", headers={"Retry-After": "1"})
            metrics.record_request(route, 429)
            return
        status = 499  # nothing was sent: the client left first

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.in_flight += generation
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            metrics.in_flight -= generation
            metrics.record_request(route, status)


def presented_key(scope: Scope) -> str | None:
    """`Authorization: Bearer KEY` or `x-api-key: KEY`."""
    headers = {name.lower(): value for name, value in scope["headers"]}
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get(b"x-api-key", b"").decode("latin-1") or None


class APIKeyGuard:
    """Refuses every request but those to `open_paths` (/health; /metrics unless protected) without one of
    `keys`, before its body is read, so that a missing key is the answer whatever else is wrong with it."""

    def __init__(self, app: ASGIApp, keys: Sequence[str], open_paths: Sequence[str] = ("/health",)):
        self.app = app
        self.accepted = [k.encode() for k in keys if k]
        self.open_paths = tuple(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.accepted or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        key = presented_key(scope)
        if key is None:
            await _refuse(scope, receive, send, 401, "Authentication Fails: no API key was sent; pass it as "
                                                     "'Authorization: Bearer KEY' (or 'x-api-key: KEY')")
            return
        # compare against every key without stopping early, so timing does not tell which prefix matched
        matches = [secrets.compare_digest(key.encode(), k) for k in self.accepted]
        if not any(matches):
            await _refuse(scope, receive, send, 401, f"Authentication Fails: the API key ****{key[-4:]} is "
                                                     "invalid; check the key the server was started with "
                                                     "(--api-key)")
            return
        await self.app(scope, receive, send)


class BodySizeLimit:
    """Answers 413 to a body over `max_bytes` before the JSON is parsed: at once from its Content-Length, or,
    for a chunked body, as soon as what arrived passes the limit (such a body is read here, then replayed)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        await _refuse(scope, receive, send, 413, f"Request Entity Too Large: the request body is {size} bytes, over "
                                                 f"this server's limit of {self.max_bytes} bytes; shorten the "
                                                 "prompt, or start the server with a larger --max-request-bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:  # the server holds the body to this length
            if not length.isdigit() or int(length) <= self.max_bytes:
                await self.app(scope, receive, send)
            else:
                await self._too_large(scope, receive, send, length.decode())
            return
        chunks: list[Message] = []
        received = 0
        while True:
            message = await receive()
            chunks.append(message)
            if message["type"] != "http.request":
                break
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                await self._too_large(scope, receive, send, f"more than {received - 1}")
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return chunks.pop(0) if chunks else await receive()

        await self.app(scope, replay, send)


class ClientWatch:
    """Learns that a request's client went away from the ASGI `receive` channel itself. Once the app has read
    the whole body, a watcher task waits for `http.disconnect` beside the generation and sets `gone`; the
    app's own later calls to `receive` (Starlette's streaming responses listen too) wait on the same event."""

    def __init__(self, receive: Receive):
        self._receive = receive
        self._watcher: asyncio.Task | None = None
        self.gone = asyncio.Event()

    async def receive(self) -> Message:
        if self._watcher is None and not self.gone.is_set():
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.gone.set()
            elif not message.get("more_body", False):
                self._watcher = asyncio.ensure_future(self._watch())
            return message
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.gone.set()

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()


class ClientDisconnected(Exception):
    """The client of this request went away: there is nobody left to answer."""


class DisconnectWatch:
    """Gives each HTTP request a ClientWatch (in its scope, for `client_gone`), and ends a request quietly when
    the route stopped because its client disconnected."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        watch = ClientWatch(receive)
        scope[WATCH_SCOPE_KEY] = watch
        try:
            await self.app(scope, watch.receive, send)
        except* ClientDisconnected:
            pass  # the generation was aborted where it noticed; there is no one to send anything to
        finally:
            watch.stop()


def client_gone(scope: Scope) -> asyncio.Event | None:
    """The event set when the request's client disconnects (None outside DisconnectWatch)."""
    watch = scope.get(WATCH_SCOPE_KEY)
    return watch.gone if watch is not None else None


def request_arrival(scope: Scope) -> float:
    """When the request arrived (time.monotonic), as RequestAccounting stamped it; now outside it."""
    return scope.get(ARRIVAL_SCOPE_KEY) or time.monotonic()
