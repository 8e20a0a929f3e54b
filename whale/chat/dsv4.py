"""DeepSeek-V4's prompt encoding (V4-Flash / V4-Pro ship a Python encoder, `encoding_dsv4.py`, not a Jinja template).

whale's own implementation of the rules of that encoder (docs/sources.md §2; byte-for-byte against it in
tests/chat/test_chat_dsv4.py): DSML tool calls in a `<｜DSML｜tool_calls>` block, tool results as
`<tool_result>` blocks of a user turn, the reasoning-effort preamble, and past reasoning dropped unless the
conversation offers tools. What whale adds: `prefix` continues the reasoning when only `reasoning_content` is
given (docs/chat-formats.md).
"""

from __future__ import annotations

from typing import Any

from whale.chat.dsv32 import dsml_calls, with_request_tools
from whale.chat.markers import ASSISTANT, BOS, DSML, EOS, THINK_END, THINK_START, USER
from whale.chat.tool_prompts import dumps, function_of
from whale.errors import InvalidRequestError

# The encoder's texts, word for word: the model was trained on them.
EFFORT_PROMPTS: dict[str, str] = {
    "low": "",
    "high": (
        "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
        "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
        "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
        "scenarios.\n"
        "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
        "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"),
    "max": (
        "Reasoning Effort: Beyond maximum — exhaustive, relentless, and uncompromising.\n"
        "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: exhaustively "
        "decompose the problem into its most fundamental components, trace every causal chain to its root, and "
        "resolve the underlying cause rather than any surface symptom.\n"
        "Do not stop reasoning until you have independently verified the solution from multiple angles and are "
        "certain that no assumption remains unchecked and no error remains undiscovered.\n\n"),
}

_TOOLS_TEMPLATE = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{dsml}tool_calls>" block like the following:

<{dsml}tool_calls>
<{dsml}invoke name="$TOOL_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$TOOL_NAME2">
...
</{dsml}invoke>
</{dsml}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {think_start}), you MUST output your complete reasoning inside {think_start}...{think_end} BEFORE any tool calls or final response.

Otherwise, output directly after {think_end} with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""  # noqa: E501

_RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"


def tools_block(tools: list[dict[str, Any]]) -> str:
    schemas = "\n".join(dumps(function_of(tool)) for tool in tools)
    return _TOOLS_TEMPLATE.format(dsml=DSML, think_start=THINK_START, think_end=THINK_END, schemas=schemas)


def _text(content: Any) -> str:
    """Content as text; content parts are joined by a blank line, as the encoder does."""
    if isinstance(content, list):
        return "\n\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def _merge_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """V4 has no tool role: results become `<tool_result>` blocks of a user turn, and a user message right after
    them joins that turn. Results are put in the order of the calls they answer (by tool_call_id)."""
    merged: list[dict[str, Any]] = []
    order: dict[str, int] = {}
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            order = {c.get("id"): i for i, c in enumerate(message["tool_calls"]) if c.get("id")}
        if role == "tool":
            block = ("tool", message.get("tool_call_id") or "", _text(message.get("content")))
        elif role == "user":
            block = ("text", "", _text(message.get("content")))
        else:
            merged.append(message)
            continue
        last = merged[-1] if merged else None
        if last is not None and last.get("role") == "user" and "_blocks" in last:
            last["_blocks"].append(block)
        else:
            merged.append({"role": "user", "_blocks": [block], "_order": order})
    for message in merged:
        blocks = message.get("_blocks")
        if blocks and message["_order"]:
            results = iter(sorted((b for b in blocks if b[0] == "tool"), key=lambda b: message["_order"].get(b[1], 0)))
            message["_blocks"] = [next(results) if b[0] == "tool" else b for b in blocks]
    return merged


def _user_text(message: dict[str, Any]) -> str:
    return "\n\n".join(f"<tool_result>{text}</tool_result>" if kind == "tool" else text
                       for kind, _, text in message["_blocks"])


def _extras(message: dict[str, Any]) -> str:
    text = ""
    if message.get("tools"):
        text += "\n\n" + tools_block(message["tools"])
    if message.get("response_format"):
        text += "\n\n" + _RESPONSE_FORMAT.format(schema=dumps(message["response_format"]))
    return text


def _assistant(message: dict[str, Any], keeps_reasoning: bool, continuing: bool) -> str:
    reasoning = message.get("reasoning_content", message.get("reasoning"))
    content = _text(message.get("content"))
    if continuing and keeps_reasoning and reasoning is not None and not content:
        return reasoning  # whale: continue the reasoning itself
    head = (reasoning or "") + THINK_END if keeps_reasoning else ""
    calls = message.get("tool_calls")
    return head + content + (dsml_calls(calls, "tool_calls") if calls else "") + ("" if continuing else EOS)


def encode_messages(messages: list[dict[str, Any]], *, thinking: bool, effort: str | None = None,
                    prefix: bool = False, bos: str = BOS) -> str:
    """Encode messages (tools / response_format attached to system or developer messages) as V4 does.

    `effort` is the encoder's: "low" (the default, no preamble), "high" or "max", used in thinking mode only.
    """
    effort = effort or "low"
    if effort not in EFFORT_PROMPTS:
        raise InvalidRequestError(f"reasoning effort {effort!r}: DeepSeek-V4 knows {', '.join(EFFORT_PROMPTS)}")
    keep_all = any(m.get("tools") for m in messages)  # with tools, reasoning stays in every turn
    messages = _merge_tool_results(messages)
    last_user = max((i for i, m in enumerate(messages) if m.get("role") in ("user", "developer")), default=-1)
    if thinking and not keep_all:  # before the last user turn: reasoning dropped, developer messages too
        messages = [m for i, m in enumerate(messages) if i >= last_user or m.get("role") != "developer"]
        last_user = max((i for i, m in enumerate(messages) if m.get("role") in ("user", "developer")), default=-1)
    out = [bos, EFFORT_PROMPTS[effort] if thinking else ""]
    for index, message in enumerate(messages):
        role = message.get("role")
        if role == "system":
            out.append(_text(message.get("content")) + _extras(message))
        elif role == "developer":
            out.append(USER + _text(message.get("content")) + _extras(message))
        elif role == "user":
            out.append(USER + _user_text(message))
        elif role == "assistant":
            continuing = prefix and index == len(messages) - 1
            keeps = thinking and (keep_all or index > last_user)
            out.append(_assistant(message, keeps, continuing))
        else:
            raise InvalidRequestError(f"message {index}: unknown role {role!r} for DeepSeek-V4")
        following = messages[index + 1].get("role") if index + 1 < len(messages) else None
        opens_turn = role in ("user", "developer") or (role == "system" and following in (None, "assistant"))
        if following in (None, "assistant") and opens_turn:
            opens_thinking = thinking and (keep_all or index >= last_user)
            out.append(ASSISTANT + (THINK_START if opens_thinking else THINK_END))
    return "".join(out)


def encode_conversation(messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None, thinking: bool,
                        effort: str | None = None, prefix: bool = False, bos: str = BOS) -> str:
    return encode_messages(with_request_tools(messages, tools), thinking=thinking, effort=effort, prefix=prefix,
                           bos=bos)
