"""Tool-call parsers: every split point, token by token, malformed input, and parse(render(calls)) == calls."""

from __future__ import annotations

import json

import pytest
from chat_helpers import counter_ids
from hypothesis import given, settings
from hypothesis import strategies as st

from whale.chat.markers import ASSISTANT, DSML, EOS, THINK_END, TOOL_CALL_END
from whale.chat.templates import render
from whale.chat.tool_grammars import TOOL_PARSERS, make_tool_parser
from whale.chat.tools import ToolDelta, merge_deltas, parse_tool_calls

V3 = ("Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
      '{"city": "Paris"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n'
      "{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
V31 = ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜>'
       "<｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
V32 = ('Checking.\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_weather">\n'
       '<｜DSML｜parameter name="city" string="true">Paris "centre"</｜DSML｜parameter>\n'
       '<｜DSML｜parameter name="days" string="false">[1, 2]</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
       '<｜DSML｜invoke name="get_time">\n</｜DSML｜invoke>\n</｜DSML｜function_calls>')
CALL_END = {"deepseek_v3": TOOL_CALL_END, "deepseek_v31": TOOL_CALL_END, "deepseek_v32": f"</{DSML}invoke>"}
DISTILL = ('I will call it.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


def calls(*pairs: tuple[str, dict]) -> list[dict]:
    return [{"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
            for i, (n, a) in enumerate(pairs)]


def feed_chunks(name: str, chunks: list[str]) -> tuple[str, list[dict]]:
    parser = make_tool_parser(name, counter_ids())
    return merge_deltas([parser.feed(chunk) for chunk in chunks] + [parser.finish()])


def semantic(result: tuple[str, list[dict]]) -> tuple[str, list]:
    content, found = result
    return content, [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in found]


GOOD = [
    ("deepseek_v3", V3, "Let me check.", calls(("get_weather", {"city": "Paris"}), ("get_time", {}))),
    ("deepseek_v31", V31, "", calls(("get_weather", {"city": "Paris"}), ("get_time", {}))),
    ("deepseek_v32", V32, "Checking.", calls(("get_weather", {"city": 'Paris "centre"', "days": [1, 2]}),
                                             ("get_time", {}))),
    ("r1_distill", DISTILL, "I will call it.\n", calls(("get_weather", {"city": "Paris"}), ("get_time", {}))),
    ("r1_distill", V3, "Let me check.", calls(("get_weather", {"city": "Paris"}), ("get_time", {}))),
    ("r1_distill", '```json\n{"name": "get_weather", "parameters": {"city": "Paris"}}\n```', "",
     calls(("get_weather", {"city": "Paris"}))),
    ("deepseek_v3", "No tools needed, {\"a\": 1} <｜tool", "No tools needed, {\"a\": 1} <｜tool", []),
]


@pytest.mark.parametrize("name, text, content, expected", GOOD)
def test_every_split_point_and_char_by_char(name, text, content, expected):
    whole = feed_chunks(name, [text])
    assert semantic(whole) == semantic((content, expected))
    for cut in range(len(text) + 1):
        assert feed_chunks(name, [text[:cut], text[cut:]]) == whole, cut
    assert feed_chunks(name, list(text)) == whole


def decode_stream(tokenizer, text: str) -> list[str]:
    """The text pieces an incremental detokenizer hands over, one token at a time."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    pieces, previous = [], ""
    for count in range(1, len(ids) + 1):
        decoded = tokenizer.decode(ids[:count], skip_special_tokens=False)
        if not decoded.endswith("\ufffd"):
            pieces.append(decoded[len(previous):])
            previous = decoded
    assert "".join(pieces) == text
    return pieces


@pytest.mark.parametrize("name, text", [("deepseek_v3", V3), ("deepseek_v31", V31), ("deepseek_v32", V32)])
def test_token_by_token_each_call_arrives_whole_once_it_ends(tokenizer, name, text):
    """Fail closed: a call is sent only once its end marker is read and its arguments parse, in one delta
    (id, name, arguments), so a client never holds a partial call."""
    parser = make_tool_parser(name, counter_ids())
    pieces = decode_stream(tokenizer, text)
    deltas = [parser.feed(piece) for piece in pieces] + [parser.finish()]
    assert merge_deltas(deltas) == feed_chunks(name, [text])
    calls = [d for delta in deltas for d in delta.tool_calls]
    assert [c.index for c in calls] == list(range(len(calls))) and len(calls) >= 1
    for call in calls:
        assert call.id == f"call_{call.index}" and call.name and json.loads(call.arguments) is not None
    assert calls[0].to_openai()["type"] == "function"
    # nothing of the first call is sent before the piece that ends it
    first = next(i for i, delta in enumerate(deltas) if delta.tool_calls)
    assert text.find(CALL_END[name]) < len("".join(pieces[:first + 1]))


MALFORMED = [
    ("deepseek_v3", "<｜tool▁calls▁begin｜>oops, not a call"),
    ("deepseek_v3", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{not json\n```"
                    "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
    ("deepseek_v31", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>bad name<｜tool▁sep｜>{}<｜tool▁call▁end｜>"),
    ("deepseek_v32", '\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke nam="x">\n</｜DSML｜invoke>'),
    ("deepseek_v32", '<｜DSML｜function_calls>\n<｜DSML｜invoke name="x">\n<｜DSML｜parameter name="n" '
                     'string="false">nope</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls>'),
    ("r1_distill", "<tool_call>\n{\"name\": 3}\n</tool_call>"),
    ("r1_distill", "{\"not\": \"a call\"}"),
]


@pytest.mark.parametrize("name, text", MALFORMED)
def test_malformed_calls_come_back_as_content(name, text):
    content, found = parse_tool_calls(make_tool_parser(name), text)
    assert found == [] and content.strip() == text.strip()
    for cut in range(len(text) + 1):  # streamed: never raises, never loses text when no call was sent
        streamed_content, streamed_calls = feed_chunks(name, [text[:cut], text[cut:]])
        assert streamed_calls or streamed_content.strip() == text.strip()


def test_truncated_call_at_max_tokens(caplog):
    """A call cut off by max_tokens is text, streamed or not (never a partial call), and the log says so."""
    text = V31[:75]  # stops inside the first call's arguments
    content, found = parse_tool_calls(make_tool_parser("deepseek_v31"), text)
    assert found == [] and content == text
    for cut in (10, 40, 70):
        assert feed_chunks("deepseek_v31", [text[:cut], text[cut:]]) == (text, [])
    assert "could not read as a call" in caplog.text


def test_registry():
    assert set(TOOL_PARSERS) == {"deepseek_v3", "deepseek_v31", "deepseek_v32", "deepseek_v4", "r1_distill"}
    with pytest.raises(ValueError, match="unknown tool parser"):
        make_tool_parser("llama3_json")
    assert not ToolDelta()


# ---- parse(render(calls)) == calls -------------------------------------------------------------------------

KEYS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.text(alphabet=st.characters(blacklist_characters="<｜", blacklist_categories=("Cs",)),
                            max_size=20))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
                      max_leaves=6)
CALLS = st.lists(st.tuples(st.from_regex(r"[A-Za-z_][A-Za-z0-9_\-]{0,15}", fullmatch=True),
                           st.dictionaries(KEYS, VALUES, max_size=4)), min_size=1, max_size=3)
FORMATS = [("v3", "deepseek_v3"), ("v3.1", "deepseek_v31"), ("v3.2", "deepseek_v32"),
           ("r1-distill-qwen", "r1_distill"), ("r1-0528", "deepseek_v3")]


def model_output(variant: str, content: str, pairs: list[tuple[str, dict]]) -> str:
    """The assistant turn as the model writes it: the rendered message after the generation prompt."""
    message = {"role": "assistant", "content": content, "tool_calls": calls(*pairs)}
    text = render(variant, [{"role": "user", "content": "go"}, message], add_generation_prompt=False)
    return text[text.rindex(ASSISTANT) + len(ASSISTANT):].removeprefix(THINK_END).removesuffix(EOS)


@pytest.mark.parametrize("variant, parser", FORMATS)
@settings(max_examples=40, deadline=None)
@given(pairs=CALLS, content=st.sampled_from(["", "Sure, calling now."]))
def test_parse_of_render_returns_the_calls(variant, parser, pairs, content):
    output = model_output(variant, content, pairs)
    text, found = parse_tool_calls(make_tool_parser(parser, counter_ids()), output)
    assert text.strip() == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in found] == pairs
    assert feed_chunks(parser, list(output)) == feed_chunks(parser, [output])
