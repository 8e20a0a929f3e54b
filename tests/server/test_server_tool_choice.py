"""`tool_choice: "required"` and a named function are forced by a grammar over the model's own call format, with the
arguments held to each tool's schema: on the tiny random DeepSeek-V3 (real tokenizer) through the server in the
V3.2 DSML format, chat and thinking mode (the hosted API refuses forced tool choice when thinking), and offline in
the V3, V3.1 and distill formats. Random weights at temperature 1 would otherwise never write a call."""

from __future__ import annotations

import json

import jsonschema_rs
import openai
import pytest

from whale.chat import ChatVariant, parse_output
from whale.chat.constrained_calls import forced_call_grammar, strict_tools_grammar
from whale.engine.grammar import grammar_tokenizer, token_marker
from whale.sampling_params import SamplingParams, StructuredOutput
from whale.server.anthropic_api import MessagesRequest, to_chat_request
from whale.server.protocol import ChatCompletionRequest

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


STRICT_TOOLS = [{"type": "function", "function": {**tool["function"], "strict": True}} for tool in TOOLS]


def _lift(opening: list[int], reasoning=None, at: int = 2):
    """A logits processor that makes the model open a call section at the third token of its answer (after any
    thinking; random weights would almost never open one): a stand-in for a model that decides to call a tool,
    after which it writes on its own."""

    def processor(output_ids, logits):
        start = 0
        if reasoning is not None:
            if reasoning.end_id not in output_ids:
                return logits
            tail = reasoning.forced_end[reasoning.forced_end.index(reasoning.end_id) + 1:]
            start = list(output_ids).index(reasoning.end_id) + 1 + len(tail)
        step = len(output_ids) - start - at
        if 0 <= step < len(opening):
            logits[opening[step]] += 100.0
        return logits

    return processor


@pytest.mark.parametrize("variant, opening", [("v3", "<｜tool▁calls▁begin｜>"), ("v3.1", "<｜tool▁calls▁begin｜>"),
                                              ("v3.2", "\n\n<｜DSML｜function_calls>"),
                                              ("r1-distill-qwen", "<tool_call>")])
def test_strict_tools_hold_the_calls_a_model_starts(llm, variant, opening):
    """`tool_choice: "auto"` with strict tools, 12 seeded requests at temperature 1 whose model opens a call section
    early: with the grammar every call that closes names a tool and follows its schema; without it, the same
    model's calls never do (random weights write random arguments)."""
    llm.chat_variant = ChatVariant(variant)
    thinking = None if variant == "r1-distill-qwen" else False  # the distills always think
    prompt = llm.chat_prompt(ASK, tools=STRICT_TOOLS, thinking=thinking)
    view = grammar_tokenizer(llm.tokenizer, llm.loaded.config.vocab_size, llm.engine.eos_token_ids)
    grammar = strict_tools_grammar(variant, STRICT_TOOLS, token_marker(llm.tokenizer, view))
    lift = _lift(llm.tokenizer.encode(opening, add_special_tokens=False), prompt.reasoning)
    outcomes = {}
    for held in (True, False):
        params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=100, logits_processors=[lift],
                                 thinking_budget=8 if prompt.thinking else None, reasoning=prompt.reasoning,
                                 structured_output=StructuredOutput("grammar", grammar) if held else None)
                  for seed in range(12)]
        outputs = llm.generate([{"prompt_token_ids": prompt.ids}] * len(params), params)
        calls = [parse_output(llm.chat_prompt(ASK, tools=STRICT_TOOLS, thinking=thinking).parser,  # a fresh parser
                              o.outputs[0].text)["tool_calls"] for o in outputs]
        outcomes[held] = calls
    valid = [c for c in outcomes[True] if c]
    assert len(valid) >= 8  # most requests close their call within max_tokens
    for calls in valid:
        _check_calls(calls)
    for calls in outcomes[False]:
        with pytest.raises((AssertionError, KeyError, ValueError, jsonschema_rs.ValidationError)):
            _check_calls(calls)


def test_strict_tools_through_the_server(tiny_server):
    """The server builds the strict-tools grammar for `tool_choice: "auto"` (the reply is an answer or valid
    calls), in the Anthropic shape too (`strict` on a tool), and refuses to mix it with vLLM's structured_outputs."""
    state, client = tiny_server
    for seed in range(3):
        reply = client.chat.completions.create(model="deepseek-chat", messages=ASK, tools=STRICT_TOOLS, seed=seed,
                                               temperature=1.0, max_tokens=40)
        message = reply.choices[0].message
        assert message.content or message.tool_calls
        if message.tool_calls:
            _check_calls([c.model_dump() for c in message.tool_calls])
    prepared = state.served.prepare_chat(ChatCompletionRequest(model="deepseek-chat", messages=ASK,
                                                               tools=STRICT_TOOLS))
    assert prepared.params.structured_output.kind == "grammar"
    assert "call_0" in prepared.params.structured_output.value
    anthropic = MessagesRequest.model_validate({
        "model": "claude-sonnet-4", "max_tokens": 100, "messages": ASK,
        "tools": [{"name": "get_time", "input_schema": TIME_ARGS, "strict": True}]})
    grammar = state.served.prepare_chat(to_chat_request(anthropic, state.served),
                                        clamp_max_tokens=True).params.structured_output.value
    assert '"enum": ["UTC", "CET"]' in grammar
    loose = state.served.prepare_chat(ChatCompletionRequest(model="deepseek-chat", messages=ASK, tools=TOOLS))
    assert loose.params.structured_output is None  # no strict tool: the model is free
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="deepseek-chat", messages=ASK, tools=STRICT_TOOLS,
                                       extra_body={"structured_outputs": {"regex": "[a-z]+"}})
    assert refused.value.body["param"] == "structured_outputs"
