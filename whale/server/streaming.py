"""Between the engine and the HTTP response: wait for deltas without blocking the loop, send keep-alives while a
request waits (SSE `: keep-alive` comments when streaming, blank lines before a JSON body otherwise), and abort
the request the moment its client goes away (asgi.ClientWatch tells, streaming or not)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from whale.engine.async_engine import StreamDelta
from whale.errors import WhaleError
from whale.server.asgi import ClientDisconnected
from whale.server.errors import error_body, is_anthropic, status_of
from whale.server.metrics import GenerationTimer

SSE_KEEPALIVE = ": keep-alive\n\n"
JSON_KEEPALIVE = "\n"
RESOURCE_FINISH = "insufficient_system_resource"  # DeepSeek's finish_reason when generation is cut short


@dataclass(frozen=True)
class StreamTimings:
    keepalive_s: float = 10.0  # how long a request may wait silently before the first keep-alive
    first_wait_s: float = 0.25  # how long to wait for a refusal from the engine before committing to a 200


@dataclass
class Collected:
    """Every delta of one request so far, and how it ended."""

    deltas: list[StreamDelta] = field(default_factory=list)
    failed: bool = False

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def finish_reason(self) -> str:
        if self.failed or not self.deltas:
            return RESOURCE_FINISH
        return self.deltas[-1].finish_reason or RESOURCE_FINISH

    @property
    def reasoning_tokens(self) -> int | None:
        """The engine's exact count of reasoning tokens, where it tracks them."""
        return self.deltas[-1].reasoning_tokens if self.deltas else None

    def usage_counts(self) -> tuple[int, int, int]:
        """(prompt, completion, cached) tokens."""
        if not self.deltas:
            return 0, 0, 0
        last = self.deltas[-1]
        return last.prompt_tokens, last.completion_tokens, last.cached_tokens


class EngineStream:
    """One engine request read delta by delta with timeouts, until its client goes away (`gone`). `close()` is
    synchronous so that it still aborts the request from code that is being cancelled."""

    def __init__(self, deltas: AsyncIterator[StreamDelta], background: set[asyncio.Task],
                 gone: asyncio.Event | None = None, timer: GenerationTimer | None = None):
        self._deltas = deltas
        self._timer = timer  # told of every delta as it arrives, and of the end
        self._pending: asyncio.Task | None = None
        self._background = background  # strong references to close tasks, owned by the app
        self._gone = asyncio.ensure_future(gone.wait()) if gone is not None else None
        self.closed = False

    async def next(self, timeout: float | None) -> StreamDelta | None:
        """The next delta; None when `timeout` passed first (the read stays pending for the next call).
        Raises ClientDisconnected, having aborted the request, when the client left first."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(anext(self._deltas))
        waiting = {self._pending} if self._gone is None else {self._pending, self._gone}
        done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self._gone is not None and self._gone in done:
            self.close()
            raise ClientDisconnected
        if not done:
            return None
        task, self._pending = self._pending, None
        delta = task.result()
        if self._timer is not None:
            self._timer.saw(delta)
        return delta

    def close(self) -> None:
        """Abort the request if it is still running (the engine frees its blocks at once)."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.finish()
        if self._gone is not None:
            self._gone.cancel()
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()  # the generator's own cleanup sends the abort
        else:
            closing = asyncio.ensure_future(self._deltas.aclose())
            self._background.add(closing)
            closing.add_done_callback(self._background.discard)


async def collect_response(request: Request, stream: EngineStream, timings: StreamTimings,
                           build: Callable[[Collected], dict[str, Any]], first: StreamDelta | None) -> Response:
    """Non-streaming: the JSON body once the request ends. If it is still waiting after `keepalive_s`, the
    response switches to a body that starts with blank lines (clients' JSON parsers skip them)."""
    deadline = asyncio.get_running_loop().time() + timings.keepalive_s
    collected = Collected([first] if first is not None else [])
    handed_off = False
    try:
        while not (collected.deltas and collected.deltas[-1].finished):
            delta = await stream.next(max(0.0, deadline - asyncio.get_running_loop().time()))
            if delta is None:
                handed_off = True
                return StreamingResponse(_keepalive_body(request, stream, timings, build, collected),
                                         media_type="application/json")
            collected.deltas.append(delta)
        return JSONResponse(build(collected))
    except WhaleError:
        if not collected.deltas:
            raise
        collected.failed = True
        return JSONResponse(build(collected))
    finally:
        if not handed_off:
            stream.close()


async def _keepalive_body(request: Request, stream: EngineStream, timings: StreamTimings,
                          build: Callable[[Collected], dict[str, Any]], collected: Collected) -> AsyncIterator[str]:
    try:
        while True:
            try:
                delta = await stream.next(timings.keepalive_s)
            except WhaleError as exc:
                if not collected.deltas:
                    yield json.dumps(error_body(status_of(exc), str(exc), anthropic=is_anthropic(request)))
                    return
                collected.failed = True
                yield json.dumps(build(collected))
                return
            if delta is None:
                yield JSON_KEEPALIVE
                continue
            collected.deltas.append(delta)
            if delta.finished:
                yield json.dumps(build(collected))
                return
    finally:
        stream.close()


async def sse_deltas(stream: EngineStream, timings: StreamTimings,
                     first: StreamDelta | None) -> AsyncIterator[StreamDelta | str | Exception]:
    """The request's deltas for an SSE body, with keep-alive comments (as str) while it waits; a failure after
    the stream started comes through as the exception, for the route to end its stream with."""
    try:
        if first is not None:
            yield first
            if first.finished:
                return
        while True:
            try:
                delta = await stream.next(timings.keepalive_s)
            except WhaleError as exc:
                yield exc
                return
            if delta is None:
                yield SSE_KEEPALIVE
                continue
            yield delta
            if delta.finished:
                return
    finally:
        stream.close()


async def first_delta(stream: EngineStream, timings: StreamTimings) -> StreamDelta | None:
    """Wait briefly for the first delta before committing to a 200: refusals (a full engine, a prompt the
    engine will not take) arrive at once and still get their own status code."""
    try:
        return await stream.next(min(timings.keepalive_s, timings.first_wait_s))
    except BaseException:
        stream.close()
        raise


def sse(payload: dict[str, Any] | str) -> str:
    if isinstance(payload, str):
        return f"data: {payload}\n\n"
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
