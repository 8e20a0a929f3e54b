"""Render an OpenAI-shaped conversation into the prompt text of each DeepSeek chat format, and into token ids.

Messages are plain dicts: role, content, reasoning_content, tool_calls (function.name / function.arguments
as a JSON string), tool_call_id, and `prefix: true` on a last assistant message to continue it.
See docs/chat-formats.md for the rules and where whale deliberately differs from a checkpoint's template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from whale.chat import dsv4, dsv32
from whale.chat.jinja import render_chat_template
from whale.chat.markers import (
    ASSISTANT,
    EOS,
    FIM_BEGIN,
    FIM_END,
    FIM_HOLE,
    THINK_END,
    THINK_START,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_OUTPUT_BEGIN,
    TOOL_OUTPUT_END,
    TOOL_OUTPUTS_BEGIN,
    TOOL_OUTPUTS_END,
    TOOL_SEP,
    USER,
)
from whale.chat.tool_prompts import (
    distill_call_text,
    distill_result_text,
    distill_tools_prompt,
    v3_tools_prompt,
    v31_tools_prompt,
)
from whale.chat.variants import ChatVariant, as_variant, variant_name
from whale.errors import InvalidRequestError


class Encoder(Protocol):
    def encode(self, text: str, *args: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class ClassicStyle:
    """The knobs that tell the V3 / R1 / distill Jinja templates apart (same token grammar)."""

    system: str = "join"  # "join": all system prompts joined by \n\n; "merge": moved into the first user turn
    assistant_after_user: bool = False  # V3-0324 style: <｜Assistant｜> right after each user turn
    strip_think: bool = True  # keep only the text after the last </think> of past assistant content
    output_sep: str = "\n"  # between two tool results of one group
    generation_suffix: str = ""  # "<think>\n" where the template prefills the think block
    distill_tools: bool = False  # whale's <tool_call> convention instead of DeepSeek tool tokens


CLASSIC_STYLES: dict[str, ClassicStyle] = {
    "v3": ClassicStyle(output_sep=""),
    "v3-0324": ClassicStyle(assistant_after_user=True, strip_think=False),
    "r1": ClassicStyle(system="merge", output_sep="", generation_suffix=THINK_START + "\n"),
    "r1-0528": ClassicStyle(assistant_after_user=True),
    "r1-distill-qwen": ClassicStyle(system="merge", generation_suffix=THINK_START + "\n", distill_tools=True),
    "r1-distill-llama": ClassicStyle(system="merge", generation_suffix=THINK_START + "\n", distill_tools=True),
    "r1-0528-qwen3": ClassicStyle(assistant_after_user=True, distill_tools=True),
}


def _text(value: Any) -> str:
    """Message content as text: None -> "", OpenAI content parts -> their text joined."""
    if value is None:
        return ""
    if isinstance(value, list):
        return "".join(part.get("text", "") for part in value if isinstance(part, dict))
    return str(value)


def _is_prefix(messages: list[dict[str, Any]], prefix: bool) -> bool:
    last = messages[-1] if messages else {}
    wants = prefix or bool(last.get("prefix"))
    if wants and last.get("role") != "assistant":
        raise InvalidRequestError("prefix completion needs the last message to be role 'assistant' "
                                  "(the text to continue)")
    return wants


def _system_prompt(messages: list[dict[str, Any]], tools_text: str) -> str:
    parts = [_text(m.get("content")) for m in messages if m.get("role") == "system"]
    system = "\n\n".join(parts)
    if tools_text:
        system = f"{system}\n\n{tools_text}" if system else tools_text
    return system


def _merge_system(messages: list[dict[str, Any]], system: str) -> list[dict[str, Any]]:
    """R1 takes no system prompt (model card): put it at the head of the first user turn instead."""
    rest = [m for m in messages if m.get("role") != "system"]
    if not system:
        return rest
    for i, message in enumerate(rest):
        if message.get("role") == "user":
            merged = dict(message, content=f"{system}\n\n{_text(message.get('content'))}")
            return rest[:i] + [merged] + rest[i + 1:]
    return [{"role": "user", "content": system}] + rest


def _distill_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rewrite tool calls and results into whale's distill convention: calls as text, results as a user turn."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            calls = "\n".join(distill_call_text(c["function"]["name"], c["function"].get("arguments") or "{}")
                              for c in message["tool_calls"])
            content = _text(message.get("content"))
            out.append({"role": "assistant", "content": f"{content}\n\n{calls}" if content else calls})
        elif role == "tool":
            block = distill_result_text(_text(message.get("content")))
            if out and out[-1].get("_tool_results"):
                out[-1] = dict(out[-1], content=out[-1]["content"] + "\n" + block)
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            out.append(message)
    return out


def _v3_call(call: dict[str, Any]) -> str:
    function = call["function"]
    return (f"{TOOL_CALL_BEGIN}{call.get('type', 'function')}{TOOL_SEP}{function['name']}\n```json\n"
            f"{function.get('arguments') or '{}'}\n```{TOOL_CALL_END}")


def _classic_assistant(message: dict[str, Any], style: ClassicStyle, continuing: bool) -> str:
    content = _text(message.get("content"))
    if style.strip_think and THINK_END in content and not continuing:
        content = content.split(THINK_END)[-1]
    calls = message.get("tool_calls")
    if calls:
        content += TOOL_CALLS_BEGIN + "\n".join(_v3_call(c) for c in calls) + TOOL_CALLS_END
    return content + EOS


def _classic_prefix(message: dict[str, Any], style: ClassicStyle) -> str:
    """The start of the assistant turn being continued: the generation prompt, then the partial message.

    Where the template prefills `<think>\n`, a prefix with only `content` continues the answer after an
    empty think block; with `reasoning_content` it continues the reasoning (or the answer after it).
    """
    content = _text(message.get("content"))
    suffix = style.generation_suffix
    if not suffix:
        return content
    reasoning = message.get("reasoning_content")
    if content:
        return f"{suffix}{reasoning or ''}\n{THINK_END}\n\n{content}"
    return suffix + (reasoning or "")


def render_classic(messages: list[dict[str, Any]], style: ClassicStyle, *, bos: str,
                   tools: list[dict[str, Any]] | None, add_generation_prompt: bool, prefix: bool) -> str:
    """V3 / V3-0324 / R1 / R1-0528 / distills: one token grammar, told apart by `style`."""
    if style.distill_tools:
        messages = _distill_messages(messages)
    tools_text = (distill_tools_prompt(tools) if style.distill_tools else v3_tools_prompt(tools)) if tools else ""
    system = _system_prompt(messages, tools_text)
    if style.system == "merge":
        messages, system = _merge_system(messages, system), ""
    out = [bos, system]
    in_outputs = False
    opened = False  # the last thing written was <｜Assistant｜>, awaiting the assistant's text
    for index, message in enumerate(messages):
        role = message.get("role")
        if role == "user":
            if in_outputs:
                out.append(TOOL_OUTPUTS_END)
                in_outputs = False
            out.append(USER + _text(message.get("content")))
            opened = style.assistant_after_user
            if opened:
                out.append(ASSISTANT)
        elif role == "assistant":
            continuing = in_outputs
            if in_outputs:
                out.append(TOOL_OUTPUTS_END)
                in_outputs = False
            elif not opened:
                out.append(ASSISTANT)
            if prefix and index == len(messages) - 1:
                out.append(_classic_prefix(message, style))
                return "".join(out)
            out.append(_classic_assistant(message, style, continuing))
            opened = False
        elif role == "tool":
            out.append(style.output_sep if in_outputs else TOOL_OUTPUTS_BEGIN)
            out.append(TOOL_OUTPUT_BEGIN + _text(message.get("content")) + TOOL_OUTPUT_END)
            in_outputs, opened = True, False
    if in_outputs:
        out.append(TOOL_OUTPUTS_END)
    elif add_generation_prompt:
        out.append(("" if opened else ASSISTANT) + style.generation_suffix)
    return "".join(out)


def render_v31(messages: list[dict[str, Any]], *, bos: str, tools: list[dict[str, Any]] | None,
               thinking: bool, add_generation_prompt: bool, prefix: bool) -> str:
    """DeepSeek-V3.1 hybrid format: `</think>` opens non-thinking answers, `<think>` thinking ones."""
    out = [bos, _system_prompt(messages, v31_tools_prompt(tools) if tools else "")]
    after_user = after_tool = False
    for index, message in enumerate(messages):
        role = message.get("role")
        if role == "user":
            out.append(USER + _text(message.get("content")))
            after_user, after_tool = True, False
        elif role == "assistant":
            last_prefix = prefix and index == len(messages) - 1
            calls = message.get("tool_calls")
            content = _text(message.get("content"))
            if after_user:
                out.append(ASSISTANT + (THINK_START if last_prefix and thinking and not calls else THINK_END))
            if last_prefix:
                reasoning = message.get("reasoning_content")
                if thinking and after_user and reasoning is not None:
                    content = reasoning + (THINK_END + content if content else "")
                out.append(content)
                return "".join(out)
            if calls:
                out.append(content + TOOL_CALLS_BEGIN + "".join(
                    f"{TOOL_CALL_BEGIN}{c['function']['name']}{TOOL_SEP}{c['function'].get('arguments') or '{}'}"
                    f"{TOOL_CALL_END}" for c in calls) + TOOL_CALLS_END + EOS)
            else:
                if not after_tool and THINK_END in content:
                    content = content.split(THINK_END, 1)[1]
                out.append(content + EOS)
            after_user = after_tool = False
        elif role == "tool":
            out.append(TOOL_OUTPUT_BEGIN + _text(message.get("content")) + TOOL_OUTPUT_END)
            after_user, after_tool = False, True
    if add_generation_prompt and after_user:
        out.append(ASSISTANT + (THINK_START if thinking else THINK_END))
    return "".join(out)


def render(variant: ChatVariant | str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
           thinking: bool | None = None, add_generation_prompt: bool = True, prefix: bool = False,
           effort: str | None = None) -> str:
    """The prompt text (BOS included, as the variant's template writes it) for `messages`.

    `thinking` None means off for V3.1 / V3.2 / V4 (callers resolve the model's default first). `prefix` (or
    `prefix: true` on the last message) continues the last assistant message instead of starting a new turn.
    `effort` ("low", "high", "max") is V4's reasoning-effort preamble; other formats have none.
    """
    variant = as_variant(variant)
    if not messages:
        raise InvalidRequestError("messages must contain at least one message")
    prefix = _is_prefix(messages, prefix)
    if prefix:
        add_generation_prompt = False
    if variant.name in CLASSIC_STYLES:
        return render_classic(messages, CLASSIC_STYLES[variant.name], bos=variant.bos_token, tools=tools,
                              add_generation_prompt=add_generation_prompt, prefix=prefix)
    if variant.name == "v3.1":
        return render_v31(messages, bos=variant.bos_token, tools=tools, thinking=bool(thinking),
                          add_generation_prompt=add_generation_prompt, prefix=prefix)
    if variant.name == "v3.2":
        return dsv32.encode_conversation(messages, tools=tools, thinking=bool(thinking), prefix=prefix,
                                         bos=variant.bos_token)
    if variant.name == "v4":
        return dsv4.encode_conversation(messages, tools=tools, thinking=bool(thinking), effort=effort, prefix=prefix,
                                        bos=variant.bos_token)
    return _render_jinja(variant, messages, tools, thinking, add_generation_prompt, prefix)


def _render_jinja(variant: ChatVariant, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                  thinking: bool | None, add_generation_prompt: bool, prefix: bool) -> str:
    extra = {} if thinking is None else {"thinking": thinking, "enable_thinking": thinking}
    text = render_chat_template(variant.template or "", messages, add_generation_prompt=add_generation_prompt,
                                bos_token=variant.bos_token, eos_token=variant.eos_token, tools=tools, **extra)
    if prefix:  # as transformers' continue_final_message: cut right after the final message's text
        final = _text(messages[-1].get("content")).strip()
        cut = text.rfind(final) if final else -1
        if cut < 0:
            raise InvalidRequestError("prefix completion: the chat template does not render the last message "
                                      "verbatim, so it cannot be continued with this model")
        text = text[:cut + len(final)]
    return text


def render_fim(prefix: str, suffix: str = "") -> str:
    """Fill-in-the-middle prompt (PSM order); the model writes the middle, stopping at EOS."""
    return f"{FIM_BEGIN}{prefix}{FIM_HOLE}{suffix}{FIM_END}"


def encode_prompt(tokenizer: Encoder, text: str) -> list[int]:
    """Token ids of a rendered prompt. BOS is already in the text, so no special tokens are added again."""
    try:
        encoded = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        encoded = tokenizer.encode(text)
    return list(getattr(encoded, "ids", encoded))


def prompt_opens_reasoning(variant: ChatVariant | str, prompt: str) -> bool:
    """Whether the model's output begins inside a think block, judged from the prompt's last assistant turn.

    True where the prompt leaves `<think>` open (R1 and distills, V3.1/V3.2 thinking), and for R1-0528-style
    templates that end at a bare `<｜Assistant｜>` (the model opens `<think>` itself; the parser accepts both).
    """
    start = max(prompt.rfind(ASSISTANT), prompt.rfind("</function_results>"))
    tail = prompt[start:] if start >= 0 else ""
    if tail.rfind(THINK_START) > tail.rfind(THINK_END):
        return True
    if THINK_END in tail:
        return False
    return prompt.endswith(ASSISTANT) and variant_name(variant) in ("r1-0528", "r1-0528-qwen3")
