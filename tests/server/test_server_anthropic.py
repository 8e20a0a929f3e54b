"""The Anthropic shape at /anthropic/v1/messages through the anthropic SDK: messages and streaming on the
default model; thinking blocks and tool use with the ScriptedEngine double on a DeepSeek-V3.2 served model."""

from __future__ import annotations

import anthropic
import httpx
import pytest
from scripted_engine import ScriptedEngine, deepseek_v32_served
from server_harness import DEFAULT_OPTIONS, FAST_TIMINGS, running_server, serving

from whale.server.state import ServerState

ASK = [{"role": "user", "content": "Say hello."}]
GREEDY = {"temperature": 0}  # this SDK version has no temperature argument; DeepSeek's endpoint takes it
WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
DSML_CALL = ('<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_weather">\n'
             '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
             '</｜DSML｜function_calls>')


@pytest.fixture(scope="module")
def default_server(default_llm):
    with serving(default_llm.loaded, **DEFAULT_OPTIONS, api_keys=("sk-ant",)) as served:
        yield served


@pytest.fixture(scope="module")
def client(default_server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{default_server[1]}/anthropic", api_key="sk-ant", max_retries=0)


def test_messages_response_shape(client):
    reply = client.messages.create(model="deepseek-chat", max_tokens=8, messages=ASK, extra_body=GREEDY,
                                   system="You are terse.")
    assert reply.type == "message" and reply.role == "assistant" and reply.model == "deepseek-chat"
    assert reply.content[0].type == "text" and reply.content[0].text
    assert reply.stop_reason in ("end_turn", "max_tokens")
    assert reply.usage.input_tokens + reply.usage.cache_read_input_tokens > 0 and reply.usage.output_tokens > 0


def test_streaming_text_matches_the_final_message(client):
    with client.messages.stream(model="deepseek-chat", max_tokens=8, messages=ASK, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text and final.stop_reason in ("end_turn", "max_tokens")


def test_unknown_model_names_are_served_and_stop_sequences_are_reported(client):
    free = client.messages.create(model="claude-any-model", max_tokens=8, messages=ASK, extra_body=GREEDY)
    text = free.content[0].text
    stop = text[1:3]
    # a large budget (Anthropic clients send up to 32K) is capped to the mode's maximum and the context
    stopped = client.messages.create(model="claude-any-model", max_tokens=16000, messages=ASK, extra_body=GREEDY,
                                     stop_sequences=[stop])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop


def test_errors_come_in_the_anthropic_shape(default_server, client):
    url = f"{default_server[1]}/anthropic/v1/messages"
    headers = {"x-api-key": "sk-ant"}
    missing = httpx.post(url, json={"model": "deepseek-chat", "messages": ASK}, headers=headers)
    assert missing.status_code == 400
    assert missing.json()["type"] == "error" and "max_tokens" in missing.json()["error"]["message"]
    image = [{"role": "user", "content": [{"type": "image", "source": {}}]}]
    refused = httpx.post(url, json={"model": "deepseek-chat", "max_tokens": 4, "messages": image}, headers=headers)
    assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=f"{default_server[1]}/anthropic", api_key="wrong",
                            max_retries=0).messages.create(model="deepseek-chat", max_tokens=4, messages=ASK)


@pytest.fixture(scope="module")
def scripted():
    served = deepseek_v32_served()
    engine = ScriptedEngine(served.tokenizer)
    with running_server(ServerState(engine, served, timings=FAST_TIMINGS)) as url:
        yield engine, anthropic.Anthropic(base_url=f"{url}/anthropic", api_key="unused", max_retries=0)


def test_thinking_blocks(scripted):
    engine, client = scripted
    engine.output = "Greeting is polite.</think>Hello!"
    thinking = {"type": "enabled", "budget_tokens": 1024}
    reply = client.messages.create(model="deepseek-chat", max_tokens=64, messages=ASK, thinking=thinking)
    assert [b.type for b in reply.content] == ["thinking", "text"]
    assert reply.content[0].thinking == "Greeting is polite." and reply.content[1].text == "Hello!"
    with client.messages.stream(model="deepseek-chat", max_tokens=64, messages=ASK, thinking=thinking) as stream:
        kinds = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert set(kinds) == {"thinking_delta", "text_delta"}
    assert final.content[0].thinking == "Greeting is polite." and final.content[1].text == "Hello!"


def test_tool_use_round_trip(scripted):
    engine, client = scripted
    engine.output = DSML_CALL
    reply = client.messages.create(model="deepseek-chat", max_tokens=64, messages=[
        {"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER])
    assert reply.stop_reason == "tool_use"
    call = reply.content[-1]
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris"}
    with client.messages.stream(model="deepseek-chat", max_tokens=64, tools=[WEATHER],
                                messages=[{"role": "user", "content": "Weather in Paris?"}]) as stream:
        final = stream.get_final_message()
    assert final.content[-1].input == {"city": "Paris"} and final.stop_reason == "tool_use"
    engine.output = "It is sunny."
    follow_up = client.messages.create(model="deepseek-chat", max_tokens=64, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name,
                                           "input": call.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21C"}]}])
    assert follow_up.content[0].text == "It is sunny." and follow_up.stop_reason == "end_turn"
    prompt = engine.prompt_text()  # the call is replayed in DSML, the result as a function result
    assert 'name="get_weather"' in prompt and ">Paris<" in prompt and "<result>sunny, 21C</result>" in prompt


def test_count_tokens_is_the_prompt_a_message_would_have(client):
    system = "You are terse."
    counted = client.messages.count_tokens(model="deepseek-chat", messages=ASK, system=system).input_tokens
    reply = client.messages.create(model="deepseek-chat", max_tokens=1, messages=ASK, system=system)
    assert counted == reply.usage.input_tokens + reply.usage.cache_read_input_tokens
    longer = client.messages.count_tokens(model="deepseek-chat", system=system,
                                          messages=[{"role": "user", "content": "Say hello, twice over."}])
    assert longer.input_tokens > counted
    with pytest.raises(anthropic.UnprocessableEntityError, match="messages"):
        client.messages.count_tokens(model="deepseek-chat", messages=[])
