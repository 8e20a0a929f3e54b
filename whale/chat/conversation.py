"""A conversation made ready for the engine, the same way for every caller (the server, `LLM.chat`, `whale chat`): the
model's chat format renders it, its capabilities are checked, and the output parser that splits the reply
into reasoning, content and tool calls comes with it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from whale.chat.capabilities import check_request, resolve_effort
from whale.chat.output import ChatOutputParser, make_output_parser
from whale.chat.templates import encode_prompt, render
from whale.chat.variants import ChatVariant


@dataclass
class ChatPrompt:
    text: str
    ids: list[int]
    thinking: bool
    parser: ChatOutputParser


def chat_prompt(variant: ChatVariant, tokenizer: Any, messages: list[dict[str, Any]], *,
                thinking: bool | None = None, tools: list[dict[str, Any]] | None = None, prefix: bool = False,
                effort: str | None = None, config: dict[str, Any] | None = None) -> ChatPrompt:
    """`thinking` None: the model's default mode; `prefix`: continue the last assistant message (prefix
    completion); `effort`: the API's reasoning_effort (None: its default). What the model cannot do raises a
    CapabilityError."""
    thinking = check_request(variant, thinking=thinking, tools=tools, prefix=prefix, config=config)
    text = render(variant, messages, tools=tools or None, thinking=thinking, prefix=prefix,
                  effort=resolve_effort(effort))
    parser = make_output_parser(variant, text, thinking=thinking, tools=bool(tools))
    return ChatPrompt(text, encode_prompt(tokenizer, text), thinking, parser)
