"""The server on a DeepSeek-V4 checkpoint, end to end: a tiny random V4 model with the real V4 tokenizer's
vocabulary run by whale's own engine (no double), asked through the openai SDK in the hosted API's shape:
thinking on by default; without it, greedy replies equal whether the prompt's blocks come from the prefix cache
or not, streamed or not."""

from __future__ import annotations

import openai
import pytest
from server_harness import serving, write_tiny_deepseek_v4

ASK = [{"role": "system", "content": "You are a careful assistant who answers in one sentence."},
       {"role": "user", "content": "What is the tallest mountain in Europe, and in which country does it stand?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from whale.models.loader import load_model

    loaded = load_model(str(write_tiny_deepseek_v4(tmp_path_factory.mktemp("v4"))), dtype="float32")
    with serving(loaded) as (_, url):
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0)


def test_a_v4_model_answers_through_its_engine(client):
    ask = {"model": "deepseek-v4-flash", "messages": ASK, "max_tokens": 12, "temperature": 0,
           "extra_body": {"thinking": {"type": "disabled"}}}
    first, again = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    assert first.usage.model_extra["prompt_cache_hit_tokens"] == 0
    # the same prompt: its full blocks from the cache (entries, and the window before them), the same reply
    assert again.usage.model_extra["prompt_cache_hit_tokens"] == first.usage.prompt_tokens // 16 * 16 > 0
    assert first.choices[0].message.content and again.choices[0].message.content == first.choices[0].message.content
    streamed = client.chat.completions.create(**ask, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == first.choices[0].message.content
    thinking = client.chat.completions.create(model="deepseek-v4-flash", messages=ASK, max_tokens=12)
    assert thinking.usage.completion_tokens == 12 and thinking.choices[0].finish_reason == "length"
    # thinking is on by default (and samples as the hosted API does): a reply cut at 12 tokens is all reasoning
    assert thinking.choices[0].message.model_extra["reasoning_content"] and not thinking.choices[0].message.content
