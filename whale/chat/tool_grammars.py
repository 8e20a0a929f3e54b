"""The tool-call grammars of the DeepSeek formats, as incremental sections, and the parsers registered by name.

- deepseek_v3:  <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>
- deepseek_v31: <｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>
  (both inside <｜tool▁calls▁begin｜> ... <｜tool▁calls▁end｜>)
- deepseek_v32: <｜DSML｜function_calls> of <｜DSML｜invoke name="NAME"> of <｜DSML｜parameter ...>VALUE
- deepseek_v4:  the same invokes in a <｜DSML｜tool_calls> block
- r1_distill:   whale's <tool_call>{"name": ..., "arguments": {...}}</tool_call> convention, V3 calls, or a
                reply that is only such a JSON object (what distills write unprompted, vLLM issue 28219)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from whale.chat.markers import DSML, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP
from whale.chat.reasoning import partial_suffix
from whale.chat.tools import SectionStep, ToolCallDelta, ToolCallParser, ToolDelta, is_json_object, new_call_id

_MAX_HEADER = 512  # a header longer than this is not a call header


def _lead(text: str) -> int:
    return len(text) - len(text.lstrip())


@dataclass(frozen=True)
class TokenGrammar:
    """Where a call's header ends, how to read the name from it, and where its arguments end."""

    header_end: str
    header: re.Pattern[str]
    args_end: str


V3_GRAMMAR = TokenGrammar("\n```json\n", re.compile(rf"^\s*\w*{re.escape(TOOL_SEP)}\s*([^\s<>]+)\s*$"),
                          "\n```" + TOOL_CALL_END)
V31_GRAMMAR = TokenGrammar(TOOL_SEP, re.compile(r"^\s*([^\s<>]+)\s*$"), TOOL_CALL_END)


class TokenCallsSection:
    """Calls written with DeepSeek's tool tokens, after <｜tool▁calls▁begin｜>, until <｜tool▁calls▁end｜>."""

    def __init__(self, grammar: TokenGrammar) -> None:
        self._grammar = grammar
        self._state = "between"
        self._calls = 0

    def advance(self, text: str, final: bool) -> SectionStep:
        if self._state == "between":
            return self._between(text, final)
        if self._state == "header":
            return self._header(text, final)
        return self._args(text, final)

    def _between(self, text: str, final: bool) -> SectionStep:
        skip = _lead(text)
        rest = text[skip:]
        if rest.startswith(TOOL_CALL_BEGIN):
            self._state = "header"
            return SectionStep(skip + len(TOOL_CALL_BEGIN), [], "more")
        if rest.startswith(TOOL_CALLS_END):
            return SectionStep(skip + len(TOOL_CALLS_END), [], "done" if self._calls else "failed")
        if not final and (TOOL_CALL_BEGIN.startswith(rest) or TOOL_CALLS_END.startswith(rest)):
            return SectionStep(0, [], "open")
        return SectionStep(0, [], "done" if self._calls else "failed")

    def _header(self, text: str, final: bool) -> SectionStep:
        end = text.find(self._grammar.header_end)
        if end < 0:
            waiting = not final and len(text) < _MAX_HEADER
            return SectionStep(0, [], "open" if waiting else "failed")
        match = self._grammar.header.match(text[:end])
        if not match:
            return SectionStep(0, [], "failed")
        self._state = "args"
        return SectionStep(end + len(self._grammar.header_end), [("start", match.group(1))], "more")

    def _args(self, text: str, final: bool) -> SectionStep:
        end = text.find(self._grammar.args_end)
        if end >= 0:
            self._state, self._calls = "between", self._calls + 1
            events = [("args", text[:end])] if end else []
            return SectionStep(end + len(self._grammar.args_end), events + [("end", "")], "more")
        if final:
            return SectionStep(0, [], "failed")
        size = len(text) - partial_suffix(text, self._grammar.args_end)
        return SectionStep(size, [("args", text[:size])] if size else [], "open")


_INVOKE = re.compile(rf'^<{re.escape(DSML)}invoke\s+name="([^"]+)"\s*>\n?')
_PARAM = re.compile(rf'^<{re.escape(DSML)}parameter\s+name="([^"]+)"\s+string="(true|false)"\s*>')
_INVOKE_END = f"</{DSML}invoke>"
_PARAM_END = f"</{DSML}parameter>"


class DsmlSection:
    """DSML calls (V3.2, V4: `block` names the wrapper); arguments are rebuilt as JSON while parameters stream in."""

    def __init__(self, block: str) -> None:
        self._calls_end = f"</{DSML}{block}>"
        self._state = "between"
        self._calls = 0
        self._params = 0
        self._string = False

    def advance(self, text: str, final: bool) -> SectionStep:
        if self._state == "value":
            return self._value(text, final)
        skip = _lead(text)
        rest = text[skip:]
        ends = (self._calls_end,) if self._state == "between" else (_INVOKE_END,)
        if self._state == "between" and rest.startswith(ends[0]):
            return SectionStep(skip + len(ends[0]), [], "done" if self._calls else "failed")
        if self._state == "params" and rest.startswith(_INVOKE_END):
            self._state, self._calls = "between", self._calls + 1
            close = "}" if self._params else "{}"
            return SectionStep(skip + len(_INVOKE_END), [("args", close), ("end", "")], "more")
        pattern = _INVOKE if self._state == "between" else _PARAM
        match = pattern.match(rest)
        if match:
            return self._opened(match, skip)
        opener = f"<{DSML}invoke" if self._state == "between" else f"<{DSML}parameter"
        may_grow = any(m.startswith(rest) or rest.startswith(m) for m in (opener, *ends))
        if not final and may_grow and len(rest) < _MAX_HEADER and ">" not in rest:
            return SectionStep(0, [], "open")
        return SectionStep(0, [], "done" if self._calls and self._state == "between" else "failed")

    def _opened(self, match: re.Match[str], skip: int) -> SectionStep:
        consumed = skip + match.end()
        if self._state == "between":
            self._state, self._params = "params", 0
            return SectionStep(consumed, [("start", match.group(1))], "more")
        key, self._string = match.group(1), match.group(2) == "true"
        lead = ("{" if not self._params else ", ") + json.dumps(key, ensure_ascii=False) + ": "
        self._state, self._params = "value", self._params + 1
        return SectionStep(consumed, [("args", lead + ('"' if self._string else ""))], "more")

    def _escape(self, value: str) -> str:
        return json.dumps(value, ensure_ascii=False)[1:-1] if self._string else value

    def _value(self, text: str, final: bool) -> SectionStep:
        end = text.find(_PARAM_END)
        if end >= 0:
            self._state = "params"
            piece = self._escape(text[:end]) + ('"' if self._string else "")
            return SectionStep(end + len(_PARAM_END), [("args", piece)], "more")
        if final:
            return SectionStep(0, [], "failed")
        size = len(text) - partial_suffix(text, _PARAM_END)
        return SectionStep(size, [("args", self._escape(text[:size]))] if size else [], "open")


def read_json_call(text: str) -> tuple[str, str] | None:
    """(name, arguments JSON) from {"name": ..., "arguments" | "parameters": {...}}, or None."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str) and is_json_object(arguments):
        return value["name"], arguments
    if isinstance(arguments, dict):
        return value["name"], json.dumps(arguments, ensure_ascii=False)
    return None


class JsonCallSection:
    """`<tool_call>{json}</tool_call>` blocks; each is sent whole when it closes (its name is inside the JSON)."""

    def __init__(self) -> None:
        self._inside = True
        self._calls = 0

    def advance(self, text: str, final: bool) -> SectionStep:
        if not self._inside:
            rest = text[_lead(text):]
            if rest.startswith("<tool_call>"):
                self._inside = True
                return SectionStep(len(text) - len(rest) + len("<tool_call>"), [], "more")
            waiting = not final and "<tool_call>".startswith(rest)
            return SectionStep(0, [], "open" if waiting else "done")
        end = text.find("</tool_call>")
        if end < 0:
            return SectionStep(0, [], "failed" if final else "open")
        call = read_json_call(text[:end].strip())
        if call is None:
            return SectionStep(0, [], "done" if self._calls else "failed")
        self._inside, self._calls = False, self._calls + 1
        events = [("start", call[0]), ("args", call[1]), ("end", "")]
        return SectionStep(end + len("</tool_call>"), events, "more")


class DeepSeekV3ToolParser(ToolCallParser):
    name = "deepseek_v3"
    markers = (TOOL_CALLS_BEGIN,)

    def open_section(self, marker: str) -> TokenCallsSection:
        return TokenCallsSection(V3_GRAMMAR)


class DeepSeekV31ToolParser(ToolCallParser):
    name = "deepseek_v31"
    markers = (TOOL_CALLS_BEGIN,)

    def open_section(self, marker: str) -> TokenCallsSection:
        return TokenCallsSection(V31_GRAMMAR)


class DeepSeekV32ToolParser(ToolCallParser):
    name = "deepseek_v32"
    markers = (f"\n\n<{DSML}function_calls>", f"<{DSML}function_calls>")

    def open_section(self, marker: str) -> DsmlSection:
        return DsmlSection("function_calls")


class DeepSeekV4ToolParser(ToolCallParser):
    name = "deepseek_v4"
    markers = (f"\n\n<{DSML}tool_calls>", f"<{DSML}tool_calls>")

    def open_section(self, marker: str) -> DsmlSection:
        return DsmlSection("tool_calls")


class R1DistillToolParser(ToolCallParser):
    """whale's distill convention plus V3 calls plus a reply that is nothing but one JSON call object."""

    name = "r1_distill"
    markers = ("<tool_call>", TOOL_CALLS_BEGIN)

    def __init__(self, id_factory: Callable[[], str] = new_call_id) -> None:
        super().__init__(id_factory)
        self._held: str | None = ""  # content held while it may be a bare JSON call; None once it cannot be
        self._called = False

    def open_section(self, marker: str) -> TokenCallsSection | JsonCallSection:
        return JsonCallSection() if marker == "<tool_call>" else TokenCallsSection(V3_GRAMMAR)

    @staticmethod
    def _unfenced(text: str) -> str:
        body = text.strip()
        if body.startswith("```"):
            body = body.removeprefix("```json").removeprefix("```").removesuffix("```").strip()
        return body

    @staticmethod
    def _may_be_bare(text: str) -> bool:
        """Whether content so far could still turn out to be one bare JSON call (then it is held back)."""
        body, fence = text.lstrip(), "```json"
        if not body or body.startswith("{"):
            return True
        if len(body) <= len(fence):
            return fence.startswith(body)
        return body.startswith(fence) and body[len(fence):].lstrip()[:1] in ("", "{")

    def _hold(self, delta: ToolDelta, final: bool) -> ToolDelta:
        self._called = self._called or bool(delta.tool_calls)
        if self._held is None:
            return delta
        self._held += delta.content
        if self._called or not self._may_be_bare(self._held):
            delta.content, self._held = self._held, None
            return delta
        delta.content = ""
        if final:
            call = read_json_call(self._unfenced(self._held))
            if call is None:
                delta.content = self._held
            else:
                self._ids.append(self._new_id())
                delta.tool_calls.append(ToolCallDelta(len(self._ids) - 1, self._ids[-1], *call))
            self._held = None
        return delta

    def feed(self, text: str) -> ToolDelta:
        return self._hold(super().feed(text), final=False)

    def finish(self, text: str = "") -> ToolDelta:
        return self._hold(super().finish(text), final=True)


TOOL_PARSERS: dict[str, type[ToolCallParser]] = {
    parser.name: parser
    for parser in (DeepSeekV3ToolParser, DeepSeekV31ToolParser, DeepSeekV32ToolParser, DeepSeekV4ToolParser,
                   R1DistillToolParser)
}


def make_tool_parser(name: str, id_factory: Callable[[], str] = new_call_id) -> ToolCallParser:
    """A fresh parser registered under `name` (one per request)."""
    try:
        return TOOL_PARSERS[name](id_factory)
    except KeyError:
        raise ValueError(f"unknown tool parser {name!r}; known: {', '.join(TOOL_PARSERS)}") from None
