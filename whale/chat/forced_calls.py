"""Grammars (llguidance's Lark) that hold a reply to tool calls in the model's own call format: `tool_choice:
"required"` (any of the tools) or a named function, with the arguments held to each tool's JSON schema.

`marker(text)` writes a format marker as the grammar must match it: a special token by id (`<[128806]>`), other
text as a string literal (engine/grammar.py knows which is which for the tokenizer)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from whale.chat.capabilities import CAPABILITIES
from whale.chat.markers import DSML, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP
from whale.chat.tool_prompts import function_of
from whale.chat.variants import ChatVariant, variant_name
from whale.errors import CapabilityError

Marker = Callable[[str], str]
# JSON as the answer grammar writes it (engine/grammar.py): one line, at most one space between tokens
_JSON_STYLE = {"whitespace_flexible": True, "whitespace_pattern": "[ ]?"}


def _text(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _schema(parameters: Any) -> str:
    schema = dict(parameters) if isinstance(parameters, dict) and parameters else {"type": "object"}
    return "%json " + json.dumps({**schema, "x-guidance": _JSON_STYLE}, ensure_ascii=False)


def _v3_call(name: str, parameters: Any, m: Marker) -> str:
    return (f"{m(TOOL_CALL_BEGIN)} {_text('function')} {m(TOOL_SEP)} {_text(name + chr(10) + '```json' + chr(10))} "
            f"{_schema(parameters)} {_text(chr(10) + '```')} {m(TOOL_CALL_END)}")


def _v31_call(name: str, parameters: Any, m: Marker) -> str:
    return f"{m(TOOL_CALL_BEGIN)} {_text(name)} {m(TOOL_SEP)} {_schema(parameters)} {m(TOOL_CALL_END)}"


def _distill_call(name: str, parameters: Any, m: Marker) -> str:
    body = {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
            "properties": {"name": {"const": name},
                           "arguments": parameters if isinstance(parameters, dict) and parameters
                           else {"type": "object"}}}
    return f"{m('<tool_call>')} {_text(chr(10))} {_schema(body)} {_text(chr(10))} {m('</tool_call>')}"


def _dsml_call(name: str, parameters: Any, m: Marker) -> str:
    """One DSML invoke: parameters in the schema's order, required ones always, string values raw, others JSON."""
    properties = (parameters or {}).get("properties") or {}
    required = set((parameters or {}).get("required") or ())
    parts = []
    for key, schema in properties.items():
        is_string = isinstance(schema, dict) and schema.get("type") == "string"
        opening = '<{}parameter name="{}" string="{}">'.format(DSML, key, "true" if is_string else "false")
        limit = schema.get("maxLength") if is_string else None
        bound = f"{{0,{limit}}}" if isinstance(limit, int) else "*"
        value = f"/[^<]{bound}/" if is_string else _schema(schema)
        param = f"{_text(opening)} {value} {_text('</' + DSML + 'parameter>' + chr(10))}"
        parts.append(param if key in required else f"({param})?")
    head = f'<{DSML}invoke name="{name}">\n'
    return f"{_text(head)} {' '.join(parts)} {_text('</' + DSML + 'invoke>')}"


def forced_call_grammar(variant: ChatVariant | str, tools: list[dict[str, Any]], name: str | None,
                        marker: Marker) -> str:
    """A Lark grammar for one or more calls of `name` (None: any of `tools`) in the variant's call format."""
    functions = [function_of(tool) for tool in tools]
    if name is not None:
        functions = [f for f in functions if f.get("name") == name]
    format_name = variant_name(variant)
    parser = CAPABILITIES[format_name].tool_parser
    build = {"deepseek_v3": _v3_call, "deepseek_v31": _v31_call, "r1_distill": _distill_call,
             "deepseek_v32": _dsml_call, "deepseek_v4": _dsml_call}.get(parser or "")
    if build is None or not functions:
        raise CapabilityError(f"model chat format {format_name!r} has no tool-call format to force a call in")
    rules = [f"call_{i}: {build(f['name'], f.get('parameters'), marker)}" for i, f in enumerate(functions)]
    call = "call: " + " | ".join(f"call_{i}" for i in range(len(functions)))
    if parser in ("deepseek_v3", "deepseek_v31"):
        separator = _text(chr(10)) if parser == "deepseek_v3" else ""
        start = f"start: {marker(TOOL_CALLS_BEGIN)} call ({separator} call)* {marker(TOOL_CALLS_END)}"
    elif parser == "r1_distill":
        start = f"start: call ({_text(chr(10))} call)*"
    else:
        block = "function_calls" if parser == "deepseek_v32" else "tool_calls"
        start = (f"start: {_text(chr(10) + chr(10) + f'<{DSML}{block}>' + chr(10))} call "
                 f"({_text(chr(10))} call)* {_text(chr(10) + f'</{DSML}{block}>')}")
    return "\n".join([start, call, *rules]) + "\n"
