"""Tool-call parsing: model output -> OpenAI `tool_calls`, streaming-safe, one small interface by name.

A parser scans content for the start marker of its format, hands the text after it to a *section* (the
format's grammar, in tool_grammars.py) and turns the section's events (call start, argument text, call end)
into OpenAI deltas. Text it cannot read as a call comes back as content; nothing raises.

Fail closed: a call is sent whole, once its end marker has been read and its arguments parse as a JSON object;
anything else (no end marker before the output ends, arguments that are not a JSON object, a section without a
call) comes back as content, streamed or not. So a client never holds a partial or malformed call, and a stream
joins to exactly the non-streaming message (at the price of arguments not arriving piece by piece).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from whale.chat.reasoning import partial_suffix

logger = logging.getLogger(__name__)


@dataclass
class ToolCallDelta:
    """One streaming piece of one call, as in OpenAI's `choices[0].delta.tool_calls[i]`."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.name is not None:
            function["name"] = self.name
        delta: dict[str, Any] = {"index": self.index, "function": function}
        if self.id is not None:
            delta.update(id=self.id, type="function")
        return delta


@dataclass
class ToolDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)


@dataclass
class SectionStep:
    """What a section did with the text it was given."""

    consumed: int
    events: list[tuple[str, str]]  # ("start", name) | ("args", text) | ("end", "")
    # "open": wants more text; "more": a call ended, advance again; "done": section over;
    # "failed": the text at `consumed` is not a call
    status: str


class CallSection(Protocol):
    def advance(self, text: str, final: bool) -> SectionStep: ...


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


@dataclass
class _Call:
    name: str
    arguments: str = ""


class ToolCallParser:
    """Base of every tool parser: subclasses set `markers` and open the section for a marker."""

    name = ""
    markers: tuple[str, ...] = ()

    def __init__(self, id_factory: Callable[[], str] = new_call_id) -> None:
        self._buffer = ""
        self._section: CallSection | None = None
        self._raw = ""  # section text since the last finished call: content again if the section fails
        self._call: _Call | None = None
        self._ids: list[str] = []
        self._new_id = id_factory
        self._accepted = 0  # calls the open section has sent

    def open_section(self, marker: str) -> CallSection:
        raise NotImplementedError

    def feed(self, text: str) -> ToolDelta:
        self._buffer += text
        return self._run(final=False)

    def finish(self, text: str = "") -> ToolDelta:
        """End of output (`text`: its last piece, or all of it for a non-streaming response)."""
        self._buffer += text
        return self._run(final=True)

    def _run(self, final: bool) -> ToolDelta:
        out = ToolDelta()
        while self._buffer or (final and self._section is not None):
            if self._section is None:
                if not self._scan_content(out, final):
                    break
                continue
            step = self._section.advance(self._buffer, final)
            self._raw += self._buffer[:step.consumed]
            self._buffer = self._buffer[step.consumed:]
            self._apply(step.events, out)
            if step.status == "more":
                continue
            if step.status == "open":
                break
            if step.status == "failed" or not self._accepted:  # a section without a single call is content
                self._fail(out)
            self._section, self._raw, self._call, self._accepted = None, "", None, 0
        return out

    def _scan_content(self, out: ToolDelta, final: bool) -> bool:
        found = [(pos, -len(m), m) for m in self.markers if (pos := self._buffer.find(m)) >= 0]
        if found:
            pos, _, marker = min(found)
            out.content += self._buffer[:pos]
            self._buffer = self._buffer[pos + len(marker):]
            self._raw = marker
            self._section = self.open_section(marker)
            return True
        keep = 0 if final else max((partial_suffix(self._buffer, m) for m in self.markers), default=0)
        out.content += self._buffer[:len(self._buffer) - keep]
        self._buffer = self._buffer[len(self._buffer) - keep:]
        return False

    def _apply(self, events: list[tuple[str, str]], out: ToolDelta) -> None:
        for kind, value in events:
            if kind == "start":
                self._call = _Call(name=value)
            elif kind == "args" and self._call is not None:
                self._call.arguments += value
            elif kind == "end" and self._call is not None:
                call, self._call = self._call, None
                if is_json_object(call.arguments):
                    self._accepted += 1
                    self._ids.append(self._new_id())
                    out.tool_calls.append(ToolCallDelta(len(self._ids) - 1, self._ids[-1], call.name, call.arguments))
                else:
                    logger.warning("a %s tool call's arguments are not a JSON object; returned as text: %.200r",
                                   self.name, self._raw)
                    out.content += self._raw
                self._raw = ""

    def _fail(self, out: ToolDelta) -> None:
        if self._raw:
            logger.warning("%s tool-call markup the parser could not read as a call; returned as text: %.200r",
                           self.name, self._raw)
        out.content += self._raw


def merge_deltas(deltas: list[ToolDelta]) -> tuple[str, list[dict[str, Any]]]:
    """Fold a stream of deltas into a final (content, tool_calls) as a non-streaming response carries them."""
    content = ""
    calls: list[dict[str, Any]] = []
    for delta in deltas:
        content += delta.content
        for piece in delta.tool_calls:
            if piece.index == len(calls):
                calls.append({"id": piece.id, "type": "function",
                              "function": {"name": piece.name, "arguments": ""}})
            calls[piece.index]["function"]["arguments"] += piece.arguments
    return content, calls


def parse_tool_calls(parser: ToolCallParser, text: str) -> tuple[str, list[dict[str, Any]]]:
    """Non-streaming use: the whole output at once (a call cut off by max_tokens stays content)."""
    return merge_deltas([parser.finish(text)])
