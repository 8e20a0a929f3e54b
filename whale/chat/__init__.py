"""Chat layer: conversation -> prompt tokens, and model output -> reasoning, content and tool calls.

The server's entry points: `detect_variant`, `check_request`, `render` / `render_fim` + `encode_prompt`,
`make_output_parser`; `CHAT_FORMATS` names the formats `--chat-format` accepts (`whale models` lists them).
"""

from whale.chat.capabilities import Capabilities, capabilities_for, check_request
from whale.chat.output import ChatDelta, ChatOutputParser, make_output_parser, parse_output
from whale.chat.reasoning import REASONING_PARSERS, ReasoningParser, make_reasoning_parser
from whale.chat.templates import encode_prompt, prompt_opens_reasoning, render, render_fim
from whale.chat.tool_grammars import TOOL_PARSERS, make_tool_parser
from whale.chat.tools import ToolCallDelta, ToolCallParser, parse_tool_calls
from whale.chat.variants import CHAT_FORMATS, ChatVariant, detect_loaded_variant, detect_variant

__all__ = [
    "CHAT_FORMATS", "REASONING_PARSERS", "TOOL_PARSERS", "Capabilities", "ChatDelta", "ChatOutputParser",
    "ChatVariant", "ReasoningParser", "ToolCallDelta", "ToolCallParser", "capabilities_for", "check_request",
    "detect_loaded_variant", "detect_variant", "encode_prompt", "make_output_parser", "make_reasoning_parser",
    "make_tool_parser", "parse_output", "parse_tool_calls", "prompt_opens_reasoning", "render", "render_fim",
]
