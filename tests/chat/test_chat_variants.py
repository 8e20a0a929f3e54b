"""Variant detection, capabilities (the 400s and their advice) and the combined output parser."""

from __future__ import annotations

import json

import pytest
from chat_helpers import counter_ids, reference_template

from whale.chat import CHAT_FORMATS, detect_variant, make_output_parser, parse_output, render
from whale.chat.capabilities import CAPABILITIES, capabilities_for, check_request
from whale.errors import CapabilityError, InvalidRequestError


@pytest.mark.parametrize("name, config, template, expected", [
    ("deepseek-ai/DeepSeek-R1", {"model_type": "deepseek_v3"}, None, "r1"),
    ("deepseek-ai/DeepSeek-V3", {"model_type": "deepseek_v3"}, None, "v3"),
    ("deepseek-ai/DeepSeek-V3-0324", {"model_type": "deepseek_v3"}, None, "v3-0324"),
    ("deepseek-ai/DeepSeek-R1-0528", {"model_type": "deepseek_v3"}, None, "r1-0528"),
    ("deepseek-ai/DeepSeek-V3.1-Terminus", {"model_type": "deepseek_v3"}, None, "v3.1"),
    ("deepseek-ai/DeepSeek-V3.2-Exp", {"model_type": "deepseek_v32"}, None, "v3.1"),
    ("deepseek-ai/DeepSeek-V3.2", {"model_type": "deepseek_v32"}, None, "v3.2"),
    ("/models/ckpt", {"model_type": "deepseek_v32"}, None, "v3.2"),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", {"model_type": "qwen2"}, None, "r1-distill-qwen"),
    ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", {"model_type": "llama"}, None, "r1-distill-llama"),
    ("deepseek-ai/DeepSeek-R1-0528-Qwen3-8B", {"model_type": "qwen3"}, None, "r1-0528-qwen3"),
    # an anonymous local directory: the template's fingerprint decides
    ("/models/a", {"model_type": "llama"}, "deepseek-r1-distill", "r1-distill-llama"),
    ("/models/b", {"model_type": "qwen2"}, "deepseek-r1-distill", "r1-distill-qwen"),
    ("/models/c", {"model_type": "deepseek_v3"}, "deepseek-v3.1", "v3.1"),
    ("/models/d", {"model_type": "deepseek_v3"}, "deepseek-r1-0528", "r1-0528"),
    ("/models/e", {"model_type": "qwen3"}, "deepseek-r1-0528", "r1-0528-qwen3"),
])
def test_detect_variant(name, config, template, expected):
    tokenizer_config = {"chat_template": reference_template(template)} if template else {}
    assert detect_variant(config, tokenizer_config, name).name == expected


def test_detect_from_real_package_config_and_other_models(tokenizer_config):
    variant = detect_variant({"model_type": "deepseek_v3"}, tokenizer_config, "/local/dir")
    assert variant.name == "v3" and variant.bos_token == "<｜begin▁of▁sentence｜>"
    other = detect_variant({"model_type": "llama"}, {"chat_template": "{{ messages[0].content }}",
                                                     "bos_token": "<s>"}, "SmolLM2-135M-Instruct")
    assert other.name == "jinja" and other.bos_token == "<s>"
    assert detect_variant({}, {}, "whatever", forced="r1").name == "r1"
    with pytest.raises(InvalidRequestError, match="--chat-format"):
        detect_variant({"model_type": "llama"}, {}, "mystery")
    with pytest.raises(InvalidRequestError, match="unknown chat format"):
        detect_variant({}, {}, "x", forced="v9")


def test_every_format_has_capabilities_and_renders():
    assert set(CHAT_FORMATS) == set(CAPABILITIES)
    for name in CHAT_FORMATS:
        if name != "jinja":
            assert render(name, [{"role": "user", "content": "hi"}]).startswith("<｜begin▁of▁sentence｜>")


def test_capability_errors_say_what_to_change():
    tools = [{"type": "function", "function": {"name": "f"}}]
    with pytest.raises(CapabilityError, match="remove 'tools'"):
        check_request("r1", tools=tools)
    with pytest.raises(CapabilityError, match="set thinking to 'enabled'"):
        check_request("r1", thinking=False)
    with pytest.raises(CapabilityError, match="non-thinking mode"):
        check_request("v3.1", thinking=True, tools=tools)
    with pytest.raises(CapabilityError, match="FIM"):
        check_request("r1-distill-qwen", fim=True)
    assert check_request("v3.2", thinking=True, tools=tools) is True
    assert check_request("v3.1") is False and check_request("r1") is True
    assert CapabilityError("x").http_status == 400


def test_capabilities_values():
    assert capabilities_for("r1").sampling.temperature == 0.6
    assert not capabilities_for("r1").system_prompt
    assert capabilities_for("r1-distill-qwen", {"max_position_embeddings": 16384}).context_length == 16384
    assert capabilities_for("jinja", {"max_position_embeddings": 8192}).context_length == 8192


def test_output_parser_r1_0528_reasoning_then_tool_call():
    prompt = render("r1-0528", [{"role": "user", "content": "Weather?"}], tools=[{"type": "function",
                    "function": {"name": "get_weather"}}])
    parser = make_output_parser("r1-0528", prompt, thinking=True, tools=True, id_factory=counter_ids())
    output = ("<think>\nI should call get_weather.\n</think>\n\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"
              '<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
    streamed = [parser.feed(ch) for ch in output] + [parser.finish()]
    assert "".join(d.reasoning_content for d in streamed) == "I should call get_weather.\n"
    assert "".join(d.content for d in streamed) == ""
    assert [c.name for d in streamed for c in d.tool_calls if c.name] == ["get_weather"]
    whole = make_output_parser("r1-0528", prompt, thinking=True, tools=True, id_factory=counter_ids())
    message = parse_output(whole, output)
    assert message["reasoning_content"] == "I should call get_weather.\n" and message["content"] == ""
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_output_parser_distill_bare_json_call_is_not_lost():
    """vLLM issue 28219: an R1 distill answers with the call as plain JSON; whale still returns tool_calls."""
    prompt = render("r1-distill-llama", [{"role": "user", "content": "Weather?"}])
    parser = make_output_parser("r1-distill-llama", prompt, thinking=True, tools=True, id_factory=counter_ids())
    output = 'Okay, call the tool.\n</think>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
    message = parse_output(parser, output)
    assert message["content"] == "" and message["reasoning_content"] == "Okay, call the tool.\n"
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_output_parser_non_thinking_v31_keeps_content_verbatim():
    prompt = render("v3.1", [{"role": "user", "content": "hi"}])
    parser = make_output_parser("v3.1", prompt, thinking=False, tools=False)
    assert parse_output(parser, "\nHello <think> there") == {
        "role": "assistant", "content": "\nHello <think> there", "reasoning_content": None, "tool_calls": None}


DISTILL_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "%s"}}</tool_call>'
V3_CALL = ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "%s"}\n```'
           '<｜tool▁call▁end｜><｜tool▁calls▁end｜>')


@pytest.mark.parametrize("variant, call", [("r1-distill-qwen", DISTILL_CALL), ("r1-0528", V3_CALL)])
@pytest.mark.parametrize("shape, cities", [
    ("I should call it.\n{rome}", ["Rome"]),  # the reasoning never closes: its call is the model's call
    ("Calling.\n{rome}\n</think>\n\nAsked for the weather.", ["Rome"]),  # the answer calls nothing: recovered
    ("Draft: {rome}\n</think>\n\n{paris}", ["Paris"]),  # the answer calls: the reasoning's call was a draft
    ("No call here.\n</think>\n\nIt is sunny.", []),
])
def test_calls_made_inside_the_reasoning_are_never_lost(variant, call, shape, cities):
    """The peers drop calls a distill makes inside <think> (or return them as text); whale returns them as
    tool_calls, the same streamed character by character as whole, and the reasoning text as written."""
    prompt = render(variant, [{"role": "user", "content": "Weather?"}],
                    tools=[{"type": "function", "function": {"name": "get_weather"}}])
    output = shape.format(rome=call % "Rome", paris=call % "Paris")
    whole = parse_output(make_output_parser(variant, prompt, thinking=True, tools=True, id_factory=counter_ids()),
                         output)
    assert [json.loads(c["function"]["arguments"])["city"] for c in whole["tool_calls"] or ()] == cities
    assert whole["reasoning_content"].startswith(shape[:5])  # the reasoning is passed on as written
    parser = make_output_parser(variant, prompt, thinking=True, tools=True, id_factory=counter_ids())
    streamed = [parser.feed(ch) for ch in output] + [parser.finish()]
    assert "".join(d.reasoning_content for d in streamed) == whole["reasoning_content"]
    assert "".join(d.content for d in streamed) == whole["content"]
    names = [c.name for d in streamed for c in d.tool_calls if c.name]
    arguments = "".join(c.arguments for d in streamed for c in d.tool_calls)
    assert names == ["get_weather"] * len(cities)
    assert arguments == "".join(c["function"]["arguments"] for c in whole["tool_calls"] or ())
