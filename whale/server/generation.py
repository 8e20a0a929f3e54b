"""One generation request, the same for every API shape: its identity, starting it on the engine, answering with
one body or an event stream, and (for chat) stepping the engine's deltas through the request's output parser. The
OpenAI and Anthropic routes only say how a body, a chunk or an event looks."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from whale.chat import ChatDelta
from whale.engine.async_engine import StreamDelta
from whale.server.served_model import PreparedRequest
from whale.server.state import ServerState, start_generation
from whale.server.streaming import Collected, collect_response, sse_deltas

# an engine delta, a keep-alive comment (str) while the request waits, or the failure that ended it
StreamItem = StreamDelta | str | Exception


class Generation:
    """One request's identity and timing, shared by its chunks and its final body."""

    def __init__(self, state: ServerState, prepared: PreparedRequest, kind: str, id_prefix: str = ""):
        self.state = state
        self.prepared = prepared
        self.id = id_prefix + (uuid.uuid4().hex if id_prefix else str(uuid.uuid4()))
        self.created = int(time.time())
        self.kind = kind  # "chat.completion", "text_completion" or "message"

    def header(self, chunk: bool) -> dict[str, Any]:
        suffix = ".chunk" if chunk and self.kind == "chat.completion" else ""
        return {"id": self.id, "object": self.kind + suffix, "created": self.created, "model": self.prepared.model,
                "system_fingerprint": self.state.system_fingerprint}

    def route_usage(self) -> dict[str, Any]:
        """The usage block's `whale_route` extension: what the complexity route chose (nothing if it did not run)."""
        route = self.prepared.route
        return {} if route is None else {"whale_route": route.usage_field()}

    def logprob_entries(self, delta: StreamDelta) -> list[dict[str, Any]]:
        """OpenAI chat logprobs for the delta's tokens: token text, logprob, UTF-8 bytes, top alternatives."""
        wanted = self.prepared.params.logprobs or 0
        token_text = self.state.served.token_text
        entries = []
        for sampled in delta.logprobs:
            text = token_text(sampled.token_id)
            top = sorted((sampled.top_logprobs or {}).items(), key=lambda kv: -kv[1])[:wanted]
            entries.append({"token": text, "logprob": sampled.logprob, "bytes": list(text.encode()),
                            "top_logprobs": [{"token": token_text(t), "logprob": lp,
                                              "bytes": list(token_text(t).encode())} for t, lp in top]})
        return entries


async def respond(request: Request, gen: Generation, stream: bool, body: Callable[[Collected], dict[str, Any]],
                  events: Callable[[AsyncIterator[StreamItem]], AsyncIterator[str]]) -> Response:
    """Start the request on the engine; answer with one body (`body` of everything collected) or a stream of
    `events` (SSE text) made from the stream items; either carries the complexity route's x-whale-route-* headers
    where it chose the mode."""
    state = gen.state
    engine_stream, first = await start_generation(state, gen.prepared, gen.id, request.scope)
    route = gen.prepared.route.headers() if gen.prepared.route is not None else {}
    if not stream:
        response = await collect_response(request, engine_stream, state.timings, body, first)
        response.headers.update(route)
        return response
    return StreamingResponse(events(sse_deltas(engine_stream, state.timings, first)), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **route})


class ChatRun:
    """A chat reply as it streams: each engine delta through the request's output parser (a failure flushes what
    the parser held back), with what the closing events need: every delta, whether a tool was called, and the
    reasoning text."""

    def __init__(self, gen: Generation):
        self._parser = gen.prepared.parser
        self.collected = Collected()
        self.called = False
        self._reasoning: list[str] = []

    def step(self, item: StreamDelta | Exception) -> ChatDelta:
        if isinstance(item, Exception):
            self.collected.failed = True
            piece = self._parser.finish()
        else:
            self.collected.deltas.append(item)
            piece = self._parser.finish(item.text) if item.finished else self._parser.feed(item.text)
        self.called = self.called or bool(piece.tool_calls)
        self._reasoning.append(piece.reasoning_content)
        return piece

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)
