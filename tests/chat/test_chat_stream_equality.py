"""Stream = non-stream, for every format that parses reasoning or tool calls: a model output made of reasoning,
answers, valid calls and the adversarial shapes from the peers' bug threads (calls cut off by max_tokens, DSML
markup leaking into text, calls inside the reasoning, bare JSON, unknown wrappers), split at random points, gives
exactly the message the whole output gives."""

from __future__ import annotations

from chat_helpers import counter_ids
from hypothesis import given, settings
from hypothesis import strategies as st

from whale.chat import make_output_parser, parse_output, render
from whale.chat.markers import (
    DSML,
    THINK_END,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_SEP,
)
from whale.chat.tools import ToolDelta, merge_deltas

V3_CALL = (f'{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n{{"city": "Paris"}}\n```'
           f"{TOOL_CALL_END}{TOOL_CALLS_END}")
V31_CALL = f'{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}get_weather{TOOL_SEP}{{"city": "Paris"}}{TOOL_CALL_END}{TOOL_CALLS_END}'
DSML_CALL = (f'<{DSML}function_calls>\n<{DSML}invoke name="get_weather">\n<{DSML}parameter name="city" '
             f'string="true">Paris</{DSML}parameter>\n</{DSML}invoke>\n</{DSML}function_calls>')
V4_CALL = DSML_CALL.replace("function_calls", "tool_calls")
DISTILL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
COMMON = ["Let me think. ", "The answer is 4.", "\n\n", THINK_END, "{\"name\": \"get_weather\"}", "<tool_call>",
          "<unknown_wrapper>{}</unknown_wrapper>", "émoji 🐳 ", f"<{DSML}invoke name=", "```json\n{}\n```"]
# format -> (thinking, the format's own call)
FORMATS = {"v3": (False, V3_CALL), "v3.1": (False, V31_CALL), "v3.2": (True, DSML_CALL), "v4": (True, V4_CALL),
           "r1-0528": (True, V3_CALL), "r1-distill-qwen": (True, DISTILL_CALL)}


def _fragments(call: str) -> st.SearchStrategy[str]:
    cut_call = st.integers(1, len(call) - 1).map(lambda n: call[:n])  # a call cut off by max_tokens
    return st.one_of(st.sampled_from([*COMMON, call, call]), cut_call)


def _message(deltas) -> tuple:
    content, calls = merge_deltas([ToolDelta(d.content, d.tool_calls) for d in deltas])
    return "".join(d.reasoning_content for d in deltas), content, calls


@settings(max_examples=300, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(FORMATS)))
def test_streamed_deltas_join_to_the_non_streamed_message(data, name):
    thinking, call = FORMATS[name]
    output = "".join(data.draw(st.lists(_fragments(call), max_size=6), label="fragments"))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(output)), max_size=8), label="cuts"))
    prompt = render(name, [{"role": "user", "content": "Weather?"}],
                    tools=[{"type": "function", "function": {"name": "get_weather"}}], thinking=thinking)
    whole = parse_output(make_output_parser(name, prompt, thinking=thinking, tools=True, id_factory=counter_ids()),
                         output)
    parser = make_output_parser(name, prompt, thinking=thinking, tools=True, id_factory=counter_ids())
    pieces = [output[a:b] for a, b in zip([0, *cuts], [*cuts, len(output)], strict=True)]
    reasoning, content, calls = _message([parser.feed(piece) for piece in pieces] + [parser.finish()])
    assert reasoning == (whole["reasoning_content"] or "")
    assert content == whole["content"]
    assert calls == (whole["tool_calls"] or [])
