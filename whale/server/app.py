"""The app factory: `create_app(state)` wires the OpenAI- and Anthropic-shaped routes, /health, /metrics and
/openapi.json around one ServerState (its engine included; no global state). `load_state` builds that state
from a model reference for `whale serve`."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from whale.errors import InvalidRequestError
from whale.server import anthropic_api, gateway_api, openai_api, web
from whale.server.asgi import APIKeyGuard, BodySizeLimit, DisconnectWatch, RequestAccounting
from whale.server.errors import install_error_handlers
from whale.server.openapi import Health, error_responses, served_document
from whale.server.served_model import served_model_from_loaded
from whale.server.state import ServerState
from whale.server.streaming import StreamTimings


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="whale", version="0.1.0", openapi_url=None, docs_url=None, redoc_url=None,
                  description="DeepSeek-API-compatible server (OpenAI and Anthropic shapes)")
    app.state.whale = state
    install_error_handlers(app)
    routers = [openai_api.build_router(), anthropic_api.build_router(), gateway_api.build_router(), web.build_router()]
    for router in routers:
        app.include_router(router)

    @app.get("/health", summary="Liveness (no API key needed)", response_model=Health)
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": state.served.name}

    @app.get("/metrics", summary="Prometheus metrics (no API key needed unless the server protects it)",
             response_class=PlainTextResponse, responses=error_responses(401))
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/metrics/recent", summary="The last 50 finished generations, newest first, with their timings (no "
             "text); open or protected as /metrics is", responses=error_responses(401))
    async def recent() -> dict[str, Any]:
        return {"data": [asdict(finished) for finished in reversed(state.metrics.recent)]}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(served_document(request.app, state.served.model_ids))

    # metric labels only for the routes the server has, so stray paths cannot grow the series without bound
    known = {route.path for router in routers for route in router.routes} | {"/health", "/metrics", "/metrics/recent",
                                                                              "/openapi.json"}
    # the last added runs first: accounting sees every answer, a missing key wins over a body's size
    app.add_middleware(DisconnectWatch)
    app.add_middleware(BodySizeLimit, max_bytes=state.max_request_bytes)
    metrics_paths = () if state.protect_metrics else ("/metrics", "/metrics/recent")
    open_paths = ("/health", *metrics_paths, *web.OPEN_PATHS)
    app.add_middleware(APIKeyGuard, keys=state.api_keys, open_paths=open_paths)
    app.add_middleware(RequestAccounting, metrics=state.metrics, known_paths=known,
                       limit=state.max_concurrent_requests)
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


def upstream_state(reference: str, urls: list[str], *, protocol: str = "sglang", upstream_model: str | None = None,
                   upstream_api_key: str | None = None, max_model_len: int | None = None,
                   served_model_name: str | None = None, chat_format: str | None = None,
                   **state_options: Any) -> ServerState:
    """The server over an engine elsewhere (whale.upstream): `reference` gives the tokenizer, chat format and
    context (no weights are read); the tokens come from the first of `urls` that answers, in `protocol`
    ("sglang": SGLang's /generate, "vllm": vLLM's completions with token ids, for the model `upstream_model`,
    default the first the upstream lists)."""
    from whale.engine.llm_engine import eos_token_ids
    from whale.models.loader import load_model
    from whale.upstream.engine import UpstreamEngine, wire_for

    loaded = load_model(reference, weights=False)
    context = loaded.config.max_position_embeddings
    if max_model_len is not None and not 1 < max_model_len <= context:
        raise InvalidRequestError(f"max_model_len {max_model_len} must be in [2, {context}] (the model's context)")
    length = max_model_len or context
    wire = wire_for(protocol, upstream_model)
    engine = UpstreamEngine(list(urls), loaded.tokenizer, length, eos_token_ids(loaded), loaded.config.vocab_size,
                            wire, api_key=upstream_api_key)
    served = served_model_from_loaded(loaded, length, served_model_name, chat_format, created=int(time.time()))
    state_options.setdefault("timings", StreamTimings())
    return ServerState(engine, served, **state_options)
