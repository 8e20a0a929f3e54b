"""What a request must be before any work starts: strict types (no "12" or true where a number is due), inputs
the server cannot take refused rather than dropped, the Anthropic route's client errors as 4xx, a size limit
answered before parsing, the API key checked before the body, and long prompts prepared off the event loop."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from server_harness import serving

from whale.server.state import ServerState

HELLO = [{"role": "user", "content": "Say hello."}]
CHAT = {"model": "deepseek-chat", "messages": HELLO, "max_tokens": 2}
ANTHROPIC = {"model": "deepseek-chat", "messages": HELLO, "max_tokens": 2}
WEATHER = {"name": "get_weather", "input_schema": {"type": "object"}}


@pytest.fixture(scope="module")
def server(default_llm):
    with serving(default_llm.loaded, engine_options={"num_kv_blocks": 256, "max_num_seqs": 4}) as served:
        yield served


@pytest.fixture(scope="module")
def url(server):
    return server[1]


def _openai_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error["message"]


def _anthropic_error(response: httpx.Response) -> str:
    assert 400 <= response.status_code < 500, response.text
    body = response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    return body["error"]["message"]


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", "12"), ("max_tokens", 12.0), ("max_tokens", True), ("temperature", "hot"),
    ("temperature", True), ("stream", "yes"), ("logprobs", 1), ("seed", "7"), ("stop", 3)])
def test_loose_types_are_refused_not_coerced(url, field, value):
    message = _openai_error(httpx.post(f"{url}/chat/completions", json={**CHAT, field: value}), 400)
    assert field in message


def test_completions_and_anthropic_types_are_strict_too(url):
    fim = {"model": "deepseek-chat", "prompt": "def f():", "max_tokens": "12"}
    assert "max_tokens" in _openai_error(httpx.post(f"{url}/completions", json=fim), 400)
    for field, value in (("top_k", False), ("max_tokens", "12"), ("temperature", "0.5")):
        reply = httpx.post(f"{url}/anthropic/v1/messages", json={**ANTHROPIC, field: value})
        assert reply.status_code == 400 and field in _anthropic_error(reply)


def test_unknown_fields_are_ignored(url):
    reply = httpx.post(f"{url}/chat/completions", json={**CHAT, "user": "u-1", "logit_bias": {"1": 2}})
    assert reply.status_code == 200, reply.text


def test_more_than_one_choice_is_refused_naming_n(url):
    message = _openai_error(httpx.post(f"{url}/chat/completions", json={**CHAT, "n": 1000}), 400)
    assert "'n' is 1000" in message
    fim = {"model": "deepseek-chat", "prompt": "def f():", "max_tokens": 2, "n": 2}
    assert "'n' is 2" in _openai_error(httpx.post(f"{url}/completions", json=fim), 400)
    one = httpx.post(f"{url}/chat/completions", json={**CHAT, "n": 1})
    assert one.status_code == 200 and len(one.json()["choices"]) == 1


def test_reasoning_effort_takes_the_documented_values_only(url):
    message = _openai_error(httpx.post(f"{url}/chat/completions", json={**CHAT, "reasoning_effort": "bogus"}), 422)
    assert "reasoning_effort" in message and "'max'" in message
    for effort in ("low", "medium", "high", "max", "xhigh"):
        reply = httpx.post(f"{url}/chat/completions", json={**CHAT, "reasoning_effort": effort})
        assert reply.status_code == 200, reply.text


def test_an_image_part_is_refused_not_dropped(url):
    parts = [{"type": "text", "text": "What is in this picture?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    message = _openai_error(httpx.post(f"{url}/chat/completions",
                                       json={**CHAT, "messages": [{"role": "user", "content": parts}]}), 400)
    assert "'image_url' are not supported" in message
    text_only = [{"type": "text", "text": "Say"}, {"type": "text", "text": " hello."}]
    reply = httpx.post(f"{url}/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": text_only}]})
    assert reply.status_code == 200, reply.text


def _with_tool_result(block: dict) -> list[dict]:
    return [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]},
            {"role": "user", "content": [block]}]


# Each was a 500 with two tracebacks (issue 21's fuzzing); each must be a 4xx that names what to change.
ANTHROPIC_CLIENT_ERRORS = {
    "tool_choice names a tool not in tools": ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "x"}},
                                             "not in 'tools'"),
    "tool_choice any without tools": ({"tool_choice": {"type": "any"}}, "needs 'tools'"),
    "an empty tool name": ({"tools": [{**WEATHER, "name": ""}]}, "function name ''"),
    "a tool name with spaces": ({"tools": [{**WEATHER, "name": "bad name!"}]}, "function name 'bad name!'"),
    "17 stop sequences": ({"stop_sequences": [str(i) for i in range(17)]}, "at most 16"),
    "tool_result without tool_use_id": ({"messages": _with_tool_result({"type": "tool_result", "content": "x"})},
                                        "tool_use_id"),
    "tool_result with a numeric id": ({"messages": _with_tool_result({"type": "tool_result", "tool_use_id": 5,
                                                                      "content": "x"})}, "tool_use_id"),
    "a text block whose text is a number": ({"messages": [{"role": "user", "content": [{"type": "text",
                                                                                        "text": 5}]}]}, "text"),
    "numeric tool_result content": ({"messages": _with_tool_result({"type": "tool_result", "tool_use_id": "t1",
                                                                    "content": 42})}, "content"),
    "a system block with text null": ({"system": [{"type": "text", "text": None}]}, "system"),
    "an image block": ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
                       "'image' are not supported"),
}


@pytest.mark.parametrize("case", ANTHROPIC_CLIENT_ERRORS)
def test_anthropic_client_errors_are_4xx_in_its_shape(url, case):
    fields, named = ANTHROPIC_CLIENT_ERRORS[case]
    reply = httpx.post(f"{url}/anthropic/v1/messages", json={**ANTHROPIC, **fields})
    assert named in _anthropic_error(reply)


def test_an_oversize_body_is_a_413_before_parsing(url, server):
    limit = server[0].max_request_bytes
    huge = {**CHAT, "messages": [{"role": "user", "content": "x" * (limit + 1)}]}
    message = _openai_error(httpx.post(f"{url}/chat/completions", json=huge), 413)
    assert f"limit of {limit} bytes" in message and "--max-request-bytes" in message
    # a chunked body has no Content-Length: it is counted as it arrives, and still not parsed
    chunks = (b"x" * 65536 for _ in range(limit // 65536 + 2))
    chunked = httpx.post(f"{url}/chat/completions", content=chunks, headers={"content-type": "application/json"})
    assert "Request Entity Too Large" in _openai_error(chunked, 413)
    anthropic = httpx.post(f"{url}/anthropic/v1/messages", json={**ANTHROPIC, "system": "x" * (limit + 1)})
    assert anthropic.status_code == 413 and "Too Large" in _anthropic_error(anthropic)


def test_a_long_prompt_does_not_stall_the_event_loop(url, server):
    """A prompt just under the size limit takes a second or two to render and tokenize: on a worker thread,
    with the tokenizer's GIL released, while /health keeps answering."""
    words = (server[0].max_request_bytes - 1000) // 6
    body = {**CHAT, "messages": [{"role": "user", "content": "whale " * words}]}
    result: dict = {}

    def send() -> None:
        start = time.monotonic()
        result["reply"] = httpx.post(f"{url}/chat/completions", json=body, timeout=60)
        result["took"] = time.monotonic() - start

    sender = threading.Thread(target=send)
    sender.start()
    slowest = 0.0
    while sender.is_alive():
        start = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        slowest = max(slowest, time.monotonic() - start)
    assert "maximum context length" in _openai_error(result["reply"], 400)
    assert slowest < result["took"] / 2, (slowest, result["took"])


def test_a_missing_api_key_wins_over_a_bad_body(server):
    state = ServerState(server[0].engine, server[0].served, api_keys=("sk-one",))
    from server_harness import running_server

    with running_server(state) as url:
        bad_json = httpx.post(f"{url}/chat/completions", content=b"{not json",
                              headers={"content-type": "application/json"})
        assert "no API key" in _openai_error(bad_json, 401)
        huge = httpx.post(f"{url}/chat/completions", content=b"x" * (state.max_request_bytes + 1))
        assert "no API key" in _openai_error(huge, 401)
        keyed = httpx.post(f"{url}/chat/completions", content=b"{not json",
                           headers={"content-type": "application/json", "authorization": "Bearer sk-one"})
        assert "not valid JSON" in _openai_error(keyed, 400)
        assert httpx.get(f"{url}/health").status_code == 200


def test_openapi_documents_every_status_and_the_real_error_body(url):
    doc = httpx.get(f"{url}/openapi.json").json()
    for path, error_schema in (("/chat/completions", "ErrorResponse"), ("/completions", "ErrorResponse"),
                               ("/anthropic/v1/messages", "AnthropicErrorResponse")):
        responses = doc["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "413", "422", "429", "500", "503"} <= set(responses)
        for status in ("400", "413", "422", "503"):
            assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith(error_schema)
        assert "text/event-stream" in responses["200"]["content"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    max_tokens = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["max_tokens"]
    assert {"type": "integer", "minimum": 1} in max_tokens["anyOf"]


def test_a_negative_token_id_prompt_is_refused(url):
    fim = {"model": "deepseek-chat", "prompt": [-2011], "max_tokens": 2, "echo": True}
    assert "greater than or equal to 0" in _openai_error(httpx.post(f"{url}/completions", json=fim), 400)
