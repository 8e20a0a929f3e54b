"""Third-party clients unchanged against the real server: LangChain's ChatOpenAI (langchain-openai), which sends
`max_completion_tokens` where the openai SDK's older callers send `max_tokens`."""

from __future__ import annotations

import pytest
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from scripted_engine import scripted_server

from whale.server.served_model import served_model_from_loaded


@pytest.fixture(scope="module")
def scripted(default_llm):
    served = served_model_from_loaded(default_llm.loaded, default_llm.engine.max_model_len)
    with scripted_server(served) as (engine, url):
        yield engine, url


def chat_openai(url: str, **options) -> ChatOpenAI:
    return ChatOpenAI(base_url=f"{url}/v1", api_key="unused", model="deepseek-chat", max_retries=0, timeout=60,
                      **options)


def test_langchain_max_tokens_bounds_the_reply(default_url):
    reply = chat_openai(default_url, max_tokens=5, temperature=0).invoke([HumanMessage("Tell me a long story.")])
    usage = reply.response_metadata["token_usage"]
    assert usage["completion_tokens"] <= 5
    assert reply.response_metadata["finish_reason"] == "length"


def test_langchain_streaming_honours_max_tokens(default_url):
    chunks = list(chat_openai(default_url, max_tokens=4, temperature=0, stream_usage=True)
                  .stream([HumanMessage("Tell me a long story.")]))
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert usage and usage[-1]["output_tokens"] <= 4


def test_langchain_structured_output_in_json_mode(scripted):
    engine, url = scripted
    engine.output = '{"city": "Paris", "country": "France"}'
    model = chat_openai(url, max_tokens=32).with_structured_output(method="json_mode")
    assert model.invoke("Name a capital as JSON with keys city and country.") == {"city": "Paris",
                                                                                 "country": "France"}
    params = engine.params()
    assert params.max_tokens == 32
    assert "Reply with one valid JSON object" in engine.prompt_text()
