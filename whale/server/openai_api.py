"""The DeepSeek API in OpenAI shape: /chat/completions, /completions (FIM) and /models, under the `/`, `/v1`
and `/beta` prefixes, as one JSON body or as SSE chunks the way the official API streams them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from whale.chat import ChatDelta, parse_output
from whale.engine.async_engine import StreamDelta
from whale.server.errors import APIError
from whale.server.generation import ChatRun, Generation, StreamItem, respond
from whale.server.openapi import (
    ChatCompletion,
    Completion,
    ModelCard,
    ModelList,
    error_responses,
    generation_responses,
)
from whale.server.protocol import ChatCompletionRequest, CompletionRequest
from whale.server.routing import prepare_routed_chat
from whale.server.served_model import ServedModel
from whale.server.state import ServerState
from whale.server.streaming import Collected, sse

PREFIXES = ("", "/v1", "/beta")


def usage_body(prompt: int, completion: int, cached: int, reasoning: int = 0) -> dict[str, Any]:
    """DeepSeek's usage: OpenAI's fields plus the prefix-cache hit/miss split and the reasoning share."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}, "prompt_cache_hit_tokens": cached,
            "prompt_cache_miss_tokens": prompt - cached, "completion_tokens_details": {"reasoning_tokens": reasoning}}


# -- chat ---------------------------------------------------------------------------------------------------
def _message(gen: Generation, collected: Collected) -> tuple[dict[str, Any], str]:
    parsed = parse_output(gen.prepared.parser, collected.text)
    message: dict[str, Any] = {"role": "assistant", "content": parsed["content"]}
    if gen.prepared.thinking:
        message["reasoning_content"] = parsed["reasoning_content"] or ""
    finish = collected.finish_reason
    if parsed["tool_calls"]:
        message["tool_calls"] = parsed["tool_calls"]
        finish = "tool_calls" if finish == "stop" else finish
    return message, finish


def _reasoning_tokens(gen: Generation, collected: Collected, reasoning: str) -> int:
    """The engine's exact count where it keeps one (a thinking budget), else the reasoning text's length in tokens,
    at most the completion's."""
    if collected.reasoning_tokens is not None:
        return collected.reasoning_tokens
    return min(gen.state.served.count_tokens(reasoning), collected.usage_counts()[1])


def chat_body(gen: Generation, collected: Collected) -> dict[str, Any]:
    message, finish = _message(gen, collected)
    logprobs = None
    if gen.prepared.params.logprobs is not None:
        logprobs = {"content": [e for d in collected.deltas for e in gen.logprob_entries(d)]}
    prompt, completion, cached = collected.usage_counts()
    reasoning = _reasoning_tokens(gen, collected, message.get("reasoning_content") or "")
    return {**gen.header(chunk=False),
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}],
            "usage": {**usage_body(prompt, completion, cached, reasoning), **gen.route_usage()}}


def _chat_delta_body(gen: Generation, piece: ChatDelta) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if gen.prepared.thinking and piece.reasoning_content:
        body.update(content=None, reasoning_content=piece.reasoning_content)
    if piece.content:
        body["content"] = piece.content
        if gen.prepared.thinking:
            body["reasoning_content"] = None
    if piece.tool_calls:
        body["tool_calls"] = [call.to_openai() for call in piece.tool_calls]
    return body


def _chunk(gen: Generation, delta: dict[str, Any], finish: str | None = None,
           logprobs: list[dict[str, Any]] | None = None) -> str:
    choice = {"index": 0, "delta": delta, "logprobs": None if logprobs is None else {"content": logprobs},
              "finish_reason": finish}
    return sse({**gen.header(chunk=True), "choices": [choice]})


async def chat_events(gen: Generation, items: AsyncIterator[StreamItem], include_usage: bool) -> AsyncIterator[str]:
    thinking = gen.prepared.thinking
    want_logprobs = gen.prepared.params.logprobs is not None
    opening = {"role": "assistant", "content": None if thinking else ""}
    if thinking:
        opening["reasoning_content"] = ""
    yield _chunk(gen, opening)
    run = ChatRun(gen)
    async for item in items:
        if isinstance(item, str):
            yield item
            continue
        piece = run.step(item)
        logprobs = gen.logprob_entries(item) if want_logprobs and isinstance(item, StreamDelta) else None
        if piece or logprobs:
            yield _chunk(gen, _chat_delta_body(gen, piece), logprobs=logprobs)
    finish = run.collected.finish_reason
    yield _chunk(gen, {"content": ""}, "tool_calls" if run.called and finish == "stop" else finish)
    if include_usage:
        prompt, completion, cached = run.collected.usage_counts()
        reasoning_tokens = _reasoning_tokens(gen, run.collected, run.reasoning)
        usage = {**usage_body(prompt, completion, cached, reasoning_tokens), **gen.route_usage()}
        yield sse({**gen.header(chunk=True), "choices": [], "usage": usage})
    yield sse("[DONE]")


def _include_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state: ServerState = request.app.state.whale
    gen = Generation(state, await prepare_routed_chat(state, body, request.scope), "chat.completion")
    return await respond(request, gen, bool(body.stream), lambda c: chat_body(gen, c),
                         lambda items: chat_events(gen, items, _include_usage(body)))


# -- FIM / text completions ------------------------------------------------------------------------------
def _completion_logprobs(gen: Generation, scored: list[tuple[int, Any]], offset: int,
                         as_ids: bool = False) -> dict[str, Any]:
    """The legacy completions logprobs of (token id, SampledToken or None) pairs, text offsets from `offset`;
    `as_ids` names each token "token_id:N" (vLLM's return_tokens_as_token_ids)."""
    token_text = gen.state.served.token_text
    name = (lambda t: f"token_id:{t}") if as_ids else token_text
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, sampled in scored:
        text = token_text(token_id)
        offsets.append(offset)
        offset += len(text)
        tokens.append(name(token_id))
        token_logprobs.append(None if sampled is None else sampled.logprob)
        top.append(None if sampled is None else
                   {name(t): lp for t, lp in (sampled.top_logprobs or {}).items()})
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens, "top_logprobs": top}


def _scored(gen: Generation, delta: StreamDelta) -> list[tuple[int, Any]]:
    """A delta's scored tokens: the prompt's first (echo with logprobs, on the first delta), then the new ones."""
    prompt = list(zip(gen.prepared.prompt_ids, delta.prompt_logprobs or (), strict=False))
    return prompt + [(sampled.token_id, sampled) for sampled in delta.logprobs]


def completion_body(gen: Generation, collected: Collected, body: CompletionRequest) -> dict[str, Any]:
    echo = gen.prepared.echo_text
    logprobs = None
    if gen.prepared.params.logprobs is not None:
        logprobs = _completion_logprobs(gen, [pair for d in collected.deltas for pair in _scored(gen, d)], 0,
                                        body.return_tokens_as_token_ids)
    prompt, completion, cached = collected.usage_counts()
    choice = {"text": echo + collected.text, "index": 0, "logprobs": logprobs,
              "finish_reason": collected.finish_reason}
    if body.return_token_ids:
        choice.update(token_ids=[t for d in collected.deltas for t in d.token_ids],
                      prompt_token_ids=gen.prepared.prompt_ids)
    return {**gen.header(chunk=False), "choices": [choice], "usage": usage_body(prompt, completion, cached)}


async def completion_events(gen: Generation, items: AsyncIterator[StreamItem],
                            body: CompletionRequest) -> AsyncIterator[str]:
    include_usage, ids = _include_usage(body), body.return_token_ids
    collected = Collected()
    echo, offset = gen.prepared.echo_text, 0
    scoring = gen.prepared.params.logprobs is not None
    if echo and not scoring:  # at once; with logprobs it waits for the prompt's, which come with the first token
        yield sse({**gen.header(chunk=True), "choices": [{"text": echo, "index": 0, "logprobs": None,
                                                           "finish_reason": None}]})
        echo = ""
    async for item in items:
        if isinstance(item, str):
            yield item
            continue
        if isinstance(item, Exception):
            collected.failed = True
            break
        collected.deltas.append(item)
        scored = _scored(gen, item)
        logprobs = _completion_logprobs(gen, scored, offset, body.return_tokens_as_token_ids) if scoring else None
        if scoring:  # offsets run on over the tokens' texts, as in the whole body
            offset += sum(len(gen.state.served.token_text(t)) for t, _ in scored)
        text, echo = echo + item.text, ""
        if text or logprobs or item.finished or (ids and item.token_ids):
            choice = {"text": text, "index": 0, "logprobs": logprobs,
                      "finish_reason": collected.finish_reason if item.finished else None}
            if ids:
                choice["token_ids"] = item.token_ids
                if len(collected.deltas) == 1:
                    choice["prompt_token_ids"] = gen.prepared.prompt_ids
            yield sse({**gen.header(chunk=True), "choices": [choice]})
    if collected.failed:
        yield sse({**gen.header(chunk=True), "choices": [{"text": "", "index": 0, "logprobs": None,
                                                           "finish_reason": collected.finish_reason}]})
    if include_usage:
        yield sse({**gen.header(chunk=True), "choices": [], "usage": usage_body(*collected.usage_counts())})
    yield sse("[DONE]")


async def completions(body: CompletionRequest, request: Request) -> Response:
    state: ServerState = request.app.state.whale
    gen = Generation(state, await asyncio.to_thread(state.served.prepare_fim, body), "text_completion")
    return await respond(request, gen, bool(body.stream), lambda c: completion_body(gen, c, body),
                         lambda items: completion_events(gen, items, body))


# -- models -----------------------------------------------------------------------------------------------
def _model_card(served: ServedModel, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": served.created,
            "owned_by": "whale" if name == served.name else "deepseek"}


async def list_models(request: Request) -> dict[str, Any]:
    served: ServedModel = request.app.state.whale.served
    return {"object": "list", "data": [_model_card(served, name) for name in served.model_ids]}


async def retrieve_model(model: str, request: Request) -> dict[str, Any]:
    served: ServedModel = request.app.state.whale.served
    if model not in served.model_ids:
        raise APIError(404, f"The model {model!r} does not exist on this server; it serves "
                            f"{', '.join(map(repr, served.model_ids))}", param="model")
    return _model_card(served, model)


def build_router() -> APIRouter:
    router = APIRouter()
    for prefix in PREFIXES:
        router.add_api_route(f"{prefix}/chat/completions", chat_completions, methods=["POST"],
                             include_in_schema=prefix == "", summary="Create a chat completion",
                             response_model=None, responses=generation_responses(ChatCompletion))
        router.add_api_route(f"{prefix}/completions", completions, methods=["POST"],
                             include_in_schema=prefix == "", summary="Create a FIM / text completion",
                             response_model=None, responses=generation_responses(Completion))
        router.add_api_route(f"{prefix}/models", list_models, methods=["GET"], include_in_schema=prefix == "",
                             summary="List models", response_model=None,
                             responses={200: {"model": ModelList}, **error_responses(401)})
        router.add_api_route(f"{prefix}/models/{{model}}", retrieve_model, methods=["GET"],
                             include_in_schema=prefix == "", summary="Retrieve a model", response_model=None,
                             responses={200: {"model": ModelCard}, **error_responses(401, 404, 422)})
    return router
