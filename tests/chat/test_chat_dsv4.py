"""DeepSeek-V4: prompts byte-equal to DeepSeek's own encoder, on the real V4 tokenizer, and DSML tool calls parsed
back (thinking on by default, the API's reasoning efforts, detection from the checkpoint)."""

from __future__ import annotations

import json

import pytest
from chat_helpers import TEMPLATES_DIR, counter_ids
from tokenizer_files import V4_DIR

from whale.chat import detect_variant, make_output_parser, parse_output, render
from whale.chat.capabilities import resolve_thinking
from whale.chat.conversation import chat_prompt
from whale.chat.dsv4 import EFFORT_PROMPTS
from whale.errors import CapabilityError
from whale.tokenizer import Tokenizer

GOLDEN = json.loads((TEMPLATES_DIR / "deepseek-v4-golden.json").read_text())
BOS, EOS, U, A = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
DSML_CALL = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
             '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
             '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
             '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')


@pytest.fixture(scope="module")
def v4_tokenizer() -> Tokenizer:
    return Tokenizer.from_hf_dir(V4_DIR)


@pytest.mark.parametrize("case", GOLDEN, ids=[case["name"] for case in GOLDEN])
def test_prompt_equals_deepseeks_encoder(case):
    """tests/chat/templates/make_deepseek_v4_golden.py wrote these prompts with DeepSeek's encoding_dsv4.py."""
    assert render("v4", case["messages"], tools=case["tools"], thinking=case["thinking"],
                  effort=case["effort"]) == case["prompt"]


def test_markers_are_single_tokens_of_the_v4_vocabulary(v4_tokenizer):
    prompt = render("v4", [{"role": "user", "content": "Hi"}], tools=[WEATHER], thinking=True, effort="max")
    ids = v4_tokenizer.encode(prompt, add_special_tokens=False)
    marker_ids = {v4_tokenizer.encode(m, add_special_tokens=False)[0]: m
                  for m in (BOS, U, A, "<think>", "</think>", "｜DSML｜")}
    assert len(marker_ids) == 6 and all(len(v4_tokenizer.encode(m, add_special_tokens=False)) == 1
                                        for m in marker_ids.values())
    assert ids[0] == v4_tokenizer.encode(BOS, add_special_tokens=False)[0]
    assert ids[-2:] == [v4_tokenizer.encode(A, add_special_tokens=False)[0],
                        v4_tokenizer.encode("<think>", add_special_tokens=False)[0]]
    assert v4_tokenizer.decode(ids, skip_special_tokens=False) == prompt


def test_api_efforts_and_the_default_thinking_mode(v4_tokenizer):
    messages = [{"role": "user", "content": "Prove it."}]
    default = chat_prompt("v4", v4_tokenizer, messages)
    assert default.thinking and resolve_thinking("v4", None)
    assert default.text == f"{BOS}{EFFORT_PROMPTS['high']}{U}Prove it.{A}<think>"
    for effort, runs_as in [("low", "high"), ("medium", "high"), ("high", "high"), ("xhigh", "max"),
                            ("max", "max")]:
        text = chat_prompt("v4", v4_tokenizer, messages, effort=effort).text
        assert text.startswith(BOS + EFFORT_PROMPTS[runs_as]), effort
    chat = chat_prompt("v4", v4_tokenizer, messages, thinking=False, effort="max")
    assert chat.text == f"{BOS}{U}Prove it.{A}</think>" and not chat.thinking
    with pytest.raises(CapabilityError, match="'minimal' is not one of: low, medium, high, xhigh, max"):
        chat_prompt("v4", v4_tokenizer, messages, effort="minimal")


def test_prefix_with_reasoning_only_continues_the_reasoning():
    messages = [{"role": "user", "content": "Q"},
                {"role": "assistant", "content": "", "reasoning_content": "First, ", "prefix": True}]
    prompt = render("v4", messages, thinking=True)
    assert prompt == f"{BOS}{U}Q{A}<think>First, "
    parser = make_output_parser("v4", prompt, thinking=True, tools=False)
    assert parse_output(parser, "check.</think>Done.")["reasoning_content"] == "check."


def test_thinking_reply_with_calls_parses_into_tool_calls(v4_tokenizer):
    prompt = render("v4", [{"role": "user", "content": "Weather?"}], tools=[WEATHER], thinking=True)
    output = "I should call the tool.</think>" + DSML_CALL
    message = parse_output(make_output_parser("v4", prompt, thinking=True, tools=True, id_factory=counter_ids()),
                           output)
    assert message["reasoning_content"] == "I should call the tool."
    assert message["content"] == ""
    assert message["tool_calls"] == [{"id": "call_0", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]
    # streamed token by token with the real V4 tokenizer: the same message
    parser = make_output_parser("v4", prompt, thinking=True, tools=True, id_factory=counter_ids())
    ids = v4_tokenizer.encode(output, add_special_tokens=False)
    texts = [v4_tokenizer.decode(ids[:n]) for n in range(len(ids) + 1)]
    deltas = [parser.feed(b[len(a):]) for a, b in zip(texts, texts[1:], strict=False)] + [parser.finish()]
    assert "".join(d.reasoning_content for d in deltas) == message["reasoning_content"]
    assert [c.arguments for d in deltas for c in d.tool_calls] == ['{"city": "Paris", "days": 2}']


def test_a_call_cut_off_or_in_the_v32_wrapper_is_text():
    prompt = render("v4", [{"role": "user", "content": "Weather?"}], tools=[WEATHER], thinking=False)
    for output in ["Sure." + DSML_CALL[:-30], "Sure." + DSML_CALL.replace("tool_calls", "function_calls")]:
        message = parse_output(make_output_parser("v4", prompt, thinking=False, tools=True), output)
        assert message["tool_calls"] is None
        assert message["content"] == output


def test_reasoning_passed_back_after_tool_calls_is_rendered():
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "reasoning_content": "Need data.", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    prompt = render("v4", messages, tools=[WEATHER], thinking=True, effort="high")
    assert "<think>Need data.</think>\n\n<｜DSML｜tool_calls>" in prompt
    assert prompt.endswith(f"{U}<tool_result>sunny</tool_result>{A}<think>")
    # reasoning omitted (the hosted API answers 400): whale renders an empty think block and goes on
    without = [dict(m) for m in messages]
    del without[1]["reasoning_content"]
    assert "<think></think>\n\n<｜DSML｜tool_calls>" in render("v4", without, tools=[WEATHER], thinking=True)


@pytest.mark.parametrize(("config", "name", "expected"), [
    ({"model_type": "deepseek_v4"}, "my-model", "v4"),
    ({"architectures": ["DeepseekV4ForCausalLM"]}, "x", "v4"),
    ({}, "DeepSeek-V4-Flash", "v4"),
    ({}, "deepseek-ai/DeepSeek-V4-Pro-Q4_K_M", "v4"),
    ({"model_type": "deepseek_v3"}, "DeepSeek-V3.2", "v3.2"),
])
def test_detection(config, name, expected):
    assert detect_variant(config, {}, name).name == expected
