"""Every error the server returns, mapped to HTTP in one place: the DeepSeek error table (400, 401, 422, 429,
500, 503) in OpenAI's body shape, or Anthropic's shape on the /anthropic routes."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from whale.errors import WhaleError
from whale.server.protocol import UNSUPPORTED

log = logging.getLogger("whale.server")

# OpenAI-shape `type` per status; DeepSeek sends "invalid_request_error" for request problems.
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                405: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                500: "server_error", 503: "server_overloaded"}
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                   405: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                   500: "api_error", 503: "overloaded_error"}
# pydantic error types that mean "the body is not the right shape" (400) rather than "a value is out of
# range" (422), following the DeepSeek table's Invalid Format / Invalid Parameters split.
# An input the server cannot take (an image part, n > 1) is a 400 too.
_FORMAT_ERRORS = ("missing", "json_invalid", "model_type", "model_attributes_type", "dict_type", "list_type",
                  UNSUPPORTED)


class APIError(Exception):
    """An error with its HTTP status, raised anywhere in the server."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers


def is_anthropic(request: Request) -> bool:
    return request.url.path.startswith("/anthropic")


def error_body(status: int, message: str, param: str | None = None, anthropic: bool = False) -> dict:
    if anthropic:
        return {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
    kind = OPENAI_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": kind}}


def error_response(request: Request, status: int, message: str, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, is_anthropic(request)), status_code=status,
                        headers=headers)


def status_of(exc: Exception) -> int:
    if isinstance(exc, APIError):
        return exc.status
    if isinstance(exc, WhaleError):
        return exc.http_status
    return 500


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def validation_message(exc: RequestValidationError) -> tuple[int, str, str | None]:
    """(status, message naming the fields, first field) for a body pydantic refused."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request body", "type": "missing"}
    kind = str(first.get("type", ""))
    status = 400 if kind in _FORMAT_ERRORS or kind.endswith(("_type", "_parsing")) else 422
    if kind == "json_invalid":
        return 400, "the request body is not valid JSON: send a JSON object", None
    described = []
    for error in errors[:3]:
        message = str(error.get("msg", "")).removeprefix("Value error, ")
        described.append(f"{_field(tuple(error.get('loc', ())))}: {message}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    text = "invalid request: " + "; ".join(described) + more + ". Fix these fields and retry."
    return status, text, _field(tuple(first.get("loc", ())))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message, param = validation_message(exc)
        return error_response(request, status, message, param)

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc.status, exc.message, exc.param, exc.headers)

    @app.exception_handler(WhaleError)
    async def _whale(request: Request, exc: WhaleError) -> JSONResponse:
        status = exc.http_status if exc.http_status != 404 else 400  # a model the server does not serve
        return error_response(request, status, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s", request.url.path)
        return error_response(request, 500, f"internal server error ({type(exc).__name__}); retry after a "
                                            "brief wait, and report it if it persists")
