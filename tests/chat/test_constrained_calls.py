"""The grammars that hold tool calls to each DeepSeek format (whale/chat/constrained_calls.py), walked token by token
with llguidance's matcher over the real tokenizers: with `strict` tools and `tool_choice: "auto"` the model may
answer in free text or call a declared tool, a strict tool's arguments must follow its schema, and whatever the
grammar accepts, the format's own parser reads back as the same call."""

from __future__ import annotations

import json

import jsonschema_rs
import llguidance
import pytest
from scripted_gguf import distill_qwen_tokenizer_json
from tokenizer_files import V3_DIR, V4_DIR

from whale.chat import make_output_parser, parse_output, render
from whale.chat.constrained_calls import forced_call_grammar, has_strict_tools, strict_tools_grammar
from whale.chat.markers import DSML
from whale.engine.grammar import LIMITS, grammar_tokenizer, token_marker
from whale.tokenizer import Tokenizer

WEATHER_ARGS = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                "properties": {"city": {"type": "string", "maxLength": 12},
                               "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": WEATHER_ARGS}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def _v3(name: str, args: str) -> str:
    return f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{args}\n```<｜tool▁call▁end｜>"


def _v31(name: str, args: str) -> str:
    return f"<｜tool▁call▁begin｜>{name}<｜tool▁sep｜>{args}<｜tool▁call▁end｜>"


def _dsml(name: str, args: str) -> str:
    params = "".join(
        f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
        f'{v if isinstance(v, str) else json.dumps(v)}</{DSML}parameter>\n' for k, v in json.loads(args).items())
    return f'<{DSML}invoke name="{name}">\n{params}</{DSML}invoke>'


def _distill(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


# variant: (tokenizer, one call, the section around calls)
FORMATS = {
    "v3": ("v3", _v3, "<｜tool▁calls▁begin｜>{}<｜tool▁calls▁end｜>"),
    "v3.1": ("v3", _v31, "<｜tool▁calls▁begin｜>{}<｜tool▁calls▁end｜>"),
    "v3.2": ("v3", _dsml, f"\n\n<{DSML}function_calls>\n{{}}\n</{DSML}function_calls>"),
    "v4": ("v4", _dsml, f"\n\n<{DSML}tool_calls>\n{{}}\n</{DSML}tool_calls>"),
    "r1-distill-qwen": ("distill", _distill, "{}"),
}


@pytest.fixture(scope="module")
def tokenizers():
    from tokenizers import Tokenizer as HFTokenizer

    distill = HFTokenizer.from_str(json.dumps(distill_qwen_tokenizer_json()))
    return {"v3": Tokenizer.from_hf_dir(V3_DIR), "v4": Tokenizer.from_hf_dir(V4_DIR),
            "distill": Tokenizer(distill, bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>",
                                 add_bos_token=True, chat_template=None)}


def _walk(tokenizer: Tokenizer, grammar: str, text: str) -> bool:
    """Whether the grammar takes `text`, token by token as the model would write it, and may end there."""
    view = grammar_tokenizer(tokenizer, tokenizer.vocab_size, [tokenizer.eos_token_id])
    matcher = llguidance.LLMatcher(view, grammar, limits=LIMITS)
    assert not matcher.is_error(), matcher.get_error()
    for token in tokenizer.encode(text, add_special_tokens=False):
        if not matcher.consume_token(token):
            return False
    return matcher.is_accepting()


def _grammars(tokenizers, variant):
    tokenizer = tokenizers[FORMATS[variant][0]]
    view = grammar_tokenizer(tokenizer, tokenizer.vocab_size, [tokenizer.eos_token_id])
    return tokenizer, strict_tools_grammar(variant, TOOLS, token_marker(tokenizer, view))


@pytest.mark.parametrize("variant", FORMATS)
def test_strict_tools_take_free_text_and_valid_calls(tokenizers, variant):
    tokenizer, grammar = _grammars(tokenizers, variant)
    _, call, section = FORMATS[variant]
    assert _walk(tokenizer, grammar, "It is sunny in Paris today.")
    valid = call("get_weather", '{"city": "Paris", "days": 3}')
    text = "Let me check." + section.format(valid)
    assert _walk(tokenizer, grammar, text)
    parser = make_output_parser(variant, render(variant, ASK, tools=TOOLS), thinking=False, tools=True)
    calls = parse_output(parser, text)["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    jsonschema_rs.validate(WEATHER_ARGS, json.loads(calls[0]["function"]["arguments"]))


@pytest.mark.parametrize("variant", FORMATS)
def test_strict_tools_refuse_what_the_schema_or_the_tools_forbid(tokenizers, variant):
    tokenizer, grammar = _grammars(tokenizers, variant)
    _, call, section = FORMATS[variant]
    for bad in (call("get_weather", '{"city": 7, "days": 3}'),  # a number where the schema wants a string
                call("get_weather", '{"city": "Paris", "days": 30}'),  # above the maximum
                call("get_weather", '{"city": "Paris"}'),  # a required argument missing
                call("get_news", '{"topic": "weather"}')):  # no such tool
        assert not _walk(tokenizer, grammar, "Let me check." + section.format(bad)), bad


@pytest.mark.parametrize("variant", FORMATS)
def test_a_tool_not_marked_strict_takes_any_arguments_of_its_format(tokenizers, variant):
    tokenizer, grammar = _grammars(tokenizers, variant)
    _, call, section = FORMATS[variant]
    off_schema = call("get_time", '{"zone": "Mars", "exact": true}')  # outside its schema, which is not strict
    assert _walk(tokenizer, grammar, section.format(off_schema))
    if variant not in ("v3.2", "v4"):  # DSML values are raw text: any is an argument
        assert not _walk(tokenizer, grammar, section.format(call("get_time", "zone = UTC")))


@pytest.mark.parametrize("variant", FORMATS)
def test_forced_calls_allow_no_free_text(tokenizers, variant):
    tokenizer = tokenizers[FORMATS[variant][0]]
    view = grammar_tokenizer(tokenizer, tokenizer.vocab_size, [tokenizer.eos_token_id])
    grammar = forced_call_grammar(variant, TOOLS, "get_weather", token_marker(tokenizer, view))
    _, call, section = FORMATS[variant]
    valid = section.format(call("get_weather", '{"city": "Paris", "days": 3}'))
    assert _walk(tokenizer, grammar, valid)
    assert not _walk(tokenizer, grammar, "Let me check." + valid)
    assert not _walk(tokenizer, grammar, "It is sunny.")


def test_strict_is_read_from_the_function():
    assert has_strict_tools(TOOLS)
    assert not has_strict_tools([TOOLS[1]])
