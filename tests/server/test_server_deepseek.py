"""DeepSeek-specific paths on a tiny random DeepSeek-V3 checkpoint (v3.2 chat format) with the real DeepSeek
tokenizer: FIM on /beta/completions, the reasoner alias, thinking rules, tools, prefix completion. Where the
model's own words matter (reasoning split, tool calls, JSON), the ScriptedEngine double writes them."""

from __future__ import annotations

import io
import json

import httpx
import openai
import pytest
from scripted_engine import scripted_server
from server_harness import serving

from whale.chat import render_fim

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "array"}},
                   "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
DSML_CALLS = ('Checking.\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_weather">\n'
              '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
              '<｜DSML｜parameter name="days" string="false">[1, 2]</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
              '<｜DSML｜invoke name="get_time">\n</｜DSML｜invoke>\n</｜DSML｜function_calls>')
ASK = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def tiny(tiny_path, default_llm):  # default_llm: the session's model, loaded before the timing-sensitive work
    from whale.models.loader import load_model

    with serving(load_model(str(tiny_path), dtype="float32"), engine_options={"num_kv_blocks": 128}) as served:
        yield served


@pytest.fixture(scope="module")
def client(tiny) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny[1]}/beta", api_key="unused", max_retries=0)


def test_the_checkpoint_is_served_with_the_v32_format(tiny):
    state, url = tiny
    assert state.served.variant.name == "v3.2"
    assert [m["id"] for m in httpx.get(f"{url}/models").json()["data"]][0] == "deepseek-v3.2-tiny"


def test_fim_on_beta_completions(tiny, client):
    state, _ = tiny
    reply = client.completions.create(model="deepseek-chat", prompt="def add(a, b):\n", suffix="\n\nprint(add(1, 2))",
                                      max_tokens=6, temperature=0)
    expected = state.served.tokenizer.encode(render_fim("def add(a, b):\n", "\n\nprint(add(1, 2))"),
                                             add_special_tokens=False)
    assert reply.object == "text_completion" and reply.usage.prompt_tokens == len(expected)
    assert reply.choices[0].finish_reason in ("stop", "length")
    streamed = list(client.completions.create(model="deepseek-chat", prompt="def add(a, b):\n", max_tokens=4,
                                              temperature=0, stream=True, logprobs=2,
                                              stream_options={"include_usage": True}))
    *chunks, usage = streamed
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and usage.choices == []
    logprobs = [c.choices[0].logprobs for c in chunks]  # every chunk carries its token's logprob and 2 others
    assert all(lp is not None and len(lp.tokens) == 1 and len(lp.top_logprobs[0]) == 2 for lp in logprobs)
    assert len(logprobs) == usage.usage.completion_tokens


def test_fim_is_refused_in_thinking_mode(tiny):
    response = httpx.post(f"{tiny[1]}/beta/completions", json={"model": "deepseek-reasoner", "prompt": "x"})
    assert response.status_code == 400 and "thinking" in response.json()["error"]["message"]


def test_reasoner_alias_turns_thinking_on_and_reports_reasoning_tokens(client):
    reply = client.chat.completions.create(model="deepseek-reasoner", messages=ASK, max_tokens=8, seed=0)
    message = reply.choices[0].message
    assert message.model_extra["reasoning_content"]  # the random model's words land in the reasoning
    details = reply.usage.completion_tokens_details
    assert 0 < details.reasoning_tokens <= reply.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="deepseek-chat", messages=ASK, max_tokens=4, stream=True,
                                                 extra_body={"thinking": {"type": "enabled"}}))
    assert chunks[0].choices[0].delta.model_extra["reasoning_content"] == ""


def test_offline_chat_renders_as_the_server_does_and_splits_the_reply(tiny, tiny_path):
    """LLM.chat and `whale chat` render through the chat layer, as the server does: a V3.2 checkpoint (no Jinja
    template) chats offline, and the reply comes split into reasoning and answer."""
    from whale import LLM, SamplingParams
    from whale.commands.chat import stream_reply
    from whale.server.protocol import ChatCompletionRequest

    llm = LLM(str(tiny_path), dtype="float32")
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for model, thinking in (("deepseek-reasoner", True), ("deepseek-chat", False)):
        server_side = tiny[0].served.prepare_chat(ChatCompletionRequest(model=model, messages=ASK))
        output = llm.chat(ASK, greedy, thinking=thinking)
        assert output.prompt_token_ids == server_side.prompt_ids
        # the random model never closes its reasoning: with thinking, every word of it is reasoning
        text, message = output.outputs[0].text, output.message
        assert (message["reasoning_content"], message["content"]) == ((text, "") if thinking else (None, text))
    out = io.StringIO()
    answer = stream_reply(llm.engine, llm.chat_prompt(ASK, thinking=True), greedy, out)
    assert answer == "" and out.getvalue() == llm.chat(ASK, greedy, thinking=True).outputs[0].text


def test_whale_chat_picks_the_thinking_mode(tiny_path, default_llm):
    """`whale chat --thinking on|off` on a model with both modes; on a model without it, one line at start."""
    import subprocess
    import sys

    from whale import LLM, SamplingParams

    llm = LLM(str(tiny_path), dtype="float32")
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for mode in ("on", "off"):
        done = subprocess.run([sys.executable, "-m", "whale.cli", "chat", "--model", str(tiny_path), "--dtype",
                               "float32", "--thinking", mode, "--temperature", "0", "--max-tokens", "6"],
                              input="What is 2 + 2?\n/exit\n", capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        reply = done.stdout.split("\n> ")[1]
        expected = llm.chat(ASK, greedy, thinking=mode == "on")
        assert expected.prompt_token_ids[-1] == llm.tokenizer.encode("<think>" if mode == "on" else "</think>",
                                                                    add_special_tokens=False)[-1]
        assert reply == expected.outputs[0].text + "\n"  # the random model's words: reasoning, or the answer
    done = subprocess.run([sys.executable, "-m", "whale.cli", "chat", "--thinking", "on"], input="/exit\n",
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "thinking" in done.stderr


def test_whale_chat_holds_a_thinking_budget(tiny_path, default_llm):
    import subprocess
    import sys

    from whale import LLM, SamplingParams

    done = subprocess.run([sys.executable, "-m", "whale.cli", "chat", "--model", str(tiny_path), "--dtype", "float32",
                           "--thinking", "on", "--thinking-budget", "3", "--temperature", "0", "--max-tokens", "12"],
                          input="What is 2 + 2?\n/exit\n", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reply = done.stdout.split("\n> ")[1]
    expected = LLM(str(tiny_path), dtype="float32").chat(ASK, SamplingParams(temperature=0, max_tokens=12),
                                                         thinking=True, thinking_budget=3).message
    assert expected["content"] and len(expected["reasoning_content"]) > 0
    assert reply.startswith(expected["reasoning_content"]) and expected["content"].strip() in reply


def test_thinking_refuses_logprobs(client):
    with pytest.raises(openai.BadRequestError, match="thinking mode"):
        client.chat.completions.create(model="deepseek-reasoner", messages=ASK, logprobs=True)


def test_an_answer_inside_the_tool_loop_without_its_reasoning_is_refused(client):
    # V3.2 keeps the reasoning after the last user turn; an assistant turn there must bring it back
    messages = [*ASK, {"role": "assistant", "content": "It is four."}]
    with pytest.raises(openai.BadRequestError, match="must be passed back"):
        client.chat.completions.create(model="deepseek-reasoner", messages=messages, max_tokens=2)


@pytest.fixture(scope="module")
def scripted(tiny):
    """The real server and served model, with the ScriptedEngine double in place of the random model."""
    with scripted_server(tiny[0].served) as (engine, url):
        yield engine, openai.OpenAI(base_url=url, api_key="unused", max_retries=0)


KNOBS = dict(temperature=0.0, top_p=0.5, presence_penalty=2, frequency_penalty=1)


def test_thinking_mode_ignores_the_sampling_knobs(scripted):
    engine, client = scripted
    engine.output = "Sum.</think>4"
    client.chat.completions.create(model="deepseek-chat", messages=ASK, max_tokens=2, **KNOBS)
    params = engine.params()  # chat mode honours them
    assert (params.temperature, params.top_p, params.presence_penalty, params.frequency_penalty) == (0, 0.5, 2, 1)
    client.chat.completions.create(model="deepseek-reasoner", messages=ASK, max_tokens=2, seed=3, **KNOBS)
    params = engine.params()  # thinking mode: the model's defaults (V3.2: 1.0 / 0.95), no penalties, as DeepSeek
    assert (params.temperature, params.top_p, params.presence_penalty, params.frequency_penalty) == (1, 0.95, 0, 0)
    assert (params.seed, params.max_tokens) == (3, 2)


def test_fim_prompt_and_sampling_fields_reach_the_engine(scripted):
    engine, client = scripted
    engine.output = "    return a + b"
    reply = client.completions.create(model="deepseek-chat", prompt="def add(a, b):\n", suffix="\n\nprint(add(1, 2))",
                                      max_tokens=6, temperature=0.2, top_p=0.5, presence_penalty=1,
                                      frequency_penalty=0.5, seed=5, stop=["\n\n"], logprobs=2)
    assert reply.choices[0].text == "    return a + b"
    assert engine.prompt_text() == "<｜fim▁begin｜>def add(a, b):\n<｜fim▁hole｜>\n\nprint(add(1, 2))<｜fim▁end｜>"
    params = engine.params()
    assert (params.temperature, params.top_p, params.presence_penalty, params.frequency_penalty) == (0.2, 0.5, 1, 0.5)
    assert (params.seed, params.max_tokens, params.stop_strings, params.logprobs) == (5, 6, ("\n\n",), 2)


def test_tools_tool_choice_and_prefix_reach_the_prompt(scripted):
    engine, client = scripted
    engine.output = "x = 1\n"
    client.chat.completions.create(model="deepseek-chat", messages=ASK, tools=[WEATHER_TOOL], tool_choice="auto")
    with_tools = engine.prompt_text()
    assert "## Tools" in with_tools and '"name": "get_weather"' in with_tools
    assert with_tools.endswith("<｜User｜>What is 2 + 2?<｜Assistant｜></think>")
    client.chat.completions.create(model="deepseek-chat", messages=ASK, tools=[WEATHER_TOOL], tool_choice="none")
    assert engine.prompt_text() == "<｜begin▁of▁sentence｜><｜User｜>What is 2 + 2?<｜Assistant｜></think>"
    prefix = [*ASK, {"role": "assistant", "content": "```python\n", "prefix": True}]
    reply = client.chat.completions.create(model="deepseek-chat", messages=prefix, stop=["```"])
    assert engine.prompt_text().endswith("<｜Assistant｜></think>```python\n")  # continued, not closed
    assert engine.params().stop_strings == ("```",) and reply.choices[0].message.content == "x = 1\n"
    with pytest.raises(openai.UnprocessableEntityError, match="not in 'tools'"):
        client.chat.completions.create(model="deepseek-chat", messages=ASK, tools=[WEATHER_TOOL],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


def test_reasoning_reaches_reasoning_content(scripted):
    engine, client = scripted
    engine.output = "Two plus two is four.</think>The answer is 4."
    reply = client.chat.completions.create(model="deepseek-reasoner", messages=ASK)
    assert engine.prompt_text().endswith("<｜Assistant｜><think>")
    message = reply.choices[0].message
    assert message.model_extra["reasoning_content"] == "Two plus two is four."
    assert message.content == "The answer is 4." and reply.choices[0].finish_reason == "stop"
    assert 0 < reply.usage.completion_tokens_details.reasoning_tokens < reply.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="deepseek-reasoner", messages=ASK, stream=True,
                                                 stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "Two plus two is four."
    assert "".join(d.content or "" for d in deltas) == "The answer is 4."
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens > 0


def test_today_s_model_names_pick_their_mode_and_others_are_refused(scripted):
    """The V4-era names think by default, the retired V3-era ones keep their modes, the own id the model's
    default; `thinking` and `reasoning_effort` as today's clients send them."""
    engine, client = scripted
    engine.output = "Sum.</think>4"
    names = {"deepseek-v4-flash": True, "deepseek-v4-pro": True, "deepseek-flash": True, "deepseek-chat": False,
             "deepseek-reasoner": True, "deepseek-v3.2-tiny": False}
    for name, thinking in names.items():
        reply = client.chat.completions.create(model=name, messages=ASK, reasoning_effort="high")
        assert engine.prompt_text().endswith("<think>" if thinking else "</think>"), name
        assert bool(reply.choices[0].message.model_extra.get("reasoning_content")) == thinking, name
    client.chat.completions.create(model="deepseek-v4-pro", messages=ASK, reasoning_effort="xhigh",
                                   extra_body={"thinking": {"type": "disabled"}})
    assert engine.prompt_text().endswith("</think>")
    assert [m.id for m in client.models.list().data] == ["deepseek-v3.2-tiny", *list(names)[:-1]]
    with pytest.raises(openai.BadRequestError, match="'deepseek-v4-flash'.*got 'deepseek-v5'"):
        client.chat.completions.create(model="deepseek-v5", messages=ASK)


def test_anthropic_clients_map_as_the_hosted_route_does(scripted):
    """claude-opus* runs as deepseek-v4-pro and every other Claude name as deepseek-v4-flash: thinking unless
    the request disables it; output_config.effort is taken."""
    import anthropic

    engine, openai_client = scripted
    url = str(openai_client.base_url).rstrip("/")
    client = anthropic.Anthropic(base_url=f"{url}/anthropic", api_key="unused", max_retries=0)
    engine.output = "Sum.</think>4"
    for name in ("claude-opus-x", "claude-sonnet-x"):
        reply = client.messages.create(model=name, max_tokens=64, messages=ASK,
                                       extra_body={"output_config": {"effort": "high"}})
        assert engine.prompt_text().endswith("<think>") and [b.type for b in reply.content] == ["thinking", "text"]
    client.messages.create(model="claude-haiku-x", max_tokens=64, messages=ASK, thinking={"type": "disabled"})
    assert engine.prompt_text().endswith("</think>")


def test_tool_calls_reach_tool_calls(scripted):
    engine, client = scripted
    engine.output = DSML_CALLS
    reply = client.chat.completions.create(model="deepseek-chat", messages=ASK, tools=[WEATHER_TOOL, TIME_TOOL])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "days": [1, 2]}
    chunks = list(client.chat.completions.create(model="deepseek-chat", messages=ASK, stream=True,
                                                 tools=[WEATHER_TOOL, TIME_TOOL]))
    pieces: dict[int, dict] = {}
    for chunk in chunks:
        for call in chunk.choices[0].delta.tool_calls or ():
            entry = pieces.setdefault(call.index, {"name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
    assert [p["name"] for p in pieces.values()] == ["get_weather", "get_time"]
    assert json.loads(pieces[0]["arguments"]) == {"city": "Paris", "days": [1, 2]}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_call_made_in_unclosed_reasoning_reaches_tool_calls(scripted):
    """The thinking model writes its DSML call and never closes </think>: the call is its call, on both shapes
    (not text inside reasoning_content only, as the peers return it)."""
    engine, client = scripted
    engine.output = "I will look it up.\n\n" + DSML_CALLS
    reply = client.chat.completions.create(model="deepseek-reasoner", messages=ASK, tools=[WEATHER_TOOL, TIME_TOOL])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather", "get_time"]
    assert choice.message.model_extra["reasoning_content"].startswith("I will look it up.")
    chunks = list(client.chat.completions.create(model="deepseek-reasoner", messages=ASK, stream=True,
                                                 tools=[WEATHER_TOOL, TIME_TOOL]))
    names = [call.function.name for chunk in chunks for call in chunk.choices[0].delta.tool_calls or ()
             if call.function.name]
    assert names == ["get_weather", "get_time"] and chunks[-1].choices[0].finish_reason == "tool_calls"


def test_multi_turn_with_reasoning_content_passed_back(scripted):
    engine, client = scripted
    engine.output = "The tool said noon.</think>It is 12:00."
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    messages = [*ASK, {"role": "assistant", "content": "", "reasoning_content": "I need the time.",
                       "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    reply = client.chat.completions.create(model="deepseek-reasoner", messages=messages, tools=[TIME_TOOL])
    assert reply.choices[0].message.content == "It is 12:00."
    assert "I need the time." in engine.prompt_text()  # kept inside the tool loop, as V3.2 requires


def test_json_mode_answer(scripted):
    engine, client = scripted
    engine.output = '{"answer": 4}'
    reply = client.chat.completions.create(model="deepseek-chat", response_format={"type": "json_object"},
                                           messages=[{"role": "user", "content": "2+2 as json"}])
    assert json.loads(reply.choices[0].message.content) == {"answer": 4}
    # the instruction whale adds as the system prompt (the chat format's system text comes right after BOS)
    assert engine.prompt_text() == ("<｜begin▁of▁sentence｜>Reply with one valid JSON object and nothing else."
                                    "<｜User｜>2+2 as json<｜Assistant｜></think>")
