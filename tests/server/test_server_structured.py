"""Structured output on a tiny random DeepSeek-V3 checkpoint with the real DeepSeek tokenizer: random weights at
temperature 1 write anything, so every answer that holds to its schema holds because of the grammar. Through the
real server and the openai SDK: `json_schema` (nested objects, arrays, enums, anyOf, bounds) in chat and thinking
mode, `json_object`, and the 400 for a schema llguidance cannot serve. Answers are checked by jsonschema-rs."""

from __future__ import annotations

import json
import re

import jsonschema_rs
import openai
import pytest

from whale.chat import ChatVariant
from whale.sampling_params import SamplingParams, StructuredOutput

ASK = [{"role": "user", "content": "Describe a person as JSON."}]
SCHEMA = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "address": {"type": "object", "additionalProperties": False, "required": ["city"],
                    "properties": {"city": {"type": "string", "maxLength": 5}, "zip": {"type": "integer", "minimum": 0,
                                                                                "maximum": 99999}}},
        "contact": {"anyOf": [{"type": "null"}, {"type": "boolean"}, {"type": "integer", "minimum": 0,
                                                                              "maximum": 9}]}},
    "required": ["name", "age", "role", "tags", "address", "contact"]}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}


def test_every_answer_follows_the_schema(tiny_server):
    _, client = tiny_server
    finished = 0
    for seed in range(12):
        reply = client.chat.completions.create(model="deepseek-chat", messages=ASK, response_format=FORMAT,
                                               temperature=1.0, seed=seed, max_tokens=120)
        choice = reply.choices[0]
        if choice.finish_reason == "stop":
            jsonschema_rs.validate(SCHEMA, json.loads(choice.message.content))
            finished += 1
        else:  # max_tokens cut it: the partial text, said honestly
            assert choice.finish_reason == "length" and choice.message.content.startswith("{")
    assert finished >= 10


def test_thinking_then_the_schema(tiny_server):
    """The model thinks freely, its thinking is ended by the budget, and the answer follows the schema."""
    _, client = tiny_server
    for seed in range(4):
        reply = client.chat.completions.create(model="deepseek-reasoner", messages=ASK, response_format=FORMAT,
                                               seed=seed, max_tokens=160,
                                               extra_body={"thinking": {"type": "enabled", "budget_tokens": 12}})
        message = reply.choices[0].message
        assert message.model_extra["reasoning_content"]
        if reply.choices[0].finish_reason == "stop":
            jsonschema_rs.validate(SCHEMA, json.loads(message.content))


def test_json_object_starts_an_object_and_a_finished_one_parses(tiny_server):
    _, client = tiny_server
    for seed in range(3):
        reply = client.chat.completions.create(model="deepseek-chat", messages=ASK, temperature=1.0, seed=seed,
                                               response_format={"type": "json_object"}, max_tokens=40)
        content = reply.choices[0].message.content
        assert content.startswith("{")
        if reply.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(content), dict)


def test_a_schema_the_engine_cannot_serve_is_a_400_naming_the_keyword(tiny_server):
    _, client = tiny_server
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {"type": "x"}}}}
    with pytest.raises(openai.BadRequestError, match="not") as info:
        client.chat.completions.create(model="deepseek-chat", messages=ASK, response_format=bad)
    assert info.value.body["param"] == "response_format"
    with pytest.raises(openai.UnprocessableEntityError, match="json_schema"):
        client.chat.completions.create(model="deepseek-chat", messages=ASK, response_format={"type": "json_schema"})


def test_r1_answers_after_its_tail(tiny_path, tiny_server):
    """R1 ends thinking with "\\n</think>\\n\\n": the grammar starts after the whole tail (offline, LLM)."""
    from whale import LLM

    llm = LLM(str(tiny_path), dtype="float32")
    llm.chat_variant = ChatVariant("r1")
    prompt = llm.chat_prompt(ASK)
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=200, thinking_budget=8,
                             reasoning=prompt.reasoning,
                             structured_output=StructuredOutput("json_schema", json.dumps(SCHEMA)))
              for seed in range(4)]
    outputs = [o.outputs[0] for o in llm.generate([{"prompt_token_ids": prompt.ids}] * len(params), params)]
    for output in outputs:
        reasoning, answer = output.text.split("</think>\n\n", 1)
        assert answer.startswith("{")
        if output.finish_reason == "stop":
            jsonschema_rs.validate(SCHEMA, json.loads(answer))
    assert any(output.finish_reason == "stop" for output in outputs)


def test_vllm_structured_outputs_extras(tiny_server):
    """Clients written for vLLM send `structured_outputs` in extra_body: regex, choice, Lark grammar, JSON."""
    _, client = tiny_server

    def reply(**extra):
        return client.chat.completions.create(model="deepseek-chat", messages=ASK, temperature=1.0, seed=1,
                                              max_tokens=40, extra_body={"structured_outputs": extra})

    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", reply(regex=r"[0-9]{3}-[a-z]{2}").choices[0].message.content)
    assert reply(choice=["yes", "no way", "maybe"]).choices[0].message.content in ("yes", "no way", "maybe")
    assert reply(grammar='start: "A" ("," "A")*\n').choices[0].message.content.split(",")[0] == "A"
    answer = reply(json={"type": "object", "additionalProperties": False, "required": ["ok"],
                         "properties": {"ok": {"type": "boolean"}}})
    assert json.loads(answer.choices[0].message.content) in ({"ok": True}, {"ok": False})
    with pytest.raises(openai.UnprocessableEntityError, match="exactly one"):
        reply(regex="a", choice=["a"])
    with pytest.raises(openai.BadRequestError) as info:
        reply(regex="(unclosed")
    assert info.value.body["param"] == "structured_outputs"


def test_a_hundred_seeded_answers_follow_the_schema(tiny_path, default_llm):
    """Offline, one batch of 100 seeded requests at temperature 1: every finished answer validates."""
    from whale import LLM

    llm = LLM(str(tiny_path), dtype="float32", max_num_seqs=100)
    prompt = llm.chat_prompt(ASK, thinking=False)
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=150, structured_output=spec)
              for seed in range(100)]
    outputs = [o.outputs[0] for o in llm.generate([{"prompt_token_ids": prompt.ids}] * len(params), params)]
    finished = [o for o in outputs if o.finish_reason == "stop"]
    for output in finished:
        jsonschema_rs.validate(SCHEMA, json.loads(output.text))
    assert len(finished) >= 95
    assert len({o.text for o in finished}) > 90  # a hundred different answers, not one answer a hundred times
