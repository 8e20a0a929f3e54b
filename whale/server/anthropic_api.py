"""The Anthropic Messages shape at /anthropic/v1/messages, as DeepSeek's Anthropic endpoint serves it: a request
is translated into the OpenAI-shape chat request (one validation and prompt path), and the output comes back as
thinking / text / tool_use blocks, or as Anthropic's stream events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import Field, ValidationError, field_validator, model_validator

from whale.chat import ChatDelta, parse_output
from whale.server.generation import ChatRun, Generation, StreamItem, respond
from whale.server.model_names import anthropic_model
from whale.server.openapi import (
    AnthropicMessageResponse,
    AnthropicTokenCount,
    error_responses,
    generation_responses,
)
from whale.server.protocol import (
    MAX_TOOLS,
    ChatCompletionRequest,
    ReasoningEffort,
    WireModel,
    check_function_name,
    check_stop,
    unsupported,
)
from whale.server.routing import prepare_routed_chat
from whale.server.served_model import ServedModel
from whale.server.state import ServerState
from whale.server.streaming import SSE_KEEPALIVE, Collected

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


class TextBlock(WireModel):
    type: Literal["text"]
    text: str


class ToolUseBlock(WireModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(WireModel):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None


class ThinkingBlock(WireModel):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(WireModel):
    type: Literal["redacted_thinking"]
    data: str = ""


ContentBlock = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
                         Field(discriminator="type")]
BLOCK_TYPES = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")


class AnthropicMessage(WireModel):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]

    @field_validator("content", mode="before")
    @classmethod
    def _known_blocks(cls, value: Any) -> Any:
        for block in value if isinstance(value, list) else ():
            kind = block.get("type") if isinstance(block, dict) else None
            if isinstance(kind, str) and kind not in BLOCK_TYPES:
                raise unsupported(f"content blocks of type {kind!r} are not supported: this server's models read "
                                  f"text; send blocks of type {', '.join(map(repr, BLOCK_TYPES))}")
        return value


class AnthropicThinking(WireModel):
    type: Literal["enabled", "disabled"]
    budget_tokens: int | None = Field(default=None, ge=1)  # honoured (DeepSeek's endpoint ignores it)


class AnthropicTool(WireModel):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    strict: bool | None = None  # Anthropic's structured outputs: the input follows input_schema

    @field_validator("name")
    @classmethod
    def _name_rule(cls, value: str) -> str:
        return check_function_name(value)


class AnthropicToolChoice(WireModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class AnthropicOutputConfig(WireModel):
    effort: ReasoningEffort | None = None  # the reasoning effort, as reasoning_effort on the OpenAI shape


class CountTokensRequest(WireModel):
    """/v1/messages/count_tokens: the prompt half of a Messages request."""

    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    thinking: AnthropicThinking | None = None
    output_config: AnthropicOutputConfig | None = None
    tools: list[AnthropicTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: AnthropicToolChoice | None = None

    @model_validator(mode="after")
    def _tool_choice_fits(self) -> CountTokensRequest:
        choice = self.tool_choice
        if choice is None or choice.type in ("auto", "none"):
            return self
        names = [tool.name for tool in self.tools or ()]
        if not names:
            raise ValueError(f"'tool_choice' of type {choice.type!r} needs 'tools'")
        if choice.type == "tool" and choice.name not in names:
            raise ValueError(f"'tool_choice' names tool {choice.name!r}, which is not in 'tools' "
                             f"({', '.join(map(repr, names))})")
        return self


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # ignored

    @field_validator("stop_sequences")
    @classmethod
    def _stop_count(cls, value: list[str] | None) -> list[str] | None:
        return check_stop(value)


def _text_of(content: str | list[Any] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(block.text for block in content if isinstance(block, TextBlock))


def _user_messages(content: str | list[Any]) -> list[dict[str, Any]]:
    """A user turn: tool_result blocks become `tool` messages, the text after them one user message."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    out: list[dict[str, Any]] = [{"role": "tool", "tool_call_id": block.tool_use_id, "content": _text_of(block.content)}
                                 for block in content if isinstance(block, ToolResultBlock)]
    text = _text_of(content)
    if text or not out:
        out.append({"role": "user", "content": text})
    return out


def _assistant_message(content: str | list[Any]) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    message: dict[str, Any] = {"role": "assistant", "content": _text_of(content)}
    thinking = "".join(block.thinking for block in content if isinstance(block, ThinkingBlock))
    if thinking:
        message["reasoning_content"] = thinking
    calls = [{"id": block.id, "type": "function",
              "function": {"name": block.name, "arguments": json.dumps(block.input)}}
             for block in content if isinstance(block, ToolUseBlock)]
    if calls:
        message["tool_calls"] = calls
    return message


def to_chat_request(body: CountTokensRequest, served: ServedModel) -> ChatCompletionRequest:
    """The equivalent OpenAI-shape request; Claude model names map as DeepSeek's route maps them (model_names).
    What the OpenAI shape still refuses (a message order it does not take) is a 4xx, never a server error."""
    messages: list[dict[str, Any]] = []
    if body.system:
        messages.append({"role": "system", "content": _text_of(body.system)})
    for message in body.messages:
        if message.role == "user":
            messages.extend(_user_messages(message.content))
        else:
            messages.append(_assistant_message(message.content))
    choice = body.tool_choice.type if body.tool_choice else None
    tool_choice: Any = {"auto": "auto", "any": "required", "none": "none"}.get(choice or "")
    if choice == "tool":
        tool_choice = {"type": "function", "function": {"name": body.tool_choice.name}}
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                               "parameters": t.input_schema, "strict": t.strict}}
             for t in body.tools or ()]
    model = anthropic_model(body.model, served.model_ids)
    generation = {}
    if isinstance(body, MessagesRequest):  # a max_tokens past the limits is clamped by prepare_chat, not refused
        generation = {"max_tokens": body.max_tokens, "stop": body.stop_sequences, "temperature": body.temperature,
                      "top_p": body.top_p}
    try:
        return ChatCompletionRequest.model_validate({
            "model": model, "messages": messages, **generation, "tools": tools or None, "tool_choice": tool_choice,
            "thinking": body.thinking.model_dump(exclude_none=True) if body.thinking else None,
            "reasoning_effort": body.output_config.effort if body.output_config else None})
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc


def _stop(collected: Collected, called: bool) -> tuple[str, str | None]:
    last = collected.deltas[-1] if collected.deltas else None
    if called:
        return "tool_use", None
    if last is not None and isinstance(last.stop_reason, str):
        return "stop_sequence", last.stop_reason
    return STOP_REASONS.get(collected.finish_reason, "end_turn"), None


def _usage(gen: Generation, collected: Collected) -> dict[str, Any]:
    prompt, completion, cached = collected.usage_counts()
    return {"input_tokens": prompt - cached, "output_tokens": completion, "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0, **gen.route_usage()}


def message_body(gen: Generation, collected: Collected) -> dict[str, Any]:
    parsed = parse_output(gen.prepared.parser, collected.text)
    blocks: list[dict[str, Any]] = []
    if gen.prepared.thinking and parsed["reasoning_content"]:
        blocks.append({"type": "thinking", "thinking": parsed["reasoning_content"], "signature": ""})
    if parsed["content"]:
        blocks.append({"type": "text", "text": parsed["content"]})
    for call in parsed["tool_calls"] or ():
        blocks.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                       "input": json.loads(call["function"]["arguments"] or "{}")})
    stop_reason, stop_sequence = _stop(collected, bool(parsed["tool_calls"]))
    return {"id": gen.id, "type": "message", "role": "assistant", "model": gen.prepared.model, "content": blocks,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": _usage(gen, collected)}


def event(kind: str, payload: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload}, ensure_ascii=False)}\n\n"


class BlockWriter:
    """Turns chat deltas into content_block_start / _delta / _stop events, one block open at a time."""

    def __init__(self) -> None:
        self.index = -1
        self.kind: str | None = None

    def _open(self, kind: str, block: dict[str, Any]) -> list[str]:
        events = self.close()
        self.index += 1
        self.kind = kind
        return [*events, event("content_block_start", {"index": self.index, "content_block": block})]

    def close(self) -> list[str]:
        if self.kind is None:
            return []
        self.kind = None
        return [event("content_block_stop", {"index": self.index})]

    def feed(self, piece: ChatDelta) -> list[str]:
        out: list[str] = []
        if piece.reasoning_content:
            if self.kind != "thinking":
                out += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(event("content_block_delta", {"index": self.index, "delta": {
                "type": "thinking_delta", "thinking": piece.reasoning_content}}))
        if piece.content:
            if self.kind != "text":
                out += self._open("text", {"type": "text", "text": ""})
            out.append(event("content_block_delta", {"index": self.index, "delta": {"type": "text_delta",
                                                                                    "text": piece.content}}))
        for call in piece.tool_calls:
            if call.id is not None:
                out += self._open("tool_use", {"type": "tool_use", "id": call.id, "name": call.name or "",
                                               "input": {}})
            if call.arguments:
                out.append(event("content_block_delta", {"index": self.index, "delta": {
                    "type": "input_json_delta", "partial_json": call.arguments}}))
        return out


async def message_events(gen: Generation, items: AsyncIterator[StreamItem]) -> AsyncIterator[str]:
    run, writer = ChatRun(gen), BlockWriter()
    prompt = len(gen.prepared.prompt_ids)
    yield event("message_start", {"message": {
        "id": gen.id, "type": "message", "role": "assistant", "model": gen.prepared.model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": prompt, "output_tokens": 0}}})
    async for item in items:
        if item == SSE_KEEPALIVE:
            yield event("ping", {})
            continue
        if isinstance(item, Exception):
            yield event("error", {"error": {"type": "api_error", "message": str(item)}})
            return
        for text in writer.feed(run.step(item)):
            yield text
    for text in writer.close():
        yield text
    stop_reason, stop_sequence = _stop(run.collected, run.called)
    yield event("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                  "usage": _usage(gen, run.collected)})
    yield event("message_stop", {})


async def messages(body: MessagesRequest, request: Request) -> Response:
    state: ServerState = request.app.state.whale
    chat = to_chat_request(body, state.served)
    prepared = await prepare_routed_chat(state, chat, request.scope, clamp_max_tokens=True)
    gen = Generation(state, prepared, "message", id_prefix="msg_")
    return await respond(request, gen, bool(body.stream), lambda c: message_body(gen, c),
                         lambda items: message_events(gen, items))


async def count_tokens(body: CountTokensRequest, request: Request) -> dict[str, int]:
    state: ServerState = request.app.state.whale
    chat = to_chat_request(body, state.served)
    return {"input_tokens": await asyncio.to_thread(state.served.prompt_tokens, chat)}


def build_router() -> APIRouter:
    router = APIRouter()
    router.add_api_route("/anthropic/v1/messages/count_tokens", count_tokens, methods=["POST"],
                         summary="Anthropic token count of a Messages prompt", response_model=None,
                         responses={200: {"model": AnthropicTokenCount}, **error_responses(400, 401, 413, 422,
                                                                                            anthropic=True)})
    router.add_api_route("/anthropic/v1/messages", messages, methods=["POST"], summary="Anthropic Messages",
                         response_model=None, responses=generation_responses(AnthropicMessageResponse, anthropic=True))
    return router
