"""Soak and fault suite: a real `whale serve` subprocess under bounded, seeded, mixed traffic (valid requests on
every route, invalid ones, clients that leave mid-stream, give up mid-wait or read slowly), every answer
classified, then the server checked for leaks. It prints the pass criteria with their measured values, the
answers per request kind and the latency percentiles, and exits non-zero on any FAIL:

- the server process never exits;
- no 5xx on valid input, and every valid request answered with a well-formed body (chat / text completion /
  Anthropic message JSON, or an SSE stream that ends in `data: [DONE]` / `message_stop`); a valid request the
  model cannot serve (tools, FIM on a model without them) may instead get a 4xx naming the feature;
- every invalid request a 4xx in the route's error shape (DeepSeek's `{"error": {...}}`, Anthropic's on
  /anthropic) that names the field or limit at fault; a body of several MB a 413;
- after the run every KV-cache block free and no request left (running, queued or in flight), per /metrics;
- resident memory after the run at most 10% above its value after warm-up, not counting KV-cache storage first
  written in between (on CPU the cache is resident only where written; it is bounded by its configured size);
- every planned request run within the time limit.

    .venv/bin/python bench/soak.py [--requests 2000] [--concurrency 32] [--seed 0] [--model default]

tests/server/test_soak.py runs the same code with a few hundred requests in `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
from servers import free_port, wait_ready

REQUEST_TIMEOUT_S = 120.0  # the longest a request that should be answered may take
MEMORY_GROWTH_LIMIT = 0.10
MIB = 2**20
HUGE_BODY_BYTES = 4 << 20  # "several MB": over any sensible request-size limit for the default model
LEAVING_MAX_TOKENS = 1024  # requests whose clients leave: long enough to still run when they go
FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter", "insufficient_system_resource"}
STOPS = ["\n", ".", "!", " the", " and", "\n\n"]
SYSTEM = "You are a concise assistant on a research ship that studies whales."
PROMPTS = ["Hi!", "What is 2+2?", "Name three whales.", "Write a haiku about the sea.", "Say hello in French.",
           "Why is the sky blue?", "Tell me a joke.", "List the planets.", "Write a long story about a whale."]
GAUGES = ("whale_kv_cache_blocks_used", "whale_engine_running_requests", "whale_engine_queue_depth",
          "whale_requests_in_flight")
CRITERIA = ("crashes", "valid_5xx", "valid_answers", "invalid_4xx", "engine_clean", "memory", "completed")


# -- the requests -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One planned request and what its answer must be.

    expect: "valid" (200 with a well-formed body), "refusable" (valid, but the model may lack the feature:
    that, or a 4xx naming it), "invalid" (a 4xx in the error shape naming `mentions`, `status` if set).
    client: "normal", "sdk" (the openai SDK), "disconnect" (closes after `lines` SSE lines), "give_up" (leaves
    a non-streaming request after `wait_s`), "slow" (sleeps `wait_s` between SSE lines)."""

    kind: str
    expect: str
    path: str
    body: Any  # a JSON-able dict, or bytes sent as they are
    stream: bool = False
    client: str = "normal"
    mentions: tuple[str, ...] = ()
    status: int | None = None
    auth: bool = True
    lines: int = 0
    wait_s: float = 0.0

    @property
    def anthropic(self) -> bool:
        return self.path.startswith("/anthropic")

    @property
    def content(self) -> bytes:
        return self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()

    def get(self, name: str, default: Any = None) -> Any:
        return self.body.get(name, default) if isinstance(self.body, dict) else default


def _messages(rng: random.Random) -> list[dict[str, Any]]:
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
    if rng.random() < 0.3:
        messages += [{"role": "user", "content": rng.choice(PROMPTS)}, {"role": "assistant", "content": "Sure."}]
    return messages + [{"role": "user", "content": rng.choice(PROMPTS)}]


def _sampling(rng: random.Random, body: dict[str, Any], anthropic: bool = False) -> dict[str, Any]:
    if rng.random() < 0.5:
        body["temperature"] = rng.choice([0, 0.3, 0.7, 1.0, 1.5])
    if rng.random() < 0.3:
        body["top_p"] = rng.choice([0.5, 0.9, 1.0])
    if rng.random() < 0.3:
        body["stop_sequences" if anthropic else "stop"] = rng.sample(STOPS, rng.randint(1, 3))
    if rng.random() < 0.3 and not anthropic:
        body["seed"] = rng.randrange(1 << 31)
    return body


def _streaming(rng: random.Random, body: dict[str, Any], stream: bool) -> dict[str, Any]:
    if stream:
        body["stream"] = True
        if rng.random() < 0.7:
            body["stream_options"] = {"include_usage": True}
    return body


def chat_body(rng: random.Random, stream: bool = False, max_tokens: int | None = None) -> dict[str, Any]:
    body = _sampling(rng, {"model": "deepseek-chat", "messages": _messages(rng),
                           "max_tokens": max_tokens or rng.randint(4, 24)})
    if rng.random() < 0.3:
        body.update(logprobs=True, top_logprobs=rng.randint(0, 5))
    return _streaming(rng, body, stream)


def completion_body(rng: random.Random, stream: bool = False, max_tokens: int | None = None) -> dict[str, Any]:
    body = _sampling(rng, {"model": "deepseek-chat", "prompt": rng.choice(PROMPTS),
                           "max_tokens": max_tokens or rng.randint(4, 24)})
    if rng.random() < 0.3:
        body["logprobs"] = rng.randint(0, 5)
    if rng.random() < 0.2 and "stop" not in body and "logprobs" not in body:  # echo + logprobs: a 400
        body["echo"] = True
    return _streaming(rng, body, stream)


def message_body(rng: random.Random, stream: bool = False, max_tokens: int | None = None) -> dict[str, Any]:
    messages = [m for m in _messages(rng) if m["role"] != "system"]
    body = {"model": "deepseek-chat", "max_tokens": max_tokens or rng.randint(4, 24), "messages": messages}
    if rng.random() < 0.5:
        body["system"] = SYSTEM
    return {**_sampling(rng, body, anthropic=True), "stream": stream}


def _chat_path(rng: random.Random) -> str:
    return rng.choice(["", "/v1", "/beta"]) + "/chat/completions"


def _completion_path(rng: random.Random) -> str:
    return rng.choice(["", "/v1", "/beta"]) + "/completions"


MESSAGES_PATH = "/anthropic/v1/messages"
_ROUTES = {"chat": (_chat_path, chat_body), "completion": (_completion_path, completion_body),
           "message": (lambda rng: MESSAGES_PATH, message_body)}


def _any_route(rng: random.Random, stream: bool = False, max_tokens: int | None = None,
               route: str | None = None) -> tuple[str, dict]:
    path, body = _ROUTES[route or rng.choice(list(_ROUTES))]
    return path(rng), body(rng, stream, max_tokens)


def _valid(route: str, stream: bool) -> Callable[[random.Random, int], Case]:
    def build(rng: random.Random, context: int) -> Case:
        path, body = _ROUTES[route]
        return Case(f"{route}{'_stream' if stream else ''}", "valid", path(rng), body(rng, stream), stream)
    return build


def sdk_chat(rng: random.Random, context: int) -> Case:
    stream = rng.random() < 0.5
    return Case("sdk_chat", "valid", "/v1/chat/completions", chat_body(rng, stream), stream, client="sdk")


def unknown_fields(rng: random.Random, context: int) -> Case:
    path, body = _any_route(rng, stream=rng.random() < 0.5)
    body.update(user="soak", metadata={"run": "soak"}, frobnicate=[1, 2, 3], x_unknown_flag=True)
    return Case("unknown_fields", "valid", path, body, body.get("stream") is True)


def tools(rng: random.Random, context: int) -> Case:
    function = {"name": "get_weather", "description": "Weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    if rng.random() < 0.5:
        body = chat_body(rng)
        body["tools"] = [{"type": "function", "function": function}]
        return Case("tools", "refusable", _chat_path(rng), body, mentions=("tool", "function"))
    body = message_body(rng)
    body["tools"] = [{"name": function["name"], "description": function["description"],
                      "input_schema": function["parameters"]}]
    return Case("tools", "refusable", MESSAGES_PATH, body, mentions=("tool", "function"))


def fim(rng: random.Random, context: int) -> Case:
    body = completion_body(rng)
    body.update(prompt="def add(a, b):\n    ", suffix="\n    return result\n")
    body.pop("echo", None)
    return Case("fim", "refusable", _completion_path(rng), body, mentions=("FIM",))


def _long_request(rng: random.Random, stream: bool, route: str | None) -> tuple[str, dict]:
    """A request that runs long (a story, no stop sequence), for a client that leaves before its end."""
    path, body = _any_route(rng, stream, LEAVING_MAX_TOKENS, route)
    body.pop("stop", None)
    body.pop("stop_sequences", None)
    if "prompt" in body:
        body["prompt"] = "Once upon a time, in the deep blue sea, there lived a whale who"
    else:
        body["messages"][-1]["content"] = "Write a long story about a whale who learns to sing."
    return path, body


def disconnect(rng: random.Random, context: int, route: str | None = None) -> Case:
    path, body = _long_request(rng, True, route)
    return Case("disconnect", "valid", path, body, True, "disconnect", lines=rng.randint(1, 6))


def give_up(rng: random.Random, context: int, route: str | None = None) -> Case:
    path, body = _long_request(rng, False, route)
    return Case("give_up", "valid", path, body, client="give_up", wait_s=round(rng.uniform(0.2, 2.5), 2))


def slow_reader(rng: random.Random, context: int) -> Case:
    path, body = _any_route(rng, True, rng.randint(8, 24))
    return Case("slow_reader", "valid", path, body, True, "slow", wait_s=round(rng.uniform(0.02, 0.1), 3))


BAD_JSON = [b'{"model": "deepseek-chat", "messages": [{"role": "user", "content": "Hi"}',
            b"hello, server", b"", b'{"model": "deepseek-chat", "max_tokens": 8}}',
            b'[{"role": "user", "content": "Hi"}]', b'{"model": "deepseek-chat", "prompt": "\xff\xfe\xfa"}',
            b'{"model": "deepseek-chat", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"]


def bad_json(rng: random.Random, context: int) -> Case:
    path = rng.choice([_chat_path(rng), _completion_path(rng), MESSAGES_PATH])
    return Case("bad_json", "invalid", path, rng.choice(BAD_JSON))


# (route, field, wrong value): a value of the wrong JSON type, which must be refused rather than converted
WRONG_TYPES = [("chat", "max_tokens", "12"), ("chat", "temperature", "hot"), ("chat", "messages", "hi"),
               ("chat", "stream", "yes"), ("chat", "seed", "7"), ("chat", "logprobs", "true"),
               ("chat", "top_p", [0.5]), ("chat", "stop", 5), ("chat", "model", 7),
               ("completion", "prompt", 5), ("completion", "max_tokens", "16"), ("completion", "echo", "no"),
               ("message", "max_tokens", "8"), ("message", "messages", "hi"), ("message", "stream", "yes"),
               ("message", "temperature", "warm")]
# (route, field, value out of range or not allowed, words the message must contain)
BAD_VALUES = [("chat", "max_tokens", 0, ("max_tokens",)), ("chat", "temperature", 5, ("temperature",)),
              ("chat", "top_p", 0, ("top_p",)), ("chat", "frequency_penalty", 3, ("frequency_penalty",)),
              ("chat", "stop", [str(i) for i in range(20)], ("stop",)), ("chat", "model", "gpt-4", ("model",)),
              ("chat", "messages", [], ("messages",)), ("completion", "logprobs", 50, ("logprobs",)),
              ("message", "max_tokens", 0, ("max_tokens",)), ("message", "messages", [], ("messages",))]


def wrong_type(rng: random.Random, context: int) -> Case:
    route, name, value = rng.choice(WRONG_TYPES)
    path, body = _ROUTES[route]
    body = body(rng)
    body[name] = value
    return Case("wrong_type", "invalid", path(rng), body, mentions=(name,))


def bad_value(rng: random.Random, context: int) -> Case:
    route, name, value, mentions = rng.choice(BAD_VALUES)
    path, body = _ROUTES[route]
    body = body(rng)
    body[name] = value
    return Case("bad_value", "invalid", path(rng), body, mentions=mentions)


def oversize_prompt(rng: random.Random, context: int) -> Case:
    """A prompt longer than the context (one token per word at least): a 400 naming the lengths."""
    path, body = _any_route(rng)
    text = " ".join(rng.choice(["whale", "sea", "song", "krill"]) for _ in range(context + 256))
    if "prompt" in body:
        body["prompt"] = text
    else:
        body["messages"][-1]["content"] = text
    return Case("oversize_prompt", "invalid", path, body, mentions=(str(context),))


def max_tokens_past_context(rng: random.Random, context: int) -> Case:
    route = rng.choice(["chat", "completion"])
    path, body = _ROUTES[route]
    return Case("max_tokens_past_context", "invalid", path(rng), {**body(rng), "max_tokens": context},
                mentions=("max_tokens", "context length"))


@functools.cache
def _huge_text(size: int) -> str:
    return ("the whale sings to the sea " * (size // 27 + 1))[:size]


def huge_body(rng: random.Random, context: int) -> Case:
    """A JSON request of several MB (and 64 bytes a token of context, if that is more): a 413."""
    path, body = _any_route(rng)
    text = _huge_text(max(HUGE_BODY_BYTES, 64 * context))
    if "prompt" in body:
        body["prompt"] = text
    else:
        body["messages"][-1]["content"] = text
    return Case("huge_body", "invalid", path, body, status=413)


def no_api_key(rng: random.Random, context: int) -> Case:
    path, body = _any_route(rng)
    return Case("no_api_key", "invalid", path, body, auth=False, status=401)


# kind -> (weight in the mix, builder)
KINDS: dict[str, tuple[float, Callable[[random.Random, int], Case]]] = {
    "chat": (11, _valid("chat", False)), "chat_stream": (11, _valid("chat", True)),
    "completion": (6, _valid("completion", False)), "completion_stream": (6, _valid("completion", True)),
    "message": (7, _valid("message", False)), "message_stream": (7, _valid("message", True)),
    "sdk_chat": (6, sdk_chat), "unknown_fields": (4, unknown_fields), "tools": (3, tools), "fim": (2, fim),
    "disconnect": (6, disconnect), "give_up": (5, give_up), "slow_reader": (4, slow_reader),
    "bad_json": (5, bad_json), "wrong_type": (6, wrong_type), "bad_value": (4, bad_value),
    "oversize_prompt": (2, oversize_prompt), "max_tokens_past_context": (2, max_tokens_past_context),
    "huge_body": (0.5, huge_body), "no_api_key": (1.5, no_api_key),
}


MIN_REQUESTS = len(KINDS) + 2 * len(_ROUTES)


def plan(requests: int, seed: int, context: int) -> list[Case]:
    """`requests` cases: one of every kind, the rest drawn by weight, shuffled; then, last, a client that gives
    up and one that disconnects on each route, whose requests must be gone when the run ends."""
    rng = random.Random(seed)
    names = list(KINDS)
    chosen = names + rng.choices(names, [w for w, _ in KINDS.values()], k=requests - MIN_REQUESTS)
    rng.shuffle(chosen)
    finale = [leave(rng, context, route) for route in _ROUTES for leave in (give_up, disconnect)]
    return [KINDS[name][1](rng, context) for name in chosen] + finale


# -- judging answers --------------------------------------------------------------------------------------
@dataclass
class Outcome:
    case: Case
    status: int | None  # None: no HTTP status (the client left first, or the transport failed)
    latency_s: float
    problem: str = ""  # what is wrong with the answer; empty when it is what the case expects
    excerpt: str = ""  # the start of the answer
    left: bool = False  # the client left on purpose before the end

    @property
    def answered_in_full(self) -> bool:
        return self.case.expect == "valid" and self.status == 200 and not self.left and not self.problem

    @property
    def label(self) -> str:
        if self.left:
            return "left" if self.status is None else f"{self.status}+left"
        return str(self.status) if self.status is not None else "no answer"


class Malformed(Exception):
    pass


def need(condition: Any, message: str) -> None:
    if not condition:
        raise Malformed(message)


def error_problem(case: Case, status: int, text: str) -> str:
    """What is wrong with a 4xx/5xx answer to `case` ("" when it is the answer the case expects)."""
    if status >= 500:
        return f"status {status}"
    if case.expect == "valid":
        return f"status {status} for a valid request"
    if case.status is not None and status != case.status:
        return f"status {status}, expected {case.status}"
    try:
        body = json.loads(text)
        if case.anthropic:
            need(body.get("type") == "error", "Anthropic error body without type 'error'")
            error = body.get("error")
            need(isinstance(error, dict) and isinstance(error.get("type"), str), "no error.type")
        else:
            error = body.get("error")
            need(isinstance(error, dict), "no 'error' object")
            missing = [k for k in ("message", "type", "param", "code") if k not in error]
            need(not missing, f"error object without {', '.join(missing)}")
            need(isinstance(error["type"], str), "error.type is not a string")
        message = error.get("message")
        need(isinstance(message, str) and message, "no error.message")
    except (ValueError, AttributeError) as exc:
        return f"status {status} without a JSON error body ({exc})"
    except Malformed as exc:
        return f"status {status}, error shape: {exc}"
    if case.mentions and not any(m.lower() in message.lower() for m in case.mentions):
        return f"status {status}, the message names none of {', '.join(case.mentions)}"
    return ""


def _check_text(case: Case, text: str, completion_tokens: int | None) -> None:
    limit = case.get("max_tokens")
    if completion_tokens is not None and isinstance(limit, int):
        need(completion_tokens <= limit, f"{completion_tokens} completion tokens, max_tokens {limit}")
    stops = case.get("stop") or case.get("stop_sequences") or []
    for stop in [stops] if isinstance(stops, str) else stops:
        need(stop not in text, f"the text holds the stop sequence {stop!r}")


def _check_chat_logprobs(case: Case, logprobs: Any, tokens: int | None) -> None:
    if not case.get("logprobs"):
        need(logprobs is None, "logprobs without logprobs: true")
        return
    content = logprobs["content"]
    need(isinstance(content, list), "logprobs.content is not a list")
    top = case.get("top_logprobs") or 0
    for entry in content:
        need(isinstance(entry["token"], str) and entry["logprob"] <= 1e-6, f"bad logprob entry {entry}")
        need(len(entry["top_logprobs"]) <= top, f"{len(entry['top_logprobs'])} top_logprobs, asked {top}")
    if tokens is not None and not case.get("stop"):
        need(len(content) == tokens, f"{len(content)} logprob entries for {tokens} tokens")


def check_chat(case: Case, body: dict[str, Any]) -> None:
    need(body.get("object") == "chat.completion", f"object {body.get('object')!r}")
    choice = body["choices"][0]
    need(choice["finish_reason"] in FINISH_REASONS, f"finish_reason {choice['finish_reason']!r}")
    message = choice["message"]
    need(message["role"] == "assistant", "message.role is not assistant")
    need(isinstance(message["content"], str) or message.get("tool_calls"), "no content and no tool_calls")
    tokens = body["usage"]["completion_tokens"]
    _check_text(case, message["content"] or "", tokens)
    _check_chat_logprobs(case, choice.get("logprobs"), tokens)


def check_completion(case: Case, body: dict[str, Any]) -> None:
    need(body.get("object") == "text_completion", f"object {body.get('object')!r}")
    choice = body["choices"][0]
    need(choice["finish_reason"] in FINISH_REASONS, f"finish_reason {choice['finish_reason']!r}")
    need(isinstance(choice["text"], str), "choices[0].text is not a string")
    _check_text(case, choice["text"], body["usage"]["completion_tokens"])
    if case.get("logprobs") is not None:
        logprobs = choice["logprobs"]
        lengths = {len(logprobs[k]) for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        need(len(lengths) == 1, "logprobs lists of different lengths")


def check_message(case: Case, body: dict[str, Any]) -> None:
    need(body.get("type") == "message" and body.get("role") == "assistant", "not an assistant message")
    need(isinstance(body["content"], list), "content is not a list of blocks")
    need(body["stop_reason"] in {"end_turn", "max_tokens", "stop_sequence", "tool_use"},
         f"stop_reason {body['stop_reason']!r}")
    text = "".join(b["text"] for b in body["content"] if b["type"] == "text")
    _check_text(case, text, body["usage"]["output_tokens"])


def check_chat_chunks(case: Case, chunks: list[dict[str, Any]], complete: bool) -> None:
    """OpenAI-shape chunks (chat or text completion); `complete`: the stream ran to its end."""
    chat = case.path.endswith("/chat/completions")
    text, finishes, tokens = [], [], None
    for chunk in chunks:
        need("error" not in chunk, f"an error chunk: {chunk.get('error')}")
        need(chunk.get("object") == ("chat.completion.chunk" if chat else "text_completion"),
             f"chunk object {chunk.get('object')!r}")
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk["choices"]:
            text.append((choice["delta"].get("content") if chat else choice["text"]) or "")
            if choice["finish_reason"] is not None:
                finishes.append(choice["finish_reason"])
    need(all(f in FINISH_REASONS for f in finishes), f"finish_reason {finishes}")
    if complete:
        need(len(finishes) == 1, f"{len(finishes)} chunks with a finish_reason")
        _check_text(case, "".join(text), tokens)


def check_openai_sse(case: Case, lines: list[str], complete: bool) -> None:
    data = [line[6:] for line in lines if line.startswith("data: ")]
    stray = [line for line in lines if line and not line.startswith(("data: ", ":"))]
    need(not stray, f"a line that is not SSE data or a comment: {stray[:1]}")
    need(data.count("[DONE]") <= 1 and "[DONE]" not in data[:-1], "data after [DONE]")
    need(not complete or data[-1:] == ["[DONE]"], "the stream does not end in data: [DONE]")
    check_chat_chunks(case, [json.loads(d) for d in data if d != "[DONE]"], complete)


def check_anthropic_sse(case: Case, lines: list[str], complete: bool) -> None:
    events, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            payload = json.loads(line[6:])
            need(payload.get("type") == name, f"event {name!r} carries data of type {payload.get('type')!r}")
            events.append(payload)
        else:
            need(not line, f"a line that is not an SSE event: {line[:80]!r}")
    kinds = [e["type"] for e in events]
    need(kinds[:1] == ["message_start"] or not kinds, "the stream does not start with message_start")
    need("error" not in kinds, f"an error event: {next((e for e in events if e['type'] == 'error'), None)}")
    if complete:
        need(kinds[-1:] == ["message_stop"] and kinds.count("message_stop") == 1, "no single final message_stop")
        text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
        delta = next(e for e in events if e["type"] == "message_delta")
        _check_text(case, text, delta["usage"]["output_tokens"])


def check_body(case: Case, text: str) -> None:
    body = json.loads(text)  # a body after keep-alive blank lines parses the same
    if case.anthropic:
        check_message(case, body)
    elif case.path.endswith("/chat/completions"):
        check_chat(case, body)
    else:
        check_completion(case, body)


def judged(case: Case, check: Callable[[], None]) -> str:
    try:
        check()
    except Malformed as exc:
        return f"malformed answer: {exc}"
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, StopIteration) as exc:
        return f"malformed answer: {type(exc).__name__}: {exc}"
    return ""


# -- running the requests ---------------------------------------------------------------------------------
@dataclass
class Clients:
    base: str
    key: str
    http: httpx.AsyncClient
    sdk: openai.AsyncOpenAI

    def headers(self, case: Case) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if case.auth:
            headers["Authorization"] = f"Bearer {self.key}"
        return headers


async def _plain(clients: Clients, case: Case, outcome: Outcome) -> None:
    response = await clients.http.post(clients.base + case.path, content=case.content, headers=clients.headers(case))
    outcome.status, outcome.excerpt = response.status_code, response.text[:400]
    if response.status_code != 200:
        outcome.problem = error_problem(case, response.status_code, response.text)
    elif case.expect == "invalid":
        outcome.problem = "status 200: the invalid request was accepted"
    else:
        outcome.problem = judged(case, lambda: check_body(case, response.text))


async def _streamed(clients: Clients, case: Case, outcome: Outcome) -> None:
    request = clients.http.build_request("POST", clients.base + case.path, content=case.content,
                                         headers=clients.headers(case))
    response = await clients.http.send(request, stream=True)
    lines: list[str] = []
    try:
        outcome.status = response.status_code
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            outcome.excerpt, outcome.problem = text[:400], error_problem(case, response.status_code, text)
            return
        if case.expect == "invalid":
            outcome.problem = "status 200: the invalid request was accepted"
            return
        async for line in response.aiter_lines():
            lines.append(line)
            if case.client == "disconnect" and sum(1 for x in lines if x.startswith("data: ")) >= case.lines:
                outcome.left = True
                break
            if case.client == "slow":
                await asyncio.sleep(case.wait_s)
        check = check_anthropic_sse if case.anthropic else check_openai_sse
        outcome.problem = judged(case, lambda: check(case, lines, complete=not outcome.left))
    finally:
        outcome.excerpt = outcome.excerpt or "\n".join(lines)[:400]  # what came before a timeout, too
        await response.aclose()  # before the end: closes the connection, which is the disconnect


async def _sdk(clients: Clients, case: Case, outcome: Outcome) -> None:
    body = {k: v for k, v in case.body.items() if k != "stream"}
    try:
        if case.stream:
            stream = await clients.sdk.chat.completions.create(**body, stream=True)
            chunks = [chunk.model_dump() async for chunk in stream]
            outcome.status, outcome.excerpt = 200, json.dumps(chunks[:2])[:400]
            outcome.problem = judged(case, lambda: check_chat_chunks(case, chunks, complete=True))
        else:
            completion = await clients.sdk.chat.completions.create(**body)
            outcome.status, outcome.excerpt = 200, completion.model_dump_json()[:400]
            outcome.problem = judged(case, lambda: check_chat(case, completion.model_dump()))
    except openai.APIStatusError as exc:
        outcome.status, outcome.excerpt = exc.status_code, exc.response.text[:400]
        outcome.problem = error_problem(case, exc.status_code, exc.response.text)


async def run_case(clients: Clients, case: Case) -> Outcome:
    outcome = Outcome(case, None, 0.0)
    start = time.perf_counter()
    try:
        if case.client == "give_up":
            try:
                async with asyncio.timeout(case.wait_s):
                    await _plain(clients, case, outcome)
            except TimeoutError:
                outcome.left = True  # the request was still running: the client gave up on it
        else:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                await (_sdk if case.client == "sdk" else _streamed if case.stream else _plain)(clients, case, outcome)
    except TimeoutError:
        outcome.problem = f"no complete answer within {REQUEST_TIMEOUT_S:.0f} s"
    except (httpx.TransportError, openai.APIConnectionError) as exc:
        outcome.problem = f"transport error: {type(exc).__name__}: {exc}"
    outcome.latency_s = time.perf_counter() - start
    return outcome


async def drive(base: str, key: str, cases: list[Case], concurrency: int, deadline: float,
                alive: Callable[[], bool], progress: Callable[[list[Outcome]], None] | None = None) -> list[Outcome]:
    """Run `cases` with `concurrency` clients until done, past `deadline` (monotonic) or the server is gone."""
    # idle connections dropped after 1 s, well before uvicorn closes them (5 s): a request sent on a connection
    # the server is closing at that moment fails with a reset, a race of the client's making
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency,
                          keepalive_expiry=1.0)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=10)
    outcomes: list[Outcome] = []
    pending = iter(cases)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http, \
            openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, http_client=http,
                               timeout=REQUEST_TIMEOUT_S) as sdk:
        clients = Clients(base, key, http, sdk)

        async def worker() -> None:
            for case in pending:
                if time.monotonic() > deadline or not alive():
                    return
                outcomes.append(await run_case(clients, case))
                if progress is not None:
                    progress(outcomes)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


# -- the server -------------------------------------------------------------------------------------------
class WhaleServer:
    """`whale serve` in a subprocess on a free loopback port, with an API key; stopped on exit, whatever
    happened. Its output goes to a temporary log file (a pipe could fill up and stall it)."""

    def __init__(self, model: str, start_timeout_s: float = 300.0):
        self.model = model
        self.port = free_port()
        self.key = "soak-" + secrets.token_hex(8)
        self.base = f"http://127.0.0.1:{self.port}"
        self.start_timeout_s = start_timeout_s
        self.log = tempfile.NamedTemporaryFile(prefix="whale-soak-", suffix=".log", delete=False)
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> WhaleServer:
        command = [sys.executable, "-m", "whale.cli", "serve", "--model", self.model, "--host", "127.0.0.1",
                   "--port", str(self.port), "--api-key", self.key, "--log-level", "warning"]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_ready(self.process, self.base, self.start_timeout_s, probe="/health")
        except RuntimeError as exc:
            log = self.log_text()[-3000:]
            self.__exit__()
            raise RuntimeError(f"{exc}; whale serve's log:\n{log}") from None
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)

    def log_text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    @property
    def context(self) -> int:
        """The context length `whale serve` announces on its first line."""
        found = re.search(r"context (\d+)[,)]", self.log_text())
        if found is None:
            raise RuntimeError("whale serve did not print its context length")
        return int(found.group(1))

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1))

    def memory(self) -> Memory:
        return Memory(self.rss_kb() * 1024, int(self.metrics()["whale_kv_cache_bytes_written"]))

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.base}/metrics", headers={"Authorization": f"Bearer {self.key}"}, timeout=10).text
        values = {}
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if line and not line.startswith("#"):
                values[name] = float(value)
        return values

    def settle(self, timeout_s: float) -> dict[str, float]:
        """Poll /metrics until no request is left and every KV block is free, or `timeout_s` passed."""
        deadline = time.monotonic() + timeout_s
        while True:
            values = self.metrics()
            if all(values.get(g, 0) == 0 for g in GAUGES) or time.monotonic() > deadline:
                return values
            time.sleep(0.25)


# -- the report -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Criterion:
    key: str
    name: str
    measured: str
    passed: bool
    examples: tuple[Outcome, ...] = ()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


def shortened(value: Any, limit: int = 80) -> Any:
    """A request body for a report: long strings cut, with their length."""
    if isinstance(value, bytes):
        text = value.decode(errors="replace")
        return text if len(text) <= limit else f"{text[:limit]}... ({len(value):,} bytes)"
    if isinstance(value, str):
        return value if len(value) <= limit else f"{value[:limit]}... ({len(value):,} chars)"
    if isinstance(value, dict):
        return {k: shortened(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [shortened(v, limit) for v in value[:8]] + ([f"... ({len(value)} items)"] if len(value) > 8 else [])
    return value


@dataclass(frozen=True)
class Memory:
    """The server's resident memory and the part of its KV cache written so far, in bytes."""

    resident: int
    kv_written: int


@dataclass(frozen=True)
class TrendRow:
    """The server after each tenth of the run; latency of that tenth's valid requests answered in full."""

    done: int
    seconds: float
    rss_mib: float
    p50_ms: float
    p90_ms: float


@dataclass
class SoakReport:
    criteria: list[Criterion]
    outcomes: list[Outcome]
    planned: int
    concurrency: int
    seed: int
    phases: dict[str, float]  # seconds per phase: server start, warm-up, traffic, settle
    trend: list[TrendRow] = field(default_factory=list)
    server_metrics: dict[str, float] = field(default_factory=dict)
    server_log: str = ""

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.criteria)

    def criterion(self, key: str) -> Criterion:
        return next(c for c in self.criteria if c.key == key)

    def explain(self, key: str) -> str:
        """A criterion's measured value and its example requests and answers."""
        criterion = self.criterion(key)
        lines = [f"{criterion.name}: {criterion.measured}"]
        for outcome in criterion.examples:
            lines += [f"- {outcome.case.kind}: POST {outcome.case.path} "
                      f"{json.dumps(shortened(outcome.case.body), ensure_ascii=False)}",
                      f"  -> {outcome.label}: {outcome.problem}",
                      f"  answer: {outcome.excerpt[:300]!r}"]
        if key in ("crashes", "valid_5xx") and not criterion.passed and "Traceback" in self.server_log:
            lines.append("last traceback in the server log:\n" + self.server_log[self.server_log.rfind("Traceback"):])
        return "\n".join(lines)

    def render(self) -> str:
        phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items())
        statuses = Counter()
        for name, value in self.server_metrics.items():
            found = re.match(r'whale_requests_total\{.*status="(\d+)"', name)
            if found:
                statuses[found.group(1)] += int(value)
        out = [f"soak: {len(self.outcomes)} of {self.planned} requests at concurrency {self.concurrency}, seed "
               f"{self.seed}; {phases}",
               "server-side responses by status: " + " ".join(f"{k}x{v}" for k, v in sorted(statuses.items())),
               f"tracebacks in the server log: {self.server_log.count('Traceback')}",
               "", "| criterion | measured | result |", "|---|---|---|"]
        out += [f"| {c.name} | {c.measured} | {'PASS' if c.passed else 'FAIL'} |" for c in self.criteria]
        out += ["", "| kind | expect | requests | answers | problems | p50 ms | p90 ms | p99 ms | max ms |",
                "|---|---|---:|---|---:|---:|---:|---:|---:|"]
        by_kind: dict[str, list[Outcome]] = {}
        for outcome in self.outcomes:
            by_kind.setdefault(outcome.case.kind, []).append(outcome)
        answered = [o for o in self.outcomes if o.answered_in_full]
        rows = sorted(by_kind.items()) + [("valid, answered in full", answered), ("all", self.outcomes)]
        for kind, outcomes in rows:
            labels = Counter(o.label for o in outcomes)
            answers = " ".join(f"{label}x{n}" for label, n in sorted(labels.items()))
            expects = "/".join(sorted({o.case.expect for o in outcomes})) if kind in KINDS else ""
            latency = [o.latency_s * 1e3 for o in outcomes]
            cells = " | ".join(_ms(percentile(latency, q)) for q in (50, 90, 99, 100))
            out.append(f"| {kind} | {expects} | {len(outcomes)} | {answers} | "
                       f"{sum(1 for o in outcomes if o.problem)} | {cells} |")
        out += ["", "| requests done | s | RSS MiB | p50 ms | p90 ms |", "|---:|---:|---:|---:|---:|"]
        out += [f"| {r.done} | {r.seconds:.0f} | {r.rss_mib:.0f} | {_ms(r.p50_ms)} | {_ms(r.p90_ms)} |"
                for r in self.trend]
        failing = [c for c in self.criteria if not c.passed]
        if failing:
            out += ["", "failures:"] + [self.explain(c.key) for c in failing]
        return "\n".join(out)


def judge(server: WhaleServer, outcomes: list[Outcome], planned: int, gauges: dict[str, float], settle_s: float,
          warm: Memory, after: Memory | None, examples: int = 4) -> list[Criterion]:
    valid = [o for o in outcomes if o.case.expect != "invalid"]
    invalid = [o for o in outcomes if o.case.expect == "invalid"]
    server_5xx = [o for o in valid if (o.status or 0) >= 500]
    unanswered = [o for o in valid if o.problem and (o.status or 0) < 500]
    refused = [o for o in invalid if o.problem]
    alive = server.alive()
    leftover = {g.removeprefix("whale_"): gauges.get(g) for g in GAUGES}
    kv_growth = after.kv_written - warm.kv_written if after is not None else 0
    growth = (after.resident - kv_growth - warm.resident) / warm.resident if after is not None else float("inf")
    return [
        Criterion("crashes", "server crashes", "0 (alive)" if alive else
                  f"1 (exited with {server.process.returncode})", alive),
        Criterion("valid_5xx", "5xx on valid input", f"{len(server_5xx)} of {len(valid)}", not server_5xx,
                  tuple(server_5xx[:examples])),
        Criterion("valid_answers", "valid input answered (200 + well-formed body; refusals a 4xx naming the "
                  "feature)", f"{len(valid) - len(unanswered) - len(server_5xx)} of {len(valid)}", not unanswered,
                  tuple(unanswered[:examples])),
        Criterion("invalid_4xx", "invalid input: a 4xx in the route's error shape naming the problem",
                  f"{len(invalid) - len(refused)} of {len(invalid)}", not refused, _spread(refused, examples)),
        Criterion("engine_clean", "KV blocks free, no request left after the run",
                  ", ".join(f"{k} {v:g}" if v is not None else f"{k} missing" for k, v in leftover.items())
                  + f" (after {settle_s:.1f} s)", all(v == 0 for v in leftover.values())),
        Criterion("memory", "resident memory after the run vs after warm-up, less KV-cache storage first written "
                  f"in between (at most +{MEMORY_GROWTH_LIMIT:.0%})",
                  f"{warm.resident / MIB:.0f} -> " + (f"{after.resident / MIB:.0f} MiB, {kv_growth / MIB:.0f} MiB of "
                                                       f"it KV cache ({growth:+.1%})"
                                                       if after is not None else "no process"),
                  growth <= MEMORY_GROWTH_LIMIT),
        Criterion("completed", "planned requests run within the time limit", f"{len(outcomes)} of {planned}",
                  len(outcomes) == planned),
    ]


def _spread(outcomes: list[Outcome], count: int) -> tuple[Outcome, ...]:
    """Up to `count` examples, one per distinct problem first."""
    firsts = list({(o.case.kind, o.problem.split(":")[0]): o for o in reversed(outcomes)}.values())[::-1]
    return tuple((firsts + [o for o in outcomes if o not in firsts])[:count])


def run_soak(requests: int = 2000, concurrency: int = 32, seed: int = 0, model: str = "default",
             time_limit_s: float | None = None, settle_s: float = 10.0,
             progress: Callable[[str], None] | None = None) -> SoakReport:
    """Start `whale serve`, warm it up, run `requests` planned requests at `concurrency`, judge everything and
    stop the server. `time_limit_s` bounds the traffic (default: 60 s + 1 s a request)."""
    if requests < MIN_REQUESTS:
        raise ValueError(f"a soak needs at least {MIN_REQUESTS} requests (one of every kind, and the last six)")
    time_limit_s = time_limit_s if time_limit_s is not None else 60.0 + requests
    say = progress or (lambda text: None)
    phases, mark = {}, time.monotonic()

    def lap(name: str) -> None:
        nonlocal mark
        phases[name], mark = time.monotonic() - mark, time.monotonic()

    with WhaleServer(model) as server:
        lap("server start")
        say(f"whale serve up on {server.base} (context {server.context}); warming up")
        # every kind of request once (and a few more, up to one per client), answers not judged
        warmup = plan(max(concurrency, MIN_REQUESTS), seed + 1, server.context)
        asyncio.run(drive(server.base, server.key, warmup, concurrency, time.monotonic() + REQUEST_TIMEOUT_S,
                          server.alive))
        lap("warm-up")
        warm = server.memory()
        cases = plan(requests, seed, server.context)
        step, trend = max(1, requests // 10), []

        def sample(outcomes: list[Outcome]) -> None:
            if len(outcomes) % step or not server.alive():
                return
            window = [o.latency_s * 1e3 for o in outcomes[-step:] if o.answered_in_full]
            trend.append(TrendRow(len(outcomes), time.monotonic() - mark, server.rss_kb() / 1024,
                                  percentile(window, 50), percentile(window, 90)))
            say(f"{len(outcomes)}/{requests} requests, {trend[-1].seconds:.0f} s, RSS {trend[-1].rss_mib:.0f} MiB, "
                f"p50 {_ms(trend[-1].p50_ms)} ms")

        outcomes = asyncio.run(drive(server.base, server.key, cases, concurrency, time.monotonic() + time_limit_s,
                                     server.alive, sample))
        lap("traffic")
        gauges = server.settle(settle_s) if server.alive() else {}
        lap("settle")
        after = server.memory() if server.alive() else None
        criteria = judge(server, outcomes, requests, gauges, phases["settle"], warm, after)
        return SoakReport(criteria, outcomes, requests, concurrency, seed, phases, trend, gauges, server.log_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="default")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds of traffic at most "
                        "(default: 60 + 1 per request)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through WhaleServer.stop
    try:
        report = run_soak(args.requests, args.concurrency, args.seed, args.model, args.time_limit,
                          progress=lambda text: print(text, file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        print("soak: interrupted (the server is stopped)", file=sys.stderr)
        return 130
    print(report.render())
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
