"""The playground page (whale/web/): `/` sends a browser there; the page, its two files and its planner (`whale
plan` over the catalog's models, no hub or file lookups) need no API key (the page asks for one and sends it with
its API calls)."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from whale.errors import WhaleError
from whale.planner.catalog import CATALOG
from whale.planner.cli import parse_tokens
from whale.planner.gpus import GPUS, resolve_gpu
from whale.planner.memory import WEIGHT_FORMATS
from whale.planner.plan import make_plan, plan_request
from whale.server.errors import APIError

PAGE_FILES = {"playground.css": "text/css", "playground.js": "text/javascript"}
OPEN_PATHS = ("/", "/playground", "/playground/catalog", "/playground/plan",
              *(f"/playground/{name}" for name in PAGE_FILES))


def _read(name: str) -> bytes:
    return files("whale.web").joinpath(name).read_bytes()


def build_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)
    page = _read("playground.html")
    assets = {name: (_read(name), kind) for name, kind in PAGE_FILES.items()}
    # the page loads only from this server (no inline script, no other host)
    policy = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'",
              "Cache-Control": "no-cache"}

    @router.get("/")
    async def root() -> RedirectResponse:
        return RedirectResponse("/playground")

    @router.get("/playground")
    async def playground() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=policy)

    @router.get("/playground/catalog")
    async def catalog() -> dict[str, Any]:
        return {"models": [{"name": name, "display_name": spec.display_name} for name, spec in CATALOG.items()],
                "gpus": list(GPUS), "dtypes": list(WEIGHT_FORMATS)}

    @router.get("/playground/plan")
    async def plan(model: str, gpu: str = "H100", context: str | None = None, concurrency: int = 1,
                   dtype: str | None = None) -> dict[str, Any]:
        return plan_json(model, gpu, context, concurrency, dtype)

    for name, (body, kind) in assets.items():
        router.add_api_route(f"/playground/{name}", lambda body=body, kind=kind: Response(body, media_type=kind,
                                                                                           headers=policy),
                             methods=["GET"])
    return router


def plan_json(model: str, gpu: str, context: str | None, concurrency: int, dtype: str | None) -> dict[str, Any]:
    """`whale plan MODEL --gpu GPU --context C --concurrency N --dtype D --json` for a catalog model."""
    if model not in CATALOG:
        raise APIError(400, f"unknown model {model!r}: the page plans the catalog's models ({', '.join(CATALOG)}); "
                            "`whale plan` also reads config files and hub ids", param="model")
    if dtype is not None and dtype not in WEIGHT_FORMATS:
        raise APIError(400, f"dtype {dtype!r}: choose one of {', '.join(WEIGHT_FORMATS)}", param="dtype")
    try:
        request = plan_request(CATALOG[model], resolve_gpu(gpu), context=parse_tokens(context) if context else None,
                               concurrency=concurrency, dtype=dtype)
        return make_plan(request).to_json()
    except WhaleError as exc:
        raise APIError(400, str(exc)) from exc
