"""Grammars (llguidance's Lark) that hold tool calls to the model's own call format, with each call's arguments held
to its tool's JSON schema:
- `forced_call_grammar`: the reply is calls and nothing else (`tool_choice: "required"`, or a named function);
- `strict_tools_grammar`: the model answers freely or calls tools (`tool_choice: "auto"` with `strict: true`
  tools): any call it starts is to a declared tool, and a strict tool's arguments follow its schema.

`marker(text)` writes a format marker as the grammar must match it: a special token by id (`<[128806]>`), other
text as a string literal (engine/grammar.py knows which is which for the tokenizer)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from whale.chat.capabilities import CAPABILITIES
from whale.chat.markers import DSML, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP
from whale.chat.tool_prompts import function_of
from whale.chat.variants import ChatVariant, variant_name
from whale.errors import CapabilityError

Marker = Callable[[str], str]
# JSON as the answer grammar writes it (engine/grammar.py): one line, at most one space between tokens
_JSON_STYLE = {"whitespace_flexible": True, "whitespace_pattern": "[ ]?"}
_ANY_OBJECT = {"type": "object"}


def _text(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _schema(parameters: Any, default: dict[str, Any] = _ANY_OBJECT) -> str:
    schema = dict(parameters) if isinstance(parameters, dict) and parameters else default
    return "%json " + json.dumps({**schema, "x-guidance": _JSON_STYLE}, ensure_ascii=False)


def _v3_call(name: str, parameters: Any, m: Marker) -> str:
    return (f"{m(TOOL_CALL_BEGIN)} {_text('function')} {m(TOOL_SEP)} {_text(name + chr(10) + '```json' + chr(10))} "
            f"{_schema(parameters)} {_text(chr(10) + '```')} {m(TOOL_CALL_END)}")


def _v31_call(name: str, parameters: Any, m: Marker) -> str:
    return f"{m(TOOL_CALL_BEGIN)} {_text(name)} {m(TOOL_SEP)} {_schema(parameters)} {m(TOOL_CALL_END)}"


def _distill_call(name: str, parameters: Any, m: Marker) -> str:
    """The call after its `<tool_call>` (which the section's opening or separator writes); the newlines around the
    JSON are optional, as distills write them either way."""
    body = {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
            "properties": {"name": {"const": name},
                           "arguments": parameters if isinstance(parameters, dict) and parameters else _ANY_OBJECT}}
    return f"({_text(chr(10))})? {_schema(body)} ({_text(chr(10))})? {m('</tool_call>')}"


def _dsml_call(name: str, parameters: Any, m: Marker) -> str:
    """One DSML invoke: parameters in the schema's order, required ones always, string values raw, others JSON; a
    schema that declares no properties and does not forbid others (`{"type": "object"}`, or none) takes any."""
    parameters = parameters if isinstance(parameters, dict) else _ANY_OBJECT
    properties = parameters.get("properties") or {}
    required = set(parameters.get("required") or ())
    close = _text("</" + DSML + "parameter>" + chr(10))
    parts = []
    for key, schema in properties.items():
        is_string = isinstance(schema, dict) and schema.get("type") == "string"
        opening = '<{}parameter name="{}" string="{}">'.format(DSML, key, "true" if is_string else "false")
        limit = schema.get("maxLength") if is_string else None
        bound = f"{{0,{limit}}}" if isinstance(limit, int) else "*"
        value = f"/[^<]{bound}/" if is_string else _schema(schema)
        param = f"{_text(opening)} {value} {close}"
        parts.append(param if key in required else f"({param})?")
    if not properties and parameters.get("additionalProperties") is not False:
        any_name = _text(f'<{DSML}parameter name="')
        raw, as_json = _text('" string="true">'), _text('" string="false">')
        parts.append(f"({any_name} /[^\"<]+/ ({raw} /[^<]*/ | {as_json} {_schema(None, {})}) {close})*")
    head = f'<{DSML}invoke name="{name}">\n'
    return f"{_text(head)} {' '.join(parts)} {_text('</' + DSML + 'invoke>')}"


@dataclass(frozen=True)
class _Section:
    """A format's tool-call section: `lead` + `opening` + `after_opening`, the calls joined by `separator`, then
    `closing`. `opening` is what the format's parser looks for (a special token, or text); `lead` is what the
    template writes before it, which a forced reply writes too."""

    call: Callable[[str, Any, Marker], str]
    opening: str
    lead: str = ""
    after_opening: str = ""
    separator: str = ""
    closing: str = ""


def _section(parser: str) -> _Section | None:
    if parser == "deepseek_v3":
        return _Section(_v3_call, TOOL_CALLS_BEGIN, separator="\n", closing=TOOL_CALLS_END)
    if parser == "deepseek_v31":
        return _Section(_v31_call, TOOL_CALLS_BEGIN, closing=TOOL_CALLS_END)
    if parser == "r1_distill":
        return _Section(_distill_call, "<tool_call>", separator="\n<tool_call>")
    if parser in ("deepseek_v32", "deepseek_v4"):
        block = "function_calls" if parser == "deepseek_v32" else "tool_calls"
        return _Section(_dsml_call, f"<{DSML}{block}>", lead="\n\n", after_opening="\n", separator="\n",
                        closing=f"\n</{DSML}{block}>")
    return None


def _piece(text: str, marker: Marker) -> str:
    """Text that may hold format markers, as grammar items: each marker through `marker` (a special token by id)."""
    names = (TOOL_CALLS_BEGIN, TOOL_CALLS_END, "<tool_call>", "</tool_call>")
    parts = [p for p in re.split("(" + "|".join(map(re.escape, names)) + ")", text) if p]
    return " ".join(marker(p) if p in names else _text(p) for p in parts)


def _rules(variant: ChatVariant | str, functions: list[dict[str, Any]], marker: Marker,
           strict_only: bool) -> tuple[_Section, list[str]]:
    """The section of the variant's format and the rules `calls` (the calls, joined) and its call rules; with
    `strict_only`, only tools marked `strict` keep their schema (the others take any JSON object)."""
    format_name = variant_name(variant)
    section = _section(CAPABILITIES[format_name].tool_parser or "")
    if section is None or not functions:
        raise CapabilityError(f"model chat format {format_name!r} has no tool-call format to hold calls to")
    rules = []
    for i, f in enumerate(functions):
        parameters = f.get("parameters") if f.get("strict") or not strict_only else None
        rules.append(f"call_{i}: {section.call(f['name'], parameters, marker)}")
    call = " | ".join(f"call_{i}" for i in range(len(functions)))
    separator = _piece(section.separator, marker) if section.separator else ""
    return section, [f"call: {call}", f"calls: call ({separator} call)*", *rules]


def forced_call_grammar(variant: ChatVariant | str, tools: list[dict[str, Any]], name: str | None,
                        marker: Marker) -> str:
    """A Lark grammar for one or more calls of `name` (None: any of `tools`) in the variant's call format, and
    nothing else."""
    functions = [function_of(tool) for tool in tools]
    if name is not None:
        functions = [f for f in functions if f.get("name") == name]
    section, rules = _rules(variant, functions, marker, strict_only=False)
    whole = section.lead + section.opening + section.after_opening
    closing = _piece(section.closing, marker) if section.closing else ""
    return "\n".join([f"start: {_piece(whole, marker)} calls {closing}", *rules]) + "\n"


def has_strict_tools(tools: list[dict[str, Any]]) -> bool:
    return any(function_of(tool).get("strict") for tool in tools)


def strict_tools_grammar(variant: ChatVariant | str, tools: list[dict[str, Any]], marker: Marker,
                         answer_schema: dict[str, Any] | None = None) -> str:
    """A Lark grammar for a reply that answers (free text, or JSON following `answer_schema`) or calls tools in the
    variant's format: any call is to one of `tools`, a `strict` tool's arguments follow its schema, the others'
    are a JSON object."""
    functions = [function_of(tool) for tool in tools]
    section, rules = _rules(variant, functions, marker, strict_only=True)
    opening = marker(section.opening)
    after = f" {_text(section.after_opening)}" if section.after_opening else ""
    closing = f" {_piece(section.closing, marker)}" if section.closing else ""
    answer = _schema(answer_schema) if answer_schema is not None else "ANSWER_TEXT"
    if opening.startswith("<["):  # a special token: text never holds one, and ends where it comes
        lines = [f"start: {answer} | ANSWER_TEXT? {opening}{after} calls{closing}", "ANSWER_TEXT: /(?s:.+)/"]
    else:  # text: the answer is text without it; a call section is any text up to it (lazily), then calls
        escaped = re.escape(section.opening)
        lines = [f"start: {answer} | lead{after} calls{closing}", f"lead[lazy]: /(?s:.*){escaped}/"]
        if answer_schema is None:
            lines.append(f"ANSWER_TEXT: /(?s:.+)/ & ~/(?s:.*{escaped}.*)/")
    return "\n".join([*lines, *rules]) + "\n"
