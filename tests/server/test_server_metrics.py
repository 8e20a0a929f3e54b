"""/metrics in the Prometheus text format (prometheus-client): request counts by route and status, per-token
timings recorded as tokens arrive (streaming or not, every route), tokens, queue depth, KV-cache usage and
prefix-cache hits, after real traffic."""

from __future__ import annotations

import logging
import re
import time

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from scripted_engine import scripted_server
from server_harness import DEFAULT_OPTIONS, serving

from whale.server.served_model import served_model_from_loaded

TOKEN_DELAY_S = 0.05


@pytest.fixture(scope="module")
def default_url(default_llm):
    with serving(default_llm.loaded, **DEFAULT_OPTIONS) as (_, url):
        yield url


def _value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match, f"{series} missing from /metrics"
    return float(match.group(1))


def test_metrics_after_traffic(default_llm, default_url):
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Hi " * 20}], "max_tokens": 3}
    for _ in range(2):
        response = httpx.post(f"{default_url}/v1/chat/completions", json=body)
        assert response.status_code == 200
    prompt_tokens = response.json()["usage"]["prompt_tokens"]
    assert httpx.post(f"{default_url}/v1/chat/completions", json={**body, "temperature": 5}).status_code == 422
    recent = httpx.get(f"{default_url}/metrics/recent").json()["data"]
    assert len(recent) == 2  # the 422 never started
    newest = recent[0]
    assert (newest["route"], newest["prompt_tokens"], newest["generated_tokens"], newest["finish_reason"]) == (
        "/v1/chat/completions", prompt_tokens, 3, "length")
    assert newest["cached_tokens"] > 0 and 0 < newest["first_token_ms"] <= newest["total_ms"]
    assert recent[1]["finished_at"] <= newest["finished_at"]
    response = httpx.get(f"{default_url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    families = {family.name for family in text_string_to_metric_families(text)}  # the format parses
    assert {"whale_requests", "whale_time_to_first_token_seconds", "whale_inter_token_latency_seconds",
            "whale_decode_tokens_per_second", "whale_kv_cache_usage_ratio"} <= families
    assert _value(text, 'whale_requests_total{route="/v1/chat/completions",status="200"}') == 2
    assert _value(text, 'whale_requests_total{route="/v1/chat/completions",status="422"}') == 1
    assert _value(text, "whale_time_to_first_token_seconds_count") == 2
    assert _value(text, "whale_generation_tokens_total") == 6
    assert _value(text, "whale_prompt_cache_hit_tokens_total") >= 16  # the second request reused the first's blocks
    assert _value(text, "whale_engine_queue_depth") == 0
    assert _value(text, "whale_kv_cache_blocks_total") == 256
    assert 0 <= _value(text, "whale_kv_cache_usage_ratio") <= 1
    spec = default_llm.loaded.model.kv_cache_spec()
    block_bytes = 16 * spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * default_llm.loaded.dtype.itemsize
    written, rest = divmod(_value(text, "whale_kv_cache_bytes_written"), block_bytes)
    # whole blocks: the first request's prompt and reply, and the second's own last block (it reused the full ones)
    assert rest == 0 and -(-prompt_tokens // 16) + 1 <= written <= -(-(prompt_tokens + 3) // 16) + 1
    # the 135M model decodes at most a few hundred tokens/s here: no sample may claim more than 1,000
    assert _value(text, 'whale_decode_tokens_per_second_bucket{le="1000.0"}') == _value(
        text, "whale_decode_tokens_per_second_count") == 2
    assert _value(text, "whale_spec_decode_draft_tokens_total") == 0  # speculation is off


def test_speculative_decoding_through_the_server(default_llm):
    """`--speculative ngram`: a copying reply is the one the plain server gives, in fewer steps, and /metrics
    counts the drafts the engine verified and kept."""
    text = "The quick brown fox jumps over the lazy dog while the farmer watches from the old red barn."
    body = {"model": "deepseek-chat", "temperature": 0, "max_tokens": 40,
            "messages": [{"role": "user", "content": f"Repeat this sentence exactly: {text}"}]}
    replies = []
    for method in ("off", "ngram"):
        options = {**DEFAULT_OPTIONS, "engine_options": {**DEFAULT_OPTIONS["engine_options"], "speculative": method}}
        with serving(default_llm.loaded, **options) as (state, url):
            replies.append(openai.OpenAI(base_url=f"{url}/v1", api_key="-").chat.completions.create(**body))
            metrics = httpx.get(f"{url}/metrics").text
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    drafted, accepted = (_value(metrics, f"whale_spec_decode_{kind}_tokens_total") for kind in ("draft", "accepted"))
    verifications = _value(metrics, "whale_spec_decode_verifications_total")
    assert 0 < accepted <= drafted and verifications > 0
    assert _value(metrics, "whale_spec_decode_acceptance_ratio") == pytest.approx(accepted / drafted)
    assert _value(metrics, "whale_spec_decode_mean_accepted_length") == pytest.approx(1 + accepted / verifications)


@pytest.fixture(scope="module")
def paced(default_llm):
    """The real server with a test double in place of the model that writes one token every TOKEN_DELAY_S, so
    the timings /metrics reports can be checked against a known pace."""
    served = served_model_from_loaded(default_llm.loaded, default_llm.engine.max_model_len)
    with scripted_server(served) as (engine, url):
        engine.output = "one two three four five six seven eight nine ten"
        engine.token_delay_s = TOKEN_DELAY_S
        yield engine, url


def test_timings_are_per_token_as_they_happen_on_every_route(paced):
    engine, url = paced
    tokens = len(engine.tokenizer.encode(engine.output, add_special_tokens=False))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    hello = [{"role": "user", "content": "Count."}]
    client.chat.completions.create(model="deepseek-chat", messages=hello)  # one JSON body at the end
    list(client.chat.completions.create(model="deepseek-chat", messages=hello, stream=True))
    anthropic.Anthropic(base_url=f"{url}/anthropic", api_key="unused", max_retries=0).messages.create(
        model="deepseek-chat", max_tokens=64, messages=hello)
    text = httpx.get(f"{url}/metrics").text
    requests = 3
    assert _value(text, "whale_time_to_first_token_seconds_count") == requests
    # the first token comes after one pause, not after the whole reply (tokens x pause)
    assert _value(text, "whale_time_to_first_token_seconds_sum") / requests < tokens * TOKEN_DELAY_S / 2
    assert _value(text, "whale_inter_token_latency_seconds_count") == requests * (tokens - 1)
    gap = _value(text, "whale_inter_token_latency_seconds_sum") / (requests * (tokens - 1))
    assert 0.8 * TOKEN_DELAY_S <= gap < 3 * TOKEN_DELAY_S
    rate = _value(text, "whale_decode_tokens_per_second_sum") / requests
    assert 1 / (3 * TOKEN_DELAY_S) < rate <= 1.25 / TOKEN_DELAY_S
    latency = _value(text, "whale_request_latency_seconds_sum") / requests
    assert latency >= tokens * TOKEN_DELAY_S
    assert _value(text, "whale_generation_tokens_total") == requests * tokens


def test_a_log_line_per_request_like_llama_cpp(paced, caplog):
    engine, url = paced
    tokens = len(engine.tokenizer.encode(engine.output, add_special_tokens=False))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with caplog.at_level(logging.INFO, logger="whale.requests"):
        reply = client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "Go."}])
        deadline = time.monotonic() + 5
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(0.02)
    (record,) = caplog.records
    line = record.getMessage()
    prompt = reply.usage.prompt_tokens
    assert line.startswith(f"{reply.id} /v1/chat/completions: {prompt} prompt tokens (0 cached), {tokens} generated")
    rate = float(re.search(r"([\d.]+) tok/s, stop$", line).group(1))
    assert 1 / (3 * TOKEN_DELAY_S) < rate <= 1.25 / TOKEN_DELAY_S
