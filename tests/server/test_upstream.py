"""whale's front over engines that run elsewhere (`whale serve --upstream`): the requests go out as token ids
(SGLang's native `/generate`, or vLLM's `/v1/completions`), every token comes back through the front's own
Request, and the controls the upstream cannot run (the reasoning budget, a grammar that waits for the end of
thinking) hold from the front.

Two setups, all real HTTP on loopback: the tiny random DeepSeek-V3.2 checkpoint served by a whale replica with
the front straight over it (the reply through the front must equal the replica's own reply, token for token);
and the real SGLang model gateway (`sglang-router`, PyPI) in front of two `whale serve` subprocesses of the
default model, with the front over the gateway (the replicas share the work, and `kill -9` of one under load
loses no request that had not started and ends every cut stream cleanly)."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from server_harness import FAST_TIMINGS, running_server, serving
from test_server_cli import _free_port, _wait_ready

from whale.generation_defaults import GenerationDefaults
from whale.server.app import upstream_state

GREEDY = GenerationDefaults(temperature=0.0, source="the test")
ASK = [{"role": "user", "content": "What is 2 + 2?"}]
SCHEMA = {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"],
          "additionalProperties": False}


@pytest.fixture(scope="module", params=["sglang", "vllm"])
def replica_and_front(request, tiny_path, default_llm):
    """(replica client, front client, front state, replica state): a whale server on the tiny checkpoint, and a
    front over it in each protocol (SGLang's /generate; vLLM's /v1/completions with token ids, which whale's own
    completions route takes too)."""
    from whale.models.loader import load_model

    with serving(load_model(str(tiny_path), dtype="float32")) as (replica, replica_url):
        replica.served.defaults = GREEDY
        front = upstream_state(str(tiny_path), [replica_url], protocol=request.param, timings=FAST_TIMINGS)
        front.served.defaults = GREEDY
        with running_server(front) as front_url:
            yield (openai.OpenAI(base_url=replica_url, api_key="unused", max_retries=0),
                   openai.OpenAI(base_url=front_url, api_key="unused", max_retries=0), front, replica)


def _both(replica_and_front, **request):
    replica, front, *_ = replica_and_front
    return replica.chat.completions.create(**request), front.chat.completions.create(**request)


def test_front_reads_no_weights(replica_and_front):
    front = replica_and_front[2]
    assert front.served.kernels == "none" and front.served.name == "deepseek-v3.2-tiny"


def test_reply_through_the_front_equals_the_replicas_own(replica_and_front):
    local, remote = _both(replica_and_front, model="deepseek-chat", messages=ASK, max_tokens=24)
    assert remote.choices[0].message.content == local.choices[0].message.content
    assert remote.choices[0].finish_reason == local.choices[0].finish_reason == "length"
    assert remote.usage.prompt_tokens == local.usage.prompt_tokens
    assert remote.usage.completion_tokens == local.usage.completion_tokens == 24


def test_logprobs_through_the_front_equal_the_replicas_own(replica_and_front):
    local, remote = _both(replica_and_front, model="deepseek-chat", messages=ASK, max_tokens=6, logprobs=True,
                          top_logprobs=2)
    mine, theirs = remote.choices[0].logprobs.content, local.choices[0].logprobs.content
    assert [t.token for t in mine] == [t.token for t in theirs] and len(mine) == 6
    for a, b in zip(mine, theirs, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t.token for t in a.top_logprobs] == [t.token for t in b.top_logprobs]


def test_reasoning_budget_holds_through_the_front(replica_and_front):
    """Random weights never end their thinking: the front forces the end at the budget and continues with a new
    upstream call, which must give what the replica's own engine gives under the same budget."""
    for budget in (3, 8, 20):
        local, remote = _both(replica_and_front, model="deepseek-reasoner", messages=ASK, max_tokens=40,
                              extra_body={"thinking": {"type": "enabled", "budget_tokens": budget}})
        assert 0 < remote.usage.completion_tokens_details.reasoning_tokens <= budget
        assert remote.usage.completion_tokens_details.reasoning_tokens == \
            local.usage.completion_tokens_details.reasoning_tokens
        assert remote.choices[0].message.reasoning_content == local.choices[0].message.reasoning_content
        assert remote.choices[0].message.content == local.choices[0].message.content
        assert remote.choices[0].message.content  # the answer had its tokens
        assert remote.usage.completion_tokens == local.usage.completion_tokens


def test_json_schema_after_thinking_through_the_front(replica_and_front):
    """The thinking is free; the answer is held to the schema by the upstream from its first token on."""
    request = {"model": "deepseek-reasoner", "messages": ASK, "max_tokens": 60,
               "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}},
               "extra_body": {"thinking": {"type": "enabled", "budget_tokens": 10}}}
    local, remote = _both(replica_and_front, **request)
    answer = remote.choices[0].message.content
    assert set(json.loads(answer)) == {"answer"} and isinstance(json.loads(answer)["answer"], bool)
    assert answer == local.choices[0].message.content
    assert remote.choices[0].message.reasoning_content == local.choices[0].message.reasoning_content


def test_what_the_upstream_cannot_enforce_is_a_400(replica_and_front):
    front = replica_and_front[1]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as refused:
        front.chat.completions.create(model="deepseek-chat", messages=ASK, tools=tools, tool_choice="required")
    assert "Lark grammar" in refused.value.message
    assert refused.value.body["type"] == "invalid_request_error"


def test_a_client_that_leaves_frees_the_upstream_request(replica_and_front):
    _, front, front_state, replica = replica_and_front
    stream = front.chat.completions.create(model="deepseek-chat", messages=ASK, max_tokens=2000, stream=True)
    for _ in zip(range(3), stream, strict=False):
        pass
    assert front_state.engine.num_unfinished == 1 and replica.engine.num_unfinished == 1
    stream.close()
    deadline = time.monotonic() + 5
    while (front_state.engine.num_unfinished or replica.engine.num_unfinished) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert front_state.engine.num_unfinished == 0 and replica.engine.num_unfinished == 0


def test_an_unreachable_upstream_is_a_503_in_the_deepseek_shape(tiny_path):
    front = upstream_state(str(tiny_path), [f"http://127.0.0.1:{_free_port()}"], timings=FAST_TIMINGS)
    with running_server(front) as url:
        reply = httpx.post(f"{url}/v1/chat/completions", json={"model": "deepseek-chat", "messages": ASK})
    assert reply.status_code == 503
    assert "no upstream engine accepts a connection" in reply.json()["error"]["message"]


def test_local_engine_options_are_refused_with_an_upstream():
    command = [sys.executable, "-m", "whale.cli", "serve", "--model", "default", "--upstream", "http://127.0.0.1:9",
               "--speculative", "ngram", "--port", str(_free_port())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "with --upstream there is none" in result.stderr


# -- the real gateway in front of two whale replicas ----------------------------------------------------------
REPLICA_CONTEXT = 1024  # the front takes the model's 8192
STORY_TOKENS = 400


def _replica(port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "whale.cli", "serve", "--model", "default", "--host", "127.0.0.1",
               "--port", str(port), "--threads", "1", "--max-model-len", str(REPLICA_CONTEXT), "--log-level", "warning"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def gateway_cluster(default_llm):
    """(front URL, replica processes, replica URLs, gateway URL) with the front (API key sk-front) over the
    gateway over two replicas."""
    ports = [_free_port(), _free_port()]
    replicas = [_replica(port) for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    gateway_port = _free_port()
    gateway = None
    try:
        for process, url in zip(replicas, urls, strict=True):
            _wait_ready(process, url)
        gateway = subprocess.Popen(
            [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *urls, "--host", "127.0.0.1",
             "--port", str(gateway_port), "--policy", "round_robin", "--log-level", "warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        deadline = time.monotonic() + 60
        while True:  # until both workers are registered under the replicas' served name
            try:
                listed = httpx.get(f"{gateway_url}/workers", timeout=2).json()
                if len(listed.get("workers", [])) == 2:
                    break
            except (httpx.TransportError, ValueError):
                pass
            assert gateway.poll() is None and time.monotonic() < deadline, "the gateway did not register both replicas"
            time.sleep(0.5)
        front = upstream_state("default", [gateway_url], api_keys=("sk-front",), timings=FAST_TIMINGS)
        with running_server(front) as front_url:
            yield front_url, replicas, urls, gateway_url
    finally:
        for process in [*replicas, *([gateway] if gateway else [])]:
            process.kill()
            process.wait(timeout=20)


def _generate_count(url: str) -> int:
    text = httpx.get(f"{url}/metrics").text
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith('whale_requests_total{route="/generate"'))


def test_gateway_names_the_model_and_spreads_requests(gateway_cluster):
    front_url, _, urls, gateway_url = gateway_cluster
    workers = httpx.get(f"{gateway_url}/workers").json()["workers"]
    assert {w["model_id"] for w in workers} == {"smollm2-135m-instruct"}, workers
    before = [_generate_count(url) for url in urls]
    client = openai.OpenAI(base_url=front_url, api_key="sk-front", max_retries=0)
    for _ in range(6):
        reply = client.chat.completions.create(model="deepseek-chat", messages=ASK, max_tokens=4)
        assert reply.choices[0].message.content and reply.usage.completion_tokens <= 4
    served = [_generate_count(url) - b for url, b in zip(urls, before, strict=True)]
    assert served == [3, 3], served


def test_clients_of_the_gateway_itself_keep_their_length_limit(gateway_cluster):
    """The gateway rewrites a chat request's max_tokens to max_completion_tokens on its way to the replica; whale
    reads either, so a client that talks to the gateway directly still gets its limit."""
    gateway_url = gateway_cluster[3]
    reply = httpx.post(f"{gateway_url}/v1/chat/completions", timeout=60,
                       json={"model": "smollm2-135m-instruct", "messages": ASK, "max_tokens": 3})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] <= 3


def test_auth_and_errors_at_the_front(gateway_cluster):
    """The key is the front's; a refusal by a replica (its context is shorter than the front's) comes back
    through the gateway as a 400 in the DeepSeek shape, with the replica's reason."""
    front_url = gateway_cluster[0]
    assert httpx.post(f"{front_url}/v1/chat/completions", json={}).status_code == 401
    long = [{"role": "user", "content": "whale " * 1500}]
    reply = httpx.post(f"{front_url}/v1/chat/completions", headers={"Authorization": "Bearer sk-front"},
                       json={"model": "deepseek-chat", "messages": long, "max_tokens": 8})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "upstream engine refused" in error["message"] and f"at most {REPLICA_CONTEXT} tokens" in error["message"]


def _stream(front_url: str, started: list) -> tuple[list[str], str | None, int | None]:
    """One long streamed chat through the front: (text pieces, finish_reason, completion tokens); `started`
    collects the streams that have their first token."""
    pieces, finish, tokens = [], None, None
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": STORY_TOKENS, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{front_url}/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": "Bearer sk-front"}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                pieces.append("[DONE]")
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content") and id(pieces) not in started:
                    started.append(id(pieces))
                pieces.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
    return pieces, finish, tokens


def _streams_while_killing(front_url: str, count: int, replica: subprocess.Popen) -> list:
    started: list = []
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(_stream, front_url, started) for _ in range(count)]
        deadline = time.monotonic() + 60
        while len(started) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        replica.send_signal(signal.SIGKILL)
        return [f.result(timeout=180) for f in futures]


def test_kill_replicas_under_load(gateway_cluster):
    """12 streams under way on two replicas, one killed: the gateway cannot move a stream it has started, but
    the front resumes each cut reply on the live replica from the tokens it has, so every reply completes with
    all its tokens. Then the last replica killed under 4 streams: nothing is left to resume on, and each stream
    ends cleanly, finish_reason insufficient_system_resource (DeepSeek's ending for a reply cut short), [DONE]."""
    front_url, replicas, _, _ = gateway_cluster
    results = _streams_while_killing(front_url, 12, replicas[0])
    assert all(pieces[-1] == "[DONE]" for pieces, _, _ in results)
    for _, finish, tokens in results:
        assert finish == "stop" or (finish == "length" and tokens == STORY_TOKENS), (finish, tokens)
    results = _streams_while_killing(front_url, 4, replicas[1])
    assert all(pieces[-1] == "[DONE]" for pieces, _, _ in results)
    assert {finish for _, finish, _ in results} == {"insufficient_system_resource"}
