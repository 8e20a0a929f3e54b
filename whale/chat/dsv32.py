"""DeepSeek-V3.2's prompt encoding (it ships a Python encoder, `encoding_dsv32.py`, instead of a Jinja template).

whale's own implementation of the rules in that file (docs/sources.md §2): DSML tool calls, tool results grouped in
<function_results>, and reasoning kept for the assistant turns after the last user message.
"""

from __future__ import annotations

import json
from typing import Any

from whale.chat.markers import ASSISTANT, BOS, DSML, EOS, THINK_END, THINK_START, USER
from whale.chat.tool_prompts import dumps, function_of
from whale.errors import InvalidRequestError

# The encoder's TOOLS_SYSTEM_TEMPLATE, word for word: the model was trained on this text.
_TOOLS_TEMPLATE = """## Tools
You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{dsml}function_calls>" block like the following as part of your reply to the user:
<{dsml}function_calls>
<{dsml}invoke name="$FUNCTION_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$FUNCTION_NAME2">
...
</{dsml}invoke>
</{dsml}function_calls>
String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for other types (numbers, booleans, arrays, objects).
If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:
<{dsml}function_calls>
...
</{dsml}function_calls>
<function_results>
...
</function_results>
{think_start}...thinking about results{think_end}
Here are the functions available in JSONSchema format:
<functions>
{schemas}
</functions>
"""  # noqa: E501

_RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"
REASONING_MISSING = 'The "reasoning_content" in the thinking mode must be passed back to the API.'


def tools_block(tools: list[dict[str, Any]]) -> str:
    schemas = "\n".join(dumps(function_of(tool)) for tool in tools)
    return _TOOLS_TEMPLATE.format(dsml=DSML, think_start=THINK_START, think_end=THINK_END, schemas=schemas)


def dsml_invoke(name: str, arguments: str) -> str:
    """One call in DSML: string values raw, everything else as JSON, attribute string="true|false"."""
    try:
        values = json.loads(arguments or "{}")
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"tool call {name!r}: arguments must be a JSON object string ({exc})") from exc
    if not isinstance(values, dict):
        raise InvalidRequestError(f"tool call {name!r}: arguments must be a JSON object")
    params = [
        f'<{DSML}parameter name="{key}" string="{"true" if isinstance(value, str) else "false"}">'
        f"{value if isinstance(value, str) else dumps(value)}</{DSML}parameter>"
        for key, value in values.items()
    ]
    return f'<{DSML}invoke name="{name}">\n' + "\n".join(params) + f"\n</{DSML}invoke>"


def dsml_calls(tool_calls: list[dict[str, Any]], block: str = "function_calls") -> str:
    """An assistant turn's calls in DSML, in the `block` wrapper (V3.2: function_calls, V4: tool_calls)."""
    invokes = "\n".join(dsml_invoke(c["function"]["name"], c["function"].get("arguments", "")) for c in tool_calls)
    return f"\n\n<{DSML}{block}>\n{invokes}\n</{DSML}{block}>"


def _extras(message: dict[str, Any]) -> str:
    text = ""
    if message.get("tools"):
        text += "\n\n" + tools_block(message["tools"])
    if message.get("response_format"):
        text += "\n\n" + _RESPONSE_FORMAT.format(schema=dumps(message["response_format"]))
    return text


def _user_turn(body: str, is_last_user: bool, thinking: bool) -> str:
    return USER + body + ASSISTANT + (THINK_START if is_last_user and thinking else THINK_END)


def _tool_result(messages: list[dict[str, Any]], index: int, last_user: int, thinking: bool) -> str:
    owner = index - 1
    while owner >= 0 and messages[owner].get("role") == "tool":
        owner -= 1
    calls = messages[owner].get("tool_calls") if owner >= 0 and messages[owner].get("role") == "assistant" else None
    order = index - owner
    if not calls or order > len(calls):
        raise InvalidRequestError(f"message {index}: a tool result must answer a tool call of the assistant "
                                  "message before it (one result per call, in order)")
    text = ("\n\n<function_results>" if order == 1 else "") + f"\n<result>{message_text(messages[index])}</result>"
    if order == len(calls):
        text += "\n</function_results>\n\n" + (THINK_START if index >= last_user and thinking else THINK_END)
    return text


def message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def _assistant(message: dict[str, Any], index: int, last_user: int, thinking: bool, continuing: bool) -> str:
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    calls = message.get("tool_calls")
    content = message_text(message)
    keeps_reasoning = thinking and index > last_user
    if continuing:
        if keeps_reasoning and reasoning is not None:
            return reasoning + (THINK_END + content if content else "")
        return content
    if keeps_reasoning and not (reasoning or calls):
        raise InvalidRequestError(f"message {index}: {REASONING_MISSING}")
    head = (reasoning or "") + THINK_END if keeps_reasoning else ""
    return head + content + (dsml_calls(calls) if calls else "") + EOS


def encode_messages(messages: list[dict[str, Any]], *, thinking: bool, prefix: bool = False, bos: str = BOS) -> str:
    """Encode messages (tools / response_format attached to system or developer messages) as V3.2 does."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") in ("user", "developer")), default=-1)
    out = [bos]
    for index, message in enumerate(messages):
        role = message.get("role")
        if role == "system":
            out.append(message_text(message) + _extras(message))
        elif role == "user":
            out.append(_user_turn(message_text(message), index == last_user, thinking))
        elif role == "developer":
            body = _extras(message) + "\n\n# The user's message is: " + message_text(message)
            out.append(_user_turn(body, index == last_user, thinking))
        elif role == "tool":
            out.append(_tool_result(messages, index, last_user, thinking))
        elif role == "assistant":
            continuing = prefix and index == len(messages) - 1
            out.append(_assistant(message, index, last_user, thinking, continuing))
        else:
            raise InvalidRequestError(f"message {index}: unknown role {role!r} for DeepSeek-V3.2")
    return "".join(out)


def with_request_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The encoders read tools from a system message: request-level `tools` go into the first one (a new empty one
    at the start if none)."""
    if not tools:
        return messages
    messages = list(messages)
    first = next((i for i, m in enumerate(messages) if m.get("role") == "system"), None)
    if first is None:
        messages.insert(0, {"role": "system", "content": "", "tools": tools})
    else:
        messages[first] = dict(messages[first], tools=tools)
    return messages


def encode_conversation(messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None, thinking: bool,
                        prefix: bool = False, bos: str = BOS) -> str:
    return encode_messages(with_request_tools(messages, tools), thinking=thinking, prefix=prefix, bos=bos)
