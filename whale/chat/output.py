"""One object per request that turns detokenized text into reasoning, content and tool-call deltas."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from whale.chat.capabilities import CAPABILITIES
from whale.chat.reasoning import ReasoningParser, make_reasoning_parser
from whale.chat.templates import prompt_opens_reasoning
from whale.chat.tool_grammars import make_tool_parser
from whale.chat.tools import ToolCallDelta, ToolCallParser, ToolDelta, merge_deltas, new_call_id
from whale.chat.variants import ChatVariant, variant_name


@dataclass
class ChatDelta:
    """One SSE chunk's worth: `reasoning_content`, `content` and `tool_calls` pieces."""

    reasoning_content: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning_content or self.content or self.tool_calls)


class ChatOutputParser:
    """Reasoning first, then tool calls on the content channel.

    A call the model writes inside its reasoning is not dropped: when the output ends without a call after the
    reasoning (the reasoning never closed, or the answer calls nothing), the calls in the reasoning are the
    model's calls, returned with the output's last delta; when the answer calls tools, those are the calls and
    the ones in the reasoning were drafts. The reasoning text itself is passed on as written."""

    def __init__(self, reasoning: ReasoningParser,
                 new_tool_parser: Callable[[], ToolCallParser] | None = None) -> None:
        """`new_tool_parser`: makes a fresh tool parser (None: no tools in this request): one for the content,
        another at the end for the reasoning's calls."""
        self._reasoning = reasoning
        self._tools = new_tool_parser() if new_tool_parser is not None else None
        self._new_tool_parser = new_tool_parser
        self._thought = ""
        self._called = False

    def _split(self, reasoning: str, content: str, final: bool) -> ChatDelta:
        delta = ChatDelta(reasoning_content=reasoning)
        self._thought += reasoning
        if self._tools is None:
            delta.content = content
            return delta
        parsed = self._tools.finish(content) if final else self._tools.feed(content)
        delta.content, delta.tool_calls = parsed.content, parsed.tool_calls
        self._called = self._called or bool(parsed.tool_calls)
        return delta

    def feed(self, text: str) -> ChatDelta:
        piece = self._reasoning.feed(text)
        return self._split(piece.reasoning, piece.content, final=False)

    def finish(self, text: str = "") -> ChatDelta:
        """End of output; `text` is its last piece (all of it for a non-streaming response)."""
        piece = self._reasoning.finish(text)
        delta = self._split(piece.reasoning, piece.content, final=True)
        if self._new_tool_parser is not None and not self._called and self._thought:
            delta.tool_calls.extend(self._new_tool_parser().finish(self._thought).tool_calls)
        return delta


def make_output_parser(variant: ChatVariant | str, prompt: str, *, thinking: bool, tools: bool,
                       id_factory: Callable[[], str] = new_call_id) -> ChatOutputParser:
    """The parsers a request needs: think-splitting when the model reasons, tool parsing when tools were sent."""
    caps = CAPABILITIES[variant_name(variant)]
    reasoning_name = caps.reasoning_parser if thinking else "identity"
    opens = prompt_opens_reasoning(variant, prompt)
    new_tool_parser = functools.partial(make_tool_parser, caps.tool_parser, id_factory) \
        if tools and caps.tool_parser else None
    return ChatOutputParser(make_reasoning_parser(reasoning_name, opens), new_tool_parser)


def parse_output(parser: ChatOutputParser, text: str) -> dict[str, Any]:
    """Non-streaming: the assistant message (reasoning_content, content, tool_calls) for a whole output."""
    deltas = [parser.finish(text)]
    reasoning = "".join(d.reasoning_content for d in deltas)
    content, calls = merge_deltas([ToolDelta(d.content, d.tool_calls) for d in deltas])
    return {"role": "assistant", "content": content, "reasoning_content": reasoning or None,
            "tool_calls": calls or None}
