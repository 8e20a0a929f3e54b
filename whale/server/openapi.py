"""What /openapi.json says a route answers: the response bodies (documentation only: the routes build plain
dicts, tests/server/test_server_fuzz.py checks that every answer matches this) and every status a route
returns, each with the DeepSeek error body, or Anthropic's on the /anthropic route."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    type: Literal["error"]
    error: AnthropicErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_cache_hit_tokens: int
    prompt_cache_miss_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter", "insufficient_system_resource"]


class ChatCompletion(BaseModel):
    """The non-streaming body; with `stream: true` the same content comes as `chat.completion.chunk` events."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length", "insufficient_system_resource"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class AnthropicUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int


class AnthropicMessageResponse(BaseModel):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
    stop_sequence: str | None
    usage: AnthropicUsage


class AnthropicTokenCount(BaseModel):
    input_tokens: int


class Health(BaseModel):
    status: Literal["ok"]
    model: str


_MEANINGS = {
    400: "Invalid format, or an input this model or server cannot take (the message says what to change)",
    401: "No API key, or a wrong one (only when the server was started with --api-key)",
    404: "No such model on this server (GET /models/{model}): the message lists the ones it serves",
    413: "The request body is larger than the server accepts (--max-request-bytes)",
    422: "A value out of its valid range",
    429: "More requests in flight than the server's --max-concurrent-requests",
    500: "The engine failed this request (the server and other requests go on)",
    503: "The engine holds as many requests as it queues; retry later",
}


def error_responses(*statuses: int, anthropic: bool = False) -> dict[int | str, dict[str, Any]]:
    model = AnthropicErrorResponse if anthropic else ErrorResponse
    return {status: {"model": model, "description": _MEANINGS[status]} for status in statuses}


# one server-sent event: `data` a JSON chunk (or [DONE]); `event` names it on the Anthropic route
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"}}}


def generation_responses(body: type[BaseModel], anthropic: bool = False) -> dict[int | str, dict[str, Any]]:
    """A generation route: its JSON body, or an SSE stream when the request asks for one, and every error."""
    ok = {"model": body, "description": "The whole response; with `stream: true`, server-sent events",
          "content": {"text/event-stream": {"schema": SSE_EVENT}}}
    return {200: ok, **error_responses(400, 401, 413, 422, 429, 500, 503, anthropic=anthropic)}


def served_document(app: FastAPI, model_ids: list[str]) -> dict[str, Any]:
    """The app's OpenAPI document with `model` narrowed to the names this server answers to on the OpenAI
    routes (the Anthropic route maps any other name to deepseek-chat, so it stays a free string)."""
    document = app.openapi()
    schemas = document["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        schemas[name]["properties"]["model"]["enum"] = list(model_ids)
    return document
