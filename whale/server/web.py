"""The playground page (whale/web/): `/` sends a browser there; the page and its two files need no API key (the
page asks for one and sends it with its API calls)."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

PAGE_FILES = {"playground.css": "text/css", "playground.js": "text/javascript"}
OPEN_PATHS = ("/", "/playground", *(f"/playground/{name}" for name in PAGE_FILES))


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

    for name, (body, kind) in assets.items():
        router.add_api_route(f"/playground/{name}", lambda body=body, kind=kind: Response(body, media_type=kind,
                                                                                           headers=policy),
                             methods=["GET"])
    return router
