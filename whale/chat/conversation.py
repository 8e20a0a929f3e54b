"""A conversation made ready for the engine, the same way for every caller (the server, `LLM.chat`, `whale chat`): the
model's chat format renders it, its capabilities are checked, and the output parser that splits the reply
into reasoning, content and tool calls comes with it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from whale.chat.capabilities import capabilities_for, check_request, resolve_effort
from whale.chat.markers import THINK_END, THINK_START
from whale.chat.output import ChatOutputParser, make_output_parser
from whale.chat.templates import encode_prompt, prompt_opens_reasoning, render
from whale.chat.variants import ChatVariant
from whale.sampling_params import ReasoningSpec


@dataclass
class ChatPrompt:
    text: str
    ids: list[int]
    thinking: bool
    parser: ChatOutputParser
    reasoning: ReasoningSpec | None = None  # the think markers as token ids, in thinking mode (a reasoning budget)


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
    spec = reasoning_spec(variant, tokenizer, text) if thinking else None
    return ChatPrompt(text, encode_prompt(tokenizer, text), thinking, parser, spec)


def reasoning_spec(variant: ChatVariant, tokenizer: Any, prompt: str) -> ReasoningSpec | None:
    """The format's think markers in this tokenizer's ids; None where `<think>` / `</think>` are not single tokens
    (the engine then cannot tell reasoning tokens apart)."""
    start, end = encode_prompt(tokenizer, THINK_START), encode_prompt(tokenizer, THINK_END)
    if len(start) != 1 or len(end) != 1:
        return None
    forced = tuple(encode_prompt(tokenizer, capabilities_for(variant).forced_think_end))
    if end[0] not in forced:
        return None
    return ReasoningSpec(start[0], end[0], forced, prompt_opens_reasoning(variant, prompt))
