"""Every error path over httpx and the SDK: the error body, 400 vs 422, the over-long prompt with both numbers,
auth, 429 at the concurrency limit, 503 from a full engine, keep-alives while queued, and one failing request
next to a healthy one. Disconnects: test_disconnects.py."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from server_harness import DEFAULT_OPTIONS, FAST_TIMINGS, running_server, serving

from whale.errors import RequestFailedError
from whale.server.state import ServerState

HELLO = [{"role": "user", "content": "Say hello."}]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9,"
STORY = [{"role": "user", "content": "Write a very long story about a whale who learns to sing."}]


@pytest.fixture(scope="module")
def default_server(default_llm):
    with serving(default_llm.loaded, **DEFAULT_OPTIONS) as served:
        yield served


@pytest.fixture(scope="module")
def default_state(default_server):
    return default_server[0]


@pytest.fixture(scope="module")
def default_url(default_server):
    return default_server[1]


def _chat(url: str, **fields) -> httpx.Response:
    return httpx.post(f"{url}/chat/completions", json={"model": "deepseek-chat", "messages": HELLO, **fields},
                      timeout=30)


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error["message"]


def test_malformed_bodies_are_400_and_name_the_field(default_url):
    bad_json = httpx.post(f"{default_url}/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert "not valid JSON" in _error(bad_json, 400)
    assert "messages" in _error(httpx.post(f"{default_url}/chat/completions", json={"model": "deepseek-chat"}), 400)
    assert "messages" in _error(_chat(default_url, messages="hello"), 400)
    assert "Model Not Exist" in _error(_chat(default_url, model="gpt-4"), 400)


def test_out_of_range_values_are_422_and_say_what_to_change(default_url):
    assert "temperature" in _error(_chat(default_url, temperature=3), 422)
    assert "[1, 8192]" in _error(_chat(default_url, max_tokens=9000), 422)
    assert "requires 'logprobs'" in _error(_chat(default_url, top_logprobs=2), 422)
    assert "at most 16" in _error(_chat(default_url, stop=[str(i) for i in range(17)]), 422)
    prefix_first = [{"role": "assistant", "content": "x", "prefix": True}, *HELLO]
    assert "last message" in _error(_chat(default_url, messages=prefix_first), 422)


def test_a_prompt_longer_than_the_context_gets_a_400_with_both_numbers(default_url, default_state):
    limit = default_state.served.max_model_len
    message = _error(_chat(default_url, messages=[{"role": "user", "content": "whale " * (limit + 100)}]), 400)
    assert f"maximum context length is {limit} tokens" in message
    assert "in the messages, 0 in the completion" in message
    too_many = _error(_chat(default_url, max_tokens=limit), 400)
    room = int(re.search(r"set max_tokens to at most (\d+)", too_many).group(1))
    assert room < limit and f"({limit - room} in the messages, {limit} in the completion)" in too_many
    body = {"model": "deepseek-chat", "messages": HELLO, "max_tokens": room, "stream": True}
    with httpx.stream("POST", f"{default_url}/chat/completions", json=body, timeout=30) as reply:
        assert reply.status_code == 200  # the largest that fits is taken (the stream is left at once)


def test_a_capability_the_model_lacks_is_a_400(default_url):
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    assert "does not support function calling" in _error(_chat(default_url, tools=tools), 400)


def test_unknown_routes_get_the_error_shape(default_url):
    assert _error(httpx.get(f"{default_url}/v1/nothing"), 404)


def test_sdk_raises_its_typed_errors(default_url):
    client = openai.OpenAI(base_url=default_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="deepseek-chat", messages=HELLO, top_p=0)


@pytest.fixture(scope="module")
def auth_url(default_state):
    state = ServerState(default_state.engine, default_state.served, api_keys=("sk-one", "sk-two"),
                        timings=FAST_TIMINGS)
    with running_server(state) as url:
        yield url


def test_api_keys_guard_every_route_but_health_and_metrics(auth_url, default_state):
    assert "no API key" in _error(httpx.get(f"{auth_url}/models"), 401)
    assert "invalid" in _error(httpx.get(f"{auth_url}/models", headers={"Authorization": "Bearer nope"}), 401)
    assert httpx.get(f"{auth_url}/models", headers={"Authorization": "Bearer sk-two"}).status_code == 200
    assert httpx.get(f"{auth_url}/models", headers={"x-api-key": "sk-one"}).status_code == 200
    assert httpx.get(f"{auth_url}/openapi.json").status_code == 401
    assert httpx.get(f"{auth_url}/health").status_code == 200
    assert httpx.get(f"{auth_url}/metrics").status_code == 200  # a Prometheus scraper has no key
    assert httpx.get(f"{auth_url}/metrics/recent").status_code == 200
    assert httpx.get(f"{auth_url}/playground").status_code == 200  # the page asks for the key itself
    assert httpx.get(f"{auth_url}/playground/plan", params={"model": "deepseek-v3"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=auth_url, api_key="wrong", max_retries=0).models.list()
    protected = ServerState(default_state.engine, default_state.served, api_keys=("sk-one",), protect_metrics=True,
                            timings=FAST_TIMINGS)
    with running_server(protected) as url:
        assert "no API key" in _error(httpx.get(f"{url}/metrics"), 401)
        assert "no API key" in _error(httpx.get(f"{url}/metrics/recent"), 401)
        assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer sk-one"}).status_code == 200


def _wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def single_seat(default_llm):
    """An engine that runs one request at a time and queues one more: the next one is refused with a 503."""
    with serving(default_llm.loaded, engine_options={"max_num_seqs": 1, "num_kv_blocks": 64},
                 max_waiting=1) as served:
        yield served


def _hold(url: str) -> httpx.Response:
    """Open a long streaming request (counting rarely ends early); closing it aborts it (tested below)."""
    body = {"model": "deepseek-chat", "prompt": COUNTING, "max_tokens": 400, "temperature": 0, "stream": True}
    return httpx.stream("POST", f"{url}/completions", json=body, timeout=60)


def test_queued_requests_get_keepalives_and_a_full_engine_gets_a_503(single_seat):
    state, url = single_seat
    short = {"model": "deepseek-chat", "messages": HELLO, "max_tokens": 2}
    queued: dict = {}
    with _hold(url) as holder:
        holding = holder.iter_lines()  # kept: a dropped line iterator closes the response
        next(holding)  # the first request holds the only seat
        waiter = threading.Thread(target=lambda: queued.update(r=httpx.post(f"{url}/chat/completions", json=short,
                                                                            timeout=60)))
        waiter.start()
        assert _wait_until(lambda: state.engine.num_unfinished == 2)
        refused = httpx.post(f"{url}/chat/completions", json=short, timeout=10)
        assert "retry later" in _error(refused, 503)
        time.sleep(2 * FAST_TIMINGS.keepalive_s)
    waiter.join(timeout=60)
    response = queued["r"]
    assert response.status_code == 200 and response.text.startswith("\n")  # blank-line keep-alives first
    assert response.json()["choices"][0]["message"]["content"] is not None


def test_streaming_keepalive_comments_while_queued(single_seat):
    _, url = single_seat
    short = {"model": "deepseek-chat", "messages": HELLO, "max_tokens": 2, "stream": True}
    with _hold(url) as holder:
        holding = holder.iter_lines()
        next(holding)
        with httpx.stream("POST", f"{url}/chat/completions", json=short, timeout=60) as queued:
            lines = queued.iter_lines()
            opening = [next(lines), next(lines)]  # the role chunk goes out at once, then the wait
            waiting = [next(lines), next(lines)]
            holder.close()  # free the seat so the queued request runs
            rest = [line for line in lines if line]
    assert opening[0].startswith("data: ") and '"role": "assistant"' in opening[0]
    assert waiting == [": keep-alive", ""]
    assert rest[-1] == "data: [DONE]"


def test_concurrency_limit_answers_429(default_state):
    state = ServerState(default_state.engine, default_state.served, max_concurrent_requests=1, timings=FAST_TIMINGS)
    with running_server(state) as url:
        body = {"model": "deepseek-chat", "messages": STORY, "max_tokens": 8, "stream": True}
        with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=60) as running:
            lines = running.iter_lines()
            next(lines)
            refused = httpx.post(f"{url}/chat/completions", json=body, timeout=10)
            assert "Rate Limit Reached" in _error(refused, 429)
            assert refused.headers["retry-after"] == "1"
            assert [line for line in lines if line][-1] == "data: [DONE]"
        assert _chat(url, max_tokens=2).status_code == 200


class FaultInjectingEngine:
    """Test double wrapping the real AsyncEngine: a request with max_tokens == 13 fails after its second delta
    with the RequestFailedError the real engine raises when one request's sampling fails (that engine-side
    isolation is tested in tests/test_async_engine.py); every other request goes to the real engine untouched."""

    def __init__(self, engine):
        self.engine = engine

    async def generate(self, prompt_ids, params, request_id) -> AsyncIterator:
        count = 0
        async for delta in self.engine.generate(prompt_ids, params, request_id):
            count += 1
            if params.max_tokens == 13 and count > 2:
                raise RequestFailedError("sampling failed: injected")
            yield delta


def test_a_failing_request_ends_alone(default_state):
    state = ServerState(FaultInjectingEngine(default_state.engine), default_state.served, timings=FAST_TIMINGS)
    with running_server(state) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        healthy = client.chat.completions.create(model="deepseek-chat", messages=STORY, max_tokens=20,
                                                 temperature=0, stream=True)
        failing = client.chat.completions.create(model="deepseek-chat", messages=STORY, max_tokens=13,
                                                 temperature=0, stream=True)
        failed = [c.choices[0].finish_reason for c in failing if c.choices and c.choices[0].finish_reason]
        finished = [c.choices[0].finish_reason for c in healthy if c.choices and c.choices[0].finish_reason]
        assert failed == ["insufficient_system_resource"] and finished in (["length"], ["stop"])
        whole = client.chat.completions.create(model="deepseek-chat", messages=STORY, max_tokens=13,
                                               temperature=0)
        assert whole.choices[0].finish_reason == "insufficient_system_resource"
        assert whole.choices[0].message.content
