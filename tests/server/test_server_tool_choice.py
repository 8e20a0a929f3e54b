"""`tool_choice: "required"` and a named function are forced by a grammar over the model's own call format, with the
arguments held to each tool's schema: on the tiny random DeepSeek-V3 (real tokenizer) through the server in the
V3.2 DSML format, chat and thinking mode (the hosted API refuses forced tool choice when thinking), and offline in
the V3, V3.1 and distill formats. Random weights at temperature 1 would otherwise never write a call."""

from __future__ import annotations

import json

import jsonschema_rs
import pytest

from whale.chat import ChatVariant, parse_output
from whale.chat.forced_calls import forced_call_grammar
from whale.engine.grammar import grammar_tokenizer, token_marker
from whale.sampling_params import SamplingParams, StructuredOutput

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_ARGS = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                "properties": {"city": {"type": "string", "maxLength": 6},
                               "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
TIME_ARGS = {"type": "object", "additionalProperties": False, "required": ["zone"],
             "properties": {"zone": {"enum": ["UTC", "CET"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_ARGS}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME_ARGS}}]
SCHEMAS = {"get_weather": WEATHER_ARGS, "get_time": TIME_ARGS}


def _check_calls(calls) -> list[str]:
    assert calls, "no tool call"
    for call in calls:
        name, arguments = call["function"]["name"], json.loads(call["function"]["arguments"])
        jsonschema_rs.validate(SCHEMAS[name], arguments)
    return [call["function"]["name"] for call in calls]


def test_required_and_named_through_the_server(tiny_server):
    _, client = tiny_server
    for seed in range(4):
        for choice, names in [("required", {"get_weather", "get_time"}),
                              ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})]:
            reply = client.chat.completions.create(model="deepseek-chat", messages=ASK, tools=TOOLS,
                                                   tool_choice=choice, temperature=1.0, seed=seed, max_tokens=200)
            assert reply.choices[0].finish_reason in ("tool_calls", "length")  # random weights may chain calls
            calls = [c.model_dump() for c in reply.choices[0].message.tool_calls]
            assert set(_check_calls(calls)) <= names


def test_forced_after_thinking(tiny_server):
    _, client = tiny_server
    for seed in range(3):
        reply = client.chat.completions.create(
            model="deepseek-reasoner", messages=ASK, tools=TOOLS, seed=seed, max_tokens=200,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            extra_body={"thinking": {"type": "enabled", "budget_tokens": 10}})
        message = reply.choices[0].message
        assert message.model_extra["reasoning_content"]
        assert _check_calls([c.model_dump() for c in message.tool_calls]) == ["get_weather"]


@pytest.fixture(scope="module")
def llm(tiny_path, default_llm):
    from whale import LLM

    return LLM(str(tiny_path), dtype="float32")


@pytest.mark.parametrize("variant", ["v3", "v3.1", "r1-distill-qwen"])
def test_each_formats_own_call_grammar(llm, variant):
    llm.chat_variant = ChatVariant(variant)
    prompt = llm.chat_prompt(ASK, tools=TOOLS)
    view = grammar_tokenizer(llm.tokenizer, llm.loaded.config.vocab_size, llm.engine.eos_token_ids)
    grammar = forced_call_grammar(variant, TOOLS, None, token_marker(llm.tokenizer, view))
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=200, thinking_budget=8 if prompt.thinking else None,
                             reasoning=prompt.reasoning, structured_output=StructuredOutput("grammar", grammar))
              for seed in range(3)]
    for output in llm.generate([{"prompt_token_ids": prompt.ids}] * len(params), params):
        # random weights may chain calls until max_tokens: the calls that closed are whole and valid
        assert output.outputs[0].finish_reason in ("stop", "length")
        _check_calls(parse_output(llm.chat_prompt(ASK, tools=TOOLS).parser, output.outputs[0].text)["tool_calls"])


def test_a_hundred_forced_calls_in_dsml(llm):
    """One batch of 100 seeded requests at temperature 1, V3.2's DSML: every closed call is get_time, valid."""
    llm.chat_variant = ChatVariant("v3.2")
    prompt = llm.chat_prompt(ASK, tools=TOOLS, thinking=False)
    view = grammar_tokenizer(llm.tokenizer, llm.loaded.config.vocab_size, llm.engine.eos_token_ids)
    grammar = forced_call_grammar("v3.2", TOOLS, "get_time", token_marker(llm.tokenizer, view))
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=120,
                             structured_output=StructuredOutput("grammar", grammar)) for seed in range(100)]
    for output in llm.generate([{"prompt_token_ids": prompt.ids}] * len(params), params):
        calls = parse_output(llm.chat_prompt(ASK, tools=TOOLS, thinking=False).parser, output.outputs[0].text)
        assert set(_check_calls(calls["tool_calls"])) == {"get_time"}
