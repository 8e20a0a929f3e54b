"""The app factory: `create_app(state)` wires the OpenAI- and Anthropic-shaped routes, /health, /metrics and
/openapi.json around one ServerState (its engine included; no global state). `load_state` builds that state
from a model reference for `whale serve`."""

from __future__ import annotations

import time
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from whale.server import anthropic_api, openai_api
from whale.server.auth import api_key_dependency
from whale.server.errors import error_body, install_error_handlers
from whale.server.served_model import served_model_from_loaded
from whale.server.state import ServerState
from whale.server.streaming import StreamTimings

GENERATION_PATHS = ("/chat/completions", "/completions", "/messages")


class RequestAccounting:
    """Counts requests by route and status for /metrics, and turns away generation requests beyond the
    server's concurrency limit with an immediate 429 (as the DeepSeek API does when its limit is reached)."""

    def __init__(self, app: ASGIApp, state: ServerState, known_paths: set[str]):
        self.app = app
        self.state = state
        self.known_paths = known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        route = path if path in self.known_paths else "other"
        metrics = self.state.metrics
        generation = scope["method"] == "POST" and path.endswith(GENERATION_PATHS)
        limit = self.state.max_concurrent_requests
        if generation and limit is not None and metrics.in_flight >= limit:
            body = error_body(429, f"Rate Limit Reached: {metrics.in_flight} requests are in flight, the "
                                   f"limit of this server ({limit}); retry after a brief wait",
                              anthropic=path.startswith("/anthropic"))
            await JSONResponse(body, status_code=429, headers={"Retry-After": "1"})(scope, receive, send)
            metrics.record_request(route, 429)
            return
        status = 500

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


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="whale", version="0.1.0", openapi_url=None, docs_url=None, redoc_url=None,
                  description="DeepSeek-API-compatible server (OpenAI and Anthropic shapes)")
    app.state.whale = state
    install_error_handlers(app)
    auth = [Depends(api_key_dependency(state.api_keys))]
    routers = [openai_api.build_router(), anthropic_api.build_router()]
    for router in routers:
        app.include_router(router, dependencies=auth)

    @app.get("/health", summary="Liveness (no API key needed)")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": state.served.name}

    @app.get("/metrics", dependencies=auth, summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(request.app.openapi())

    # metric labels only for the routes the server has, so stray paths cannot grow the series without bound
    known = {route.path for router in routers for route in router.routes} | {"/health", "/metrics", "/openapi.json"}
    app.add_middleware(RequestAccounting, state=state, known_paths=known)
    return app


def build_state(loaded: Any, *, served_model_name: str | None = None, chat_format: str | None = None,
                engine_options: dict[str, Any] | None = None, max_waiting: int = 256,
                **state_options: Any) -> ServerState:
    """Start an engine thread on a model and describe it for the server. `loaded` is a LoadedModel, or a function
    returning one, which then runs on the engine thread (faster decode: see async_engine.py). `state_options`
    are ServerState fields (api_keys, max_concurrent_requests, timings, system_fingerprint)."""
    from whale.engine.async_engine import AsyncEngine
    from whale.engine.llm_engine import EngineConfig, LLMEngine

    config = EngineConfig(**(engine_options or {}))
    front = AsyncEngine(lambda: LLMEngine(loaded() if callable(loaded) else loaded, config), max_waiting=max_waiting)
    engine = front.engine
    served = served_model_from_loaded(engine.loaded, engine.max_model_len, served_model_name, chat_format,
                                      created=int(time.time()))
    state_options.setdefault("timings", StreamTimings())
    return ServerState(front, served, **state_options)


def load_state(reference: str, *, dtype: str | None = None, device: str | None = None, kernels: str = "auto",
               **options: Any) -> ServerState:
    """Load a model reference (`default`, a .gguf, a checkpoint directory, a hub id) and build its state."""
    from whale.models.loader import load_model

    return build_state(lambda: load_model(reference, dtype=dtype, device=device, kernels=kernels), **options)
