"""A client written for today's hosted API (V4 names, thinking on by default, reasoning_effort, tools in thinking
mode, reasoning_content passed back) against `whale serve` on a DeepSeek-V4 model: the real server, the real V4
tokenizer and encoder, and the ScriptedEngine double writing the model's reply (no V4 weights run here)."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest
from scripted_engine import deepseek_v4_served, scripted_server

from whale.chat.dsv4 import EFFORT_PROMPTS

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
CALL = ('<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def v4():
    with scripted_server(deepseek_v4_served()) as (engine, url):
        yield engine, url, openai.OpenAI(base_url=url, api_key="unused", max_retries=0)


def test_thinking_is_on_by_default_and_effort_picks_the_preamble(v4):
    engine, _, client = v4
    engine.output = "Simple.</think>Sunny."
    reply = client.chat.completions.create(model="deepseek-v4-flash", messages=ASK)
    assert engine.prompt_text().startswith("<｜begin▁of▁sentence｜>" + EFFORT_PROMPTS["high"])
    assert engine.prompt_text().endswith("<｜User｜>Weather in Paris?<｜Assistant｜><think>")
    assert reply.choices[0].message.model_extra["reasoning_content"] == "Simple."
    assert reply.choices[0].message.content == "Sunny."
    client.chat.completions.create(model="deepseek-v4-pro", messages=ASK, reasoning_effort="max")
    assert EFFORT_PROMPTS["max"] in engine.prompt_text()
    assert engine.params().temperature == 1.0 and engine.params().top_p == 1.0  # the V4 card's sampling
    client.chat.completions.create(model="deepseek-v4-flash", messages=ASK,
                                   extra_body={"thinking": {"type": "disabled"}})
    assert engine.prompt_text() == "<｜begin▁of▁sentence｜><｜User｜>Weather in Paris?<｜Assistant｜></think>"
    with pytest.raises(openai.UnprocessableEntityError, match="reasoning_effort"):
        client.chat.completions.create(model="deepseek-v4-flash", messages=ASK, reasoning_effort="minimal")


def test_tools_in_thinking_mode_round_trip(v4):
    engine, _, client = v4
    engine.output = "I need the tool.</think>\n\n" + CALL
    reply = client.chat.completions.create(model="deepseek-v4-flash", messages=ASK, tools=[WEATHER])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    chunks = list(client.chat.completions.create(model="deepseek-v4-flash", messages=ASK, tools=[WEATHER],
                                                 stream=True))
    streamed = [c for chunk in chunks for c in chunk.choices[0].delta.tool_calls or ()]
    assert [c.function.name for c in streamed] == ["get_weather"]
    assert json.loads("".join(c.function.arguments for c in streamed)) == {"city": "Paris", "days": 2}
    # the next request of the turn passes reasoning_content back; the tool result joins a user turn
    engine.output = "Got it.</think>Sunny, 21 °C."
    messages = [*ASK, {"role": "assistant", "content": "", "reasoning_content": "I need the tool.",
                       "tool_calls": [{"id": call.id, "type": "function", "function": {
                           "name": "get_weather", "arguments": call.function.arguments}}]},
                {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21"}]
    reply = client.chat.completions.create(model="deepseek-v4-flash", messages=messages, tools=[WEATHER])
    assert reply.choices[0].message.content == "Sunny, 21 °C."
    prompt = engine.prompt_text()
    assert "<｜Assistant｜><think>I need the tool.</think>\n\n<｜DSML｜tool_calls>" in prompt
    assert prompt.endswith("<｜User｜><tool_result>sunny, 21</tool_result><｜Assistant｜><think>")


def test_anthropic_route_runs_v4_with_its_effort(v4):
    engine, url, _ = v4
    client = anthropic.Anthropic(base_url=f"{url}/anthropic", api_key="unused", max_retries=0)
    engine.output = "Think.</think>Answer."
    reply = client.messages.create(model="claude-opus-4", max_tokens=64, messages=ASK,
                                   extra_body={"output_config": {"effort": "max"}})
    assert [b.type for b in reply.content] == ["thinking", "text"]
    assert EFFORT_PROMPTS["max"] in engine.prompt_text()


def test_anthropic_budgets_past_the_limits_are_clamped(v4):
    """Anthropic clients send large max_tokens (32K is common): lowered to the mode's maximum and what the context
    leaves, where the OpenAI shape answers 422 / 400."""
    engine, url, client = v4
    anthropic_client = anthropic.Anthropic(base_url=f"{url}/anthropic", api_key="unused", max_retries=0)
    engine.output = "Answer."
    anthropic_client.messages.create(model="claude-haiku-4", max_tokens=16_000, messages=ASK,
                                     thinking={"type": "disabled"})
    room = 8192 - len(engine.requests[-1][0])
    assert engine.params().max_tokens == min(8192, room)
    with pytest.raises(openai.UnprocessableEntityError, match=r"\[1, 8192\]"):
        client.chat.completions.create(model="deepseek-chat", messages=ASK, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 8192"):
        client.chat.completions.create(model="deepseek-v4-flash", messages=ASK, max_tokens=65536)
