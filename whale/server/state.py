"""What one server instance holds (no globals: the app factory receives it), and starting a request on the
engine with the refusals that must come before a 200: a full engine (503) or a prompt it will not take."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Scope

from whale.engine.async_engine import StreamDelta
from whale.route.policy import AUTO_NAMES, Router
from whale.server.asgi import client_gone, request_arrival
from whale.server.metrics import Metrics, engine_gauges
from whale.server.served_model import PreparedRequest, ServedModel
from whale.server.streaming import EngineStream, StreamTimings, first_delta

# A request body may carry this many bytes per token of context (JSON-escaped text runs ~4-10 bytes a token),
# and never less than MIN_REQUEST_BYTES (tools, long system prompts on a small model).
REQUEST_BYTES_PER_TOKEN, MIN_REQUEST_BYTES = 32, 2 << 20


@dataclass
class ServerState:
    """`engine` is an AsyncEngine (or anything with its `generate(prompt_ids, params, request_id)`)."""

    engine: Any
    served: ServedModel
    api_keys: tuple[str, ...] = ()
    max_concurrent_requests: int | None = None  # generation requests beyond this get a 429 at once
    max_request_bytes: int | None = None  # bodies over this get a 413; None: from the context length
    protect_metrics: bool = False  # /metrics needs the API key too (open by default, for scrapers)
    timings: StreamTimings = field(default_factory=StreamTimings)
    system_fingerprint: str = "fp_whale"
    metrics: Metrics | None = None
    background: set[asyncio.Task] = field(default_factory=set)
    router: Router | None = None  # the complexity route (whale.route), which also serves deepseek-auto / auto
    band_engines: dict[str, Any] = field(default_factory=dict)  # route band -> the engine elsewhere it runs on

    def __post_init__(self) -> None:
        if self.router is not None:
            self.served.route_names = AUTO_NAMES
        if self.max_request_bytes is None:
            self.max_request_bytes = max(MIN_REQUEST_BYTES, REQUEST_BYTES_PER_TOKEN * self.served.max_model_len)
        if self.metrics is None:
            self.metrics = Metrics(lambda: engine_gauges(self.engine))


    @property
    def engines(self) -> list[Any]:
        return [self.engine, *self.band_engines.values()]

    def engine_for(self, prepared: PreparedRequest) -> Any:
        """The engine a request runs on: its route band's, where that band has one, else the server's."""
        route = prepared.route
        return self.band_engines.get(route.band, self.engine) if route is not None else self.engine

    def fail_all(self, message: str) -> None:
        """End every request in flight on every engine (safe from any thread)."""
        for engine in self.engines:
            engine.fail_all(message)

    def shutdown(self) -> None:
        for engine in self.engines:
            engine.shutdown()


async def start_generation(state: ServerState, prepared: PreparedRequest, request_id: str,
                           scope: Scope) -> tuple[EngineStream, StreamDelta | None]:
    """Submit the request of the HTTP request `scope`; engine refusals raise here (mapped to their status).
    Returns the stream, which stops when the client disconnects and times every token for /metrics, and its
    first delta if it came within the short first wait."""
    deltas = state.engine_for(prepared).generate(prepared.prompt_ids, prepared.params, request_id)
    timer = state.metrics.timer(request_arrival(scope), request_id, scope["path"])
    stream = EngineStream(deltas, state.background, client_gone(scope), timer)
    return stream, await first_delta(stream, state.timings)
