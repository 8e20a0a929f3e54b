"""An R1-Distill-Qwen GGUF, real tokenizer and chat template, served end to end: what the model writes (reasoning,
then a `<tool_call>`, or a call inside a think block that never closes) reaches the openai client as
`reasoning_content` and `tool_calls`, streamed or not. The model is a scripted GGUF (tests/scripted_gguf.py): real
file, real loader, tokenizer, engine, detokenizer, parsers and server; only its weights are chosen, so that it
writes a known text. This is the path that once lost every distill's tags (the GGUF's USER_DEFINED <think> and
<tool_call> were decoded as skippable special tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from scripted_gguf import (
    DISTILL_QWEN_BOS,
    DISTILL_QWEN_EOS,
    distill_qwen_tokenizer_json,
    distinct_token_path,
    write_scripted_qwen2_gguf,
)
from server_harness import serving
from tokenizers import Tokenizer as HFTokenizer

from whale.chat import render
from whale.chat.templates import encode_prompt

TEMPLATE = (Path(__file__).parents[1] / "chat" / "templates" / "deepseek-r1-distill.jinja").read_text()
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
# compact where a bigram model needs it (scripted_gguf.distinct_token_path), still a call the parser must read
CALL = '<tool_call>{"name": "get_weather", "arguments":{"city":"Paris"}}</tool_call>'
OUTPUTS = {"after-think": "I need the weather.\n</think>\n\n" + CALL,
           "inside-think": "I need the weather.\n" + CALL}


@pytest.fixture(scope="module")
def distill(tmp_path_factory):
    """(HF tokenizer of the distill, {output name: GGUF path}), each GGUF writing its output after the prompt."""
    tokenizer_json = distill_qwen_tokenizer_json()
    tokenizer = HFTokenizer.from_str(json.dumps(tokenizer_json))
    prompt = render("r1-distill-qwen", ASK, tools=[WEATHER])
    start = encode_prompt(tokenizer, prompt)[-1]
    directory = tmp_path_factory.mktemp("distill")
    files = {}
    for name, text in OUTPUTS.items():
        path_ids = distinct_token_path(tokenizer, text, avoid={start, DISTILL_QWEN_EOS})
        files[name] = write_scripted_qwen2_gguf(directory / f"DeepSeek-R1-Distill-Qwen-7B.{name}.gguf",
                                                tokenizer_json, TEMPLATE, start, path_ids, DISTILL_QWEN_EOS,
                                                DISTILL_QWEN_BOS)
    return tokenizer, files


@pytest.fixture(scope="module")
def served(distill):
    from whale.models.loader import load_model

    _, files = distill
    with serving(load_model(str(files["after-think"]), dtype="float32")) as (state, url):
        yield state, openai.OpenAI(base_url=url, api_key="unused", max_retries=0)


def test_the_gguf_tokenizer_reads_the_prompt_as_the_distills_tokenizer_json_does(distill, served):
    tokenizer, _ = distill
    state, _ = served
    assert state.served.variant.name == "r1-distill-qwen"
    prompt = render("r1-distill-qwen", [{"role": "system", "content": "Be brief."}, *ASK], tools=[WEATHER])
    ours = encode_prompt(state.served.tokenizer, prompt)
    assert ours == encode_prompt(tokenizer, prompt)
    for tag in ("<｜User｜>", "<｜Assistant｜>", "<think>"):  # whole tokens, as in the distill's vocabulary
        assert tokenizer.token_to_id(tag) in ours


def _streamed(client, model):
    chunks = list(client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
    calls = [c for d in deltas for c in d.tool_calls or ()]
    return reasoning, "".join(d.content or "" for d in deltas), calls, chunks[-1].choices[0].finish_reason


def test_reasoning_then_a_tool_call_reach_the_client(served):
    state, client = served
    model = state.served.name
    reply = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER])
    choice = reply.choices[0]
    assert choice.message.model_extra["reasoning_content"] == "I need the weather.\n"  # as written before </think>
    assert not choice.message.content and choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert reply.usage.completion_tokens_details.reasoning_tokens > 0
    reasoning, content, calls, finish = _streamed(client, model)
    assert (reasoning, content, finish) == ("I need the weather.\n", "", "tool_calls")
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather",
                                                                                      {"city": "Paris"})]


def test_a_call_inside_a_think_block_that_never_closes_is_the_models_call(distill):
    from whale.models.loader import load_model

    _, files = distill
    with serving(load_model(str(files["inside-think"]), dtype="float32")) as (state, url):
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=state.served.name, messages=ASK, tools=[WEATHER])
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
        assert choice.message.model_extra["reasoning_content"].startswith("I need the weather.")
        reasoning, _, calls, finish = _streamed(client, state.served.name)
        assert finish == "tool_calls" and [c.function.name for c in calls] == ["get_weather"]
        assert reasoning == choice.message.model_extra["reasoning_content"]
