"""The complexity route through the real server on the tiny random DeepSeek-V3.2 checkpoint (both thinking modes,
the real tokenizer) with the shipped difficulty model: `deepseek-auto` picks the mode and the budget per request,
says so in headers, usage and /metrics, and yields to the request's own `thinking` and to a key's fixed mode.
Random weights never end their thinking, so a budget that holds is the engine's doing."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest
from server_harness import serving

from whale.route.policy import NON_THINKING, THINKING, Band, RoutePolicy, Router

HARD = "Prove that there are infinitely many primes of the form 4k + 3."
EASY = "hi! how's your day going?"
BANDS = (Band("fast", 0.0, NON_THINKING), Band("think", 0.5, THINKING, 6), Band("deep", 0.8, THINKING, 12))
KEYS = ("sk-app", "sk-research")


@pytest.fixture(scope="module")
def routed(tiny_path, default_llm):
    from whale.models.loader import load_model

    router = Router(RoutePolicy(bands=BANDS, key_modes={"sk-research": THINKING}))
    with serving(load_model(str(tiny_path), dtype="float32"), router=router, api_keys=KEYS) as (state, url):
        yield state, url, openai.OpenAI(base_url=url, api_key="sk-app", max_retries=0)


def _ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_auto_is_served_and_an_easy_prompt_runs_without_thinking(routed):
    _, _, client = routed
    assert {"deepseek-auto", "auto"} <= {m.id for m in client.models.list()}
    raw = client.chat.completions.with_raw_response.create(model="deepseek-auto", messages=_ask(EASY), max_tokens=8)
    reply = raw.parse()
    assert raw.headers["x-whale-route-mode"] == "non-thinking" and "x-whale-route-budget" not in raw.headers
    score = float(raw.headers["x-whale-route-score"])
    assert 0 <= score < 0.5
    assert reply.model == "deepseek-auto"
    assert "reasoning_content" not in (reply.choices[0].message.model_extra or {})
    assert reply.usage.completion_tokens_details.reasoning_tokens == 0
    assert reply.usage.model_extra["whale_route"] == {"mode": "non-thinking", "budget": None,
                                                      "score": round(score, 4), "band": "fast", "reason": "score"}


def test_a_hard_prompt_thinks_within_its_bands_budget(routed):
    _, _, client = routed
    for seed in range(3):
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=_ask(HARD), max_tokens=40,
                                                               seed=seed)
        reply = raw.parse()
        assert raw.headers["x-whale-route-mode"] == "thinking" and raw.headers["x-whale-route-budget"] == "12"
        assert float(raw.headers["x-whale-route-score"]) >= 0.8
        assert 0 < reply.usage.completion_tokens_details.reasoning_tokens <= 12 < reply.usage.completion_tokens
        assert reply.usage.model_extra["whale_route"]["band"] == "deep"
        assert "reasoning_content" in reply.choices[0].message.model_extra


def test_the_budget_header_is_the_one_the_request_runs_with(routed):
    """The band's 12 tokens do not fit max_tokens 16 with the answer's room (half of it): 8 it is."""
    _, _, client = routed
    raw = client.chat.completions.with_raw_response.create(model="deepseek-auto", messages=_ask(HARD), max_tokens=16)
    assert raw.headers["x-whale-route-budget"] == "8"
    assert raw.parse().usage.completion_tokens_details.reasoning_tokens <= 8


def test_a_stream_carries_the_headers_and_the_usage_field(routed):
    _, url, _ = routed
    body = {"model": "deepseek-auto", "messages": _ask(HARD), "max_tokens": 30, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                      headers={"Authorization": "Bearer sk-app"}, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["x-whale-route-mode"] == "thinking"
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert '"whale_route": {"mode": "thinking", "budget": 12' in lines[-1]
    assert any('"reasoning_content": "' in line and '"reasoning_content": ""' not in line for line in lines)


def test_the_request_and_the_key_override_the_score(routed):
    state, url, client = routed
    raw = client.chat.completions.with_raw_response.create(
        model="deepseek-auto", messages=_ask(HARD), max_tokens=8, extra_body={"thinking": {"type": "disabled"}})
    assert raw.headers["x-whale-route-mode"] == "non-thinking"
    assert raw.parse().usage.model_extra["whale_route"]["reason"] == "request"
    raw = client.chat.completions.with_raw_response.create(
        model="deepseek-auto", messages=_ask(HARD), max_tokens=30,
        extra_body={"thinking": {"type": "enabled", "budget_tokens": 3}})
    assert raw.headers["x-whale-route-budget"] == "3"
    assert raw.parse().usage.completion_tokens_details.reasoning_tokens <= 3
    raw = client.chat.completions.with_raw_response.create(model="deepseek-auto", messages=_ask(HARD), max_tokens=4,
                                                           logprobs=True, top_logprobs=2)
    assert raw.headers["x-whale-route-mode"] == "non-thinking"  # logprobs exist only without thinking
    assert len(raw.parse().choices[0].logprobs.content) == 4
    research = openai.OpenAI(base_url=url, api_key="sk-research", max_retries=0)
    raw = research.chat.completions.with_raw_response.create(model="deepseek-auto", messages=_ask(EASY),
                                                             max_tokens=30)
    assert raw.headers["x-whale-route-mode"] == "thinking" and raw.headers["x-whale-route-budget"] == "6"
    assert raw.parse().usage.model_extra["whale_route"]["reason"] == "key"


def test_named_models_are_not_routed_and_metrics_count_the_choices(routed):
    _, url, client = routed
    raw = client.chat.completions.with_raw_response.create(model="deepseek-chat", messages=_ask(HARD), max_tokens=4)
    assert "x-whale-route-mode" not in raw.headers and "whale_route" not in (raw.parse().usage.model_extra or {})
    metrics = httpx.get(f"{url}/metrics").text
    assert 'whale_route_decisions_total{band="deep",mode="thinking",reason="score"}' in metrics
    assert 'whale_route_decisions_total{band="fast",mode="non-thinking",reason="score"}' in metrics
    assert 'whale_route_decisions_total{band="think",mode="thinking",reason="key"} 1.0' in metrics
    count = [line for line in metrics.splitlines() if line.startswith("whale_route_decision_seconds_count")]
    assert float(count[0].split()[-1]) >= 5


def test_a_conversation_keeps_thinking_on_a_short_follow_up(routed):
    _, _, client = routed
    first = client.chat.completions.create(model="deepseek-auto", messages=_ask(HARD), max_tokens=20)
    history = [*_ask(HARD), {"role": "assistant", "content": first.choices[0].message.content or "ok"},
               {"role": "user", "content": "ok, and what about the other case?"}]
    raw = client.chat.completions.with_raw_response.create(model="deepseek-auto", messages=history, max_tokens=20)
    route = raw.parse().usage.model_extra["whale_route"]
    assert raw.headers["x-whale-route-mode"] == "thinking" and route["band"] == "think"  # carried: 0.7 x ~1
    alone = client.chat.completions.with_raw_response.create(model="deepseek-auto", messages=history[-1:],
                                                             max_tokens=4)
    assert alone.headers["x-whale-route-mode"] == "non-thinking"


def test_the_anthropic_shape_is_routed_too(routed):
    _, url, _ = routed
    client = anthropic.Anthropic(base_url=f"{url}/anthropic", api_key="sk-app", max_retries=0)
    raw = client.messages.with_raw_response.create(model="deepseek-auto", max_tokens=40, messages=_ask(HARD))
    message = raw.parse()
    assert raw.headers["x-whale-route-mode"] == "thinking"
    assert message.content[0].type == "thinking"
    assert message.usage.model_extra["whale_route"]["mode"] == "thinking"


def test_an_unknown_model_is_refused_whatever_else_the_request_says(routed):
    _, _, client = routed
    with pytest.raises(openai.BadRequestError, match="Model Not Exist"):
        client.chat.completions.create(model="deepseek-autox", messages=_ask(EASY),
                                       extra_body={"thinking": {"type": "enabled"}})


def test_route_default_routes_requests_that_leave_the_mode_to_the_server(tiny_path, default_llm):
    from whale.models.loader import load_model

    router = Router(RoutePolicy(bands=BANDS, default=True))
    with serving(load_model(str(tiny_path), dtype="float32"), router=router) as (state, url):
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model=state.served.name, messages=_ask(EASY),
                                                               max_tokens=4)
        assert raw.headers["x-whale-route-mode"] == "non-thinking"
        raw = client.chat.completions.with_raw_response.create(model="deepseek-reasoner", messages=_ask(EASY),
                                                               max_tokens=20)
        assert "x-whale-route-mode" not in raw.headers
        assert "reasoning_content" in raw.parse().choices[0].message.model_extra
    with serving(load_model(str(tiny_path), dtype="float32")) as (_, url):
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="Model Not Exist"):
            client.chat.completions.create(model="deepseek-auto", messages=_ask(EASY))


def test_a_band_can_run_on_another_engine(tiny_path, default_llm):
    """The deep band on a second whale server (same tokenizer: in real use a larger model of the family, or a pool
    of its replicas behind SGLang's gateway), the others on the front's own engine."""
    from whale.models.loader import load_model
    from whale.server.routing import band_engines

    with serving(load_model(str(tiny_path), dtype="float32")) as (_, upstream_url):
        bands = (*BANDS[:2], Band("deep", 0.8, THINKING, 12, upstream=(upstream_url,)))
        router = Router(RoutePolicy(bands=bands))
        with serving(load_model(str(tiny_path), dtype="float32"), router=router) as (state, url):
            state.band_engines = band_engines(router.policy, state.served)
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)

            def upstream_calls() -> float:
                lines = httpx.get(f"{upstream_url}/metrics").text.splitlines()
                return sum(float(line.split()[-1]) for line in lines
                           if line.startswith('whale_requests_total{route="/generate"'))

            client.chat.completions.create(model="deepseek-auto", messages=_ask(EASY), max_tokens=8)
            assert upstream_calls() == 0
            reply = client.chat.completions.create(model="deepseek-auto", messages=_ask(HARD), max_tokens=40)
            assert upstream_calls() >= 1
            assert reply.usage.model_extra["whale_route"]["band"] == "deep"
            assert 0 < reply.usage.completion_tokens_details.reasoning_tokens <= 12 < reply.usage.completion_tokens
            assert reply.choices[0].message.model_extra["reasoning_content"]
