"""The OpenAI shape on the default model, through the openai SDK against the real server: sync, async,
streaming, usage with cache hits, stop, logprobs, JSON mode, seeds, route prefixes, /models, /health."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from scripted_engine import scripted_server

from whale import SamplingParams
from whale.server.served_model import served_model_from_loaded

HELLO = [{"role": "user", "content": "Say hello."}]
JSON_INSTRUCTION = "Reply with one valid JSON object and nothing else."


@pytest.fixture(scope="module")
def client(default_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{default_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def scripted(default_llm):
    """The default model's served model behind the real server, with the ScriptedEngine in place of the model:
    what the server hands the engine (prompt, SamplingParams) for each request."""
    served = served_model_from_loaded(default_llm.loaded, default_llm.engine.max_model_len)
    with scripted_server(served) as (engine, url):
        yield engine, openai.OpenAI(base_url=url, api_key="unused", max_retries=0)


def test_models_lists_the_served_model_and_the_deepseek_aliases(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["smollm2-135m-instruct", "deepseek-v4-flash", "deepseek-v4-pro", "deepseek-flash", "deepseek-chat",
                   "deepseek-reasoner"]


def test_chat_completion_has_the_deepseek_response_shape(client):
    reply = client.chat.completions.create(model="deepseek-chat", messages=HELLO, max_tokens=12, temperature=0)
    assert reply.object == "chat.completion" and reply.model == "deepseek-chat"
    assert reply.system_fingerprint and len(reply.id) == 36  # a UUID, as the official API sends
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage.model_dump()
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_cache_hit_tokens"] + usage["prompt_cache_miss_tokens"] == usage["prompt_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_cache_hit_tokens"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0


def test_greedy_is_deterministic_and_a_repeated_prompt_hits_the_prefix_cache(client):
    messages = [{"role": "system", "content": "You are a terse assistant. " * 8}, *HELLO]
    first = client.chat.completions.create(model="deepseek-chat", messages=messages, max_tokens=8, temperature=0)
    second = client.chat.completions.create(model="deepseek-chat", messages=messages, max_tokens=8, temperature=0)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert second.usage.model_dump()["prompt_cache_hit_tokens"] >= 16


def test_streaming_matches_the_non_streaming_reply_and_ends_with_usage(client):
    kwargs = dict(model="deepseek-chat", messages=HELLO, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_async_client_runs_concurrent_requests(default_url):
    async def main():
        async with openai.AsyncOpenAI(base_url=default_url, api_key="unused", max_retries=0) as aclient:
            calls = [aclient.chat.completions.create(model="deepseek-chat", max_tokens=6, temperature=0,
                                                     messages=[{"role": "user", "content": f"Count to {i}."}])
                     for i in range(4)]
            return await asyncio.gather(*calls)

    replies = asyncio.run(main())
    assert all(r.choices[0].message.content for r in replies)
    assert len({r.id for r in replies}) == 4


def test_multi_turn_conversation_and_stop_sequences(client):
    messages = [*HELLO, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again."}]
    free = client.chat.completions.create(model="deepseek-chat", messages=messages, max_tokens=12, temperature=0)
    text = free.choices[0].message.content
    assert len(text) > 3
    stop = text[2:4]
    stopped = client.chat.completions.create(model="deepseek-chat", messages=messages, max_tokens=12,
                                             temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].message.content


def test_the_whole_conversation_reaches_the_engine_in_the_models_chat_template(scripted):
    engine, client = scripted
    engine.output = "Hello again!"
    messages = [*HELLO, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again."}]
    reply = client.chat.completions.create(model="deepseek-chat", messages=messages, max_tokens=12)
    assert reply.choices[0].message.content == "Hello again!"
    assert engine.prompt_text() == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nAgain.<|im_end|>\n<|im_start|>assistant\n")


def test_logprobs_with_top_alternatives(client):
    reply = client.chat.completions.create(model="deepseek-chat", messages=HELLO, max_tokens=4, temperature=0,
                                           logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert bytes(entry.bytes).decode(errors="replace") == entry.token


def test_sampling_fields_reach_the_engine(scripted):
    engine, client = scripted
    engine.output = "Hello!"
    client.chat.completions.create(model="deepseek-chat", messages=HELLO, max_tokens=10, temperature=1.3,
                                   top_p=0.9, presence_penalty=0.5, frequency_penalty=-0.25, seed=7, stop=["\n\n"],
                                   logprobs=True, top_logprobs=3)
    params = engine.params()
    assert (params.temperature, params.top_p, params.presence_penalty, params.frequency_penalty) == (
        1.3, 0.9, 0.5, -0.25)
    assert (params.seed, params.max_tokens, params.stop_strings, params.logprobs) == (7, 10, ("\n\n",), 3)
    client.chat.completions.create(model="deepseek-chat", messages=HELLO)  # the default model's, from its card
    params = engine.params()
    assert (params.temperature, params.top_p, params.presence_penalty, params.frequency_penalty) == (
        0.2, 0.9, 0.0, 0.0)
    assert (params.seed, params.stop_strings, params.logprobs) == (None, (), None)


def test_a_seed_makes_sampling_repeatable_on_the_real_engine(client):
    kwargs = dict(model="deepseek-chat", messages=HELLO, max_tokens=10, temperature=1.3, top_p=0.9,
                  presence_penalty=0.5, frequency_penalty=0.5)
    first = client.chat.completions.create(**kwargs, seed=7).choices[0].message.content
    assert client.chat.completions.create(**kwargs, seed=7).choices[0].message.content == first
    assert client.chat.completions.create(**kwargs, seed=8).choices[0].message.content != first


def test_json_mode_adds_the_json_instruction_to_the_system_prompt(scripted):
    engine, client = scripted
    engine.output = '{"a": 1}'
    ask = [{"role": "user", "content": "Give a json object with a key 'a'."}]
    reply = client.chat.completions.create(model="deepseek-chat", max_tokens=16, messages=ask,
                                           response_format={"type": "json_object"})
    assert json.loads(reply.choices[0].message.content) == {"a": 1}
    assert f"<|im_start|>system\n{JSON_INSTRUCTION}<|im_end|>" in engine.prompt_text()
    terse = [{"role": "system", "content": "Be terse."}, *ask]
    client.chat.completions.create(model="deepseek-chat", max_tokens=16, messages=terse,
                                   response_format={"type": "json_object"})
    assert f"<|im_start|>system\nBe terse.\n\n{JSON_INSTRUCTION}<|im_end|>" in engine.prompt_text()
    client.chat.completions.create(model="deepseek-chat", max_tokens=16, messages=terse,
                                   response_format={"type": "text"})
    assert "<|im_start|>system\nBe terse.<|im_end|>" in engine.prompt_text()
    assert JSON_INSTRUCTION not in engine.prompt_text()


def test_every_route_prefix_serves_chat_and_models(default_url):
    body = {"model": "deepseek-chat", "messages": HELLO, "max_tokens": 2}
    for prefix in ("", "/v1", "/beta"):
        assert httpx.post(f"{default_url}{prefix}/chat/completions", json=body).status_code == 200
        assert httpx.get(f"{default_url}{prefix}/models").json()["object"] == "list"


def test_raw_sse_wire_format(default_url):
    body = {"model": "deepseek-chat", "messages": HELLO, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{default_url}/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = "".join(response.iter_text())
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_plain_completion_on_a_model_without_fim(client):
    reply = client.completions.create(model="deepseek-chat", prompt="The capital of France is", max_tokens=5,
                                      temperature=0, echo=True)
    assert reply.object == "text_completion"
    assert reply.choices[0].text.startswith("The capital of France is")
    assert reply.usage.completion_tokens == 5


def test_health_and_openapi(default_url):
    assert httpx.get(f"{default_url}/health").json()["status"] == "ok"
    paths = httpx.get(f"{default_url}/openapi.json").json()["paths"]
    assert {"/chat/completions", "/completions", "/models"} <= set(paths)


def test_max_completion_tokens_is_the_length_limit(scripted):
    engine, client = scripted
    engine.output = "Hello!"
    client.chat.completions.create(model="deepseek-chat", messages=HELLO, max_completion_tokens=7)
    assert engine.params().max_tokens == 7
    client.chat.completions.create(model="deepseek-chat", messages=HELLO, max_completion_tokens=7, max_tokens=7)
    assert engine.params().max_tokens == 7
    with pytest.raises(openai.UnprocessableEntityError, match="max_completion_tokens"):
        client.chat.completions.create(model="deepseek-chat", messages=HELLO, max_completion_tokens=7,
                                       max_tokens=9)


def test_models_retrieve_answers_each_served_name_and_404_otherwise(client):
    for name in ("smollm2-135m-instruct", "deepseek-chat", "deepseek-reasoner"):
        card = client.models.retrieve(name)
        assert (card.id, card.object) == (name, "model")
    with pytest.raises(openai.NotFoundError, match="'deepseek-chat'"):
        client.models.retrieve("gpt-4o")


def test_completions_take_every_openai_prompt_form_with_one_prompt(client, default_llm):
    text = "The capital of France is"
    ids = default_llm.tokenizer.encode(text)
    greedy = dict(model="deepseek-chat", max_tokens=5, temperature=0)
    expected = client.completions.create(prompt=text, **greedy).choices[0].text
    for prompt in ([text], ids, [ids]):
        assert client.completions.create(prompt=prompt, **greedy).choices[0].text == expected
    echoed = client.completions.create(prompt=ids, echo=True, **greedy).choices[0].text
    assert echoed == default_llm.tokenizer.decode(ids) + expected
    with pytest.raises(openai.BadRequestError, match="holds 2 prompts"):
        client.completions.create(prompt=[text, text], **greedy)
    with pytest.raises(openai.BadRequestError, match="token ids must be in"):
        client.completions.create(prompt=[10**9], **greedy)


def test_echo_with_logprobs_scores_the_prompt_too(client, default_llm):
    text = "The capital of France is"
    ids = default_llm.tokenizer.encode(text)
    greedy = dict(model="deepseek-chat", prompt=text, max_tokens=5, temperature=0, echo=True, logprobs=2)
    reply = client.completions.create(**greedy)
    scored = reply.choices[0].logprobs
    assert reply.choices[0].text.startswith(text) and reply.usage.prompt_tokens == len(ids)
    assert len(scored.tokens) == len(ids) + 5 and "".join(scored.tokens[:len(ids)]).endswith(text)
    assert scored.token_logprobs[0] is None and scored.top_logprobs[0] is None  # nothing comes before it
    expected = default_llm.generate(text, SamplingParams(temperature=0, max_tokens=5, prompt_logprobs=2))[0]
    for position in range(1, len(ids)):
        assert scored.token_logprobs[position] == pytest.approx(expected.prompt_logprobs[position][ids[position]],
                                                                abs=1e-4)
        assert len(scored.top_logprobs[position]) == 2
    assert scored.text_offset == [sum(map(len, scored.tokens[:i])) for i in range(len(scored.tokens))]
    # streamed: the echo comes with the prompt's logprobs in the first chunk, then the same tokens as above
    chunks = list(client.completions.create(**greedy, stream=True))
    assert chunks[0].choices[0].text.startswith(text) and len(chunks[0].choices[0].logprobs.tokens) > len(ids)
    assert "".join(c.choices[0].text for c in chunks) == reply.choices[0].text
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for lp in streamed for t in lp.tokens] == scored.tokens
    assert [o for lp in streamed for o in lp.text_offset] == scored.text_offset
    assert [lp for part in streamed for lp in part.token_logprobs] == scored.token_logprobs
