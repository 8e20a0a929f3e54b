"""whale's renderers against exact prompt strings and, byte for byte, against the checkpoints' own templates."""

from __future__ import annotations

import json

import pytest
from chat_helpers import reference_template

from whale.chat.jinja import render_chat_template
from whale.chat.templates import encode_prompt, prompt_opens_reasoning, render, render_fim
from whale.chat.variants import ChatVariant
from whale.errors import InvalidRequestError

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


def call(name: str, arguments: dict, call_id: str = "call_1") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def tool_turn(content=None, calls=None) -> dict:
    return {"role": "assistant", "content": content, "tool_calls": calls or [call("get_weather", {"city": "Paris"})]}


SYS = {"role": "system", "content": "You are terse."}
Q1 = {"role": "user", "content": "Hi there"}
A1 = {"role": "assistant", "content": "Hello!"}
Q2 = {"role": "user", "content": "Weather in Paris?"}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}
RESULT2 = {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}
ANSWER = {"role": "assistant", "content": "21 degrees."}
TWO_CALLS = tool_turn("Let me check.", [call("get_weather", {"city": "Paris"}),
                                        call("get_weather", {"city": "Rome"}, "call_2")])

# Conversations the templates render correctly (no second tool round: the V3/R1 template never resets its
# "first call" / "first output" flags, a bug whale does not copy; see docs/chat-formats.md).
PLAIN_CORPUS = [
    [Q1],
    [Q1, A1, Q2],
    [Q1, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello!"}, Q2],
    [{"role": "user", "content": "数学: 1+1=? Ünïcödé ✓"}],
    [Q1, A1],
]
SYSTEM_CORPUS = [[SYS, Q1], [SYS, {"role": "system", "content": "Be kind."}, Q1, A1, Q2]]
TOOL_CORPUS = [
    [SYS, Q2, tool_turn(), RESULT, ANSWER],
    [Q2, tool_turn(), RESULT],
    [Q2, TWO_CALLS, RESULT, RESULT2, ANSWER, Q1],
    [Q2, tool_turn(""), RESULT, ANSWER],
]


def _v3_ref(template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    # The V3/R1 template tests `'tool_calls' in message`, so plain messages must not carry the key.
    return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                bos_token=BOS, eos_token=EOS)


@pytest.mark.parametrize("messages", PLAIN_CORPUS + SYSTEM_CORPUS + TOOL_CORPUS)
@pytest.mark.parametrize("gen", [True, False])
def test_v3_equals_checkpoint_template(v3_template, messages, gen):
    assert render("v3", messages, add_generation_prompt=gen) == _v3_ref(v3_template, messages, gen)


def r1_template(v3_template: str) -> str:
    """R1's current template: the V3/R1 one whose generation prompt prefills `<think>\\n`."""
    old = "{{'<｜Assistant｜>'}}{% endif %}"
    assert v3_template.endswith(old)
    return v3_template[: -len(old)] + "{{'<｜Assistant｜><think>\\n'}}{% endif %}"


@pytest.mark.parametrize("messages", PLAIN_CORPUS + TOOL_CORPUS[1:])
def test_r1_equals_checkpoint_template_without_system(v3_template, messages):
    assert render("r1", messages) == _v3_ref(r1_template(v3_template), messages, True)


def test_r1_exact_prompt_merges_system_and_drops_reasoning():
    messages = [SYS, Q1, {"role": "assistant", "content": "Hello!", "reasoning_content": "greet"}, Q2]
    assert render("r1", messages) == (
        f"{BOS}{U}You are terse.\n\nHi there{A}Hello!{EOS}{U}Weather in Paris?{A}<think>\n")


def test_v3_exact_prompt_with_tool_round():
    expected = (f"{BOS}You are terse.{U}Weather in Paris?{A}<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"
                '<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
                f'{EOS}<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{{"temp": 21}}<｜tool▁output▁end｜>'
                f"<｜tool▁outputs▁end｜>21 degrees.{EOS}")
    assert render("v3", TOOL_CORPUS[0], add_generation_prompt=False) == expected


def test_v3_second_tool_round_is_well_formed():
    messages = [Q2, tool_turn(), RESULT, tool_turn(None, [call("get_weather", {"city": "Rome"}, "call_2")]),
                RESULT2]
    text = render("v3", messages)
    assert text.count("<｜tool▁calls▁begin｜>") == 2 and text.count("<｜tool▁outputs▁begin｜>") == 2
    assert text.endswith("<｜tool▁outputs▁end｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"
                         'get_weather\n```json\n{"city": "Rome"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
                         f"{EOS}<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜>"
                         "<｜tool▁outputs▁end｜>")


def test_v3_tools_go_into_system_prompt():
    text = render("v3", [SYS, Q1], tools=[WEATHER])
    assert text.startswith(f"{BOS}You are terse.\n\n## Tools\n")
    assert json.dumps(WEATHER, ensure_ascii=False) in text and text.endswith(f"{U}Hi there{A}")


@pytest.mark.parametrize("messages", PLAIN_CORPUS + SYSTEM_CORPUS + TOOL_CORPUS
                         + [[Q2, tool_turn(), RESULT, tool_turn(), RESULT2, ANSWER]])
@pytest.mark.parametrize("gen", [True, False])
def test_r1_0528_equals_checkpoint_template(messages, gen):
    # The R1-0528 template tests `'</think>' in content` on every assistant message: None would crash it.
    messages = [dict(m, content=m["content"] or "") for m in messages]
    expected = render_chat_template(reference_template("deepseek-r1-0528"), messages,
                                    add_generation_prompt=gen, bos_token=BOS, eos_token=EOS)
    assert render("r1-0528", messages, add_generation_prompt=gen) == expected


def test_v3_0324_exact_prompt():
    assert render("v3-0324", [SYS, Q1, A1, Q2], add_generation_prompt=False) == (
        f"{BOS}You are terse.{U}Hi there{A}Hello!{EOS}{U}Weather in Paris?{A}")


@pytest.mark.parametrize("messages", PLAIN_CORPUS)
@pytest.mark.parametrize("variant", ["r1-distill-qwen", "r1-distill-llama"])
def test_distills_equal_checkpoint_template(messages, variant):
    expected = render_chat_template(reference_template("deepseek-r1-distill"), messages,
                                    add_generation_prompt=True, bos_token=BOS, eos_token=EOS)
    assert render(variant, messages) == expected


def test_distill_tool_convention_round():
    messages = [SYS, Q2, tool_turn(), RESULT]
    text = render("r1-distill-qwen", messages, tools=[WEATHER])
    assert text.startswith(f"{BOS}{U}You are terse.\n\n# Tools\n\n")
    assert text.endswith(f'{A}<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}\n'
                         f"</tool_call>{EOS}{U}<tool_response>\n{{\"temp\": 21}}\n</tool_response>"
                         f"{A}<think>\n")


V31_CORPUS = PLAIN_CORPUS + SYSTEM_CORPUS + [
    [SYS, Q2, tool_turn(), RESULT, ANSWER],
    [Q2, TWO_CALLS, RESULT, RESULT2, ANSWER, Q1],
    [Q2, tool_turn(), RESULT],
]


@pytest.mark.parametrize("messages", V31_CORPUS)
@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("gen", [True, False])
def test_v31_equals_checkpoint_template(messages, thinking, gen):
    expected = render_chat_template(reference_template("deepseek-v3.1"), messages, add_generation_prompt=gen,
                                    bos_token=BOS, eos_token=EOS, thinking=thinking)
    assert render("v3.1", messages, thinking=thinking, add_generation_prompt=gen) == expected


def test_v31_exact_prompts():
    assert render("v3.1", [SYS, Q1], thinking=True) == f"{BOS}You are terse.{U}Hi there{A}<think>"
    assert render("v3.1", [Q1, A1, Q2]) == f"{BOS}{U}Hi there{A}</think>Hello!{EOS}{U}Weather in Paris?{A}</think>"
    assert render("v3.1", [Q2, tool_turn(), RESULT]) == (
        f"{BOS}{U}Weather in Paris?{A}</think><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
        '{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>' f"{EOS}"
        '<｜tool▁output▁begin｜>{"temp": 21}<｜tool▁output▁end｜>')


def test_v31_tools_prompt_is_the_model_card_text():
    text = render("v3.1", [Q1], tools=[WEATHER])
    assert text.startswith(f"{BOS}## Tools\nYou have access to the following tools:\n\n### get_weather\n"
                           "Description: Weather of a city\n\nParameters: "
                           '{"type": "object", "properties": {"city": {"type": "string"}}}\n\n'
                           "IMPORTANT: ALWAYS adhere to this exact format for tool use:\n")
    assert "{{additional_tool_calls}}<｜tool▁calls▁end｜>\n\nWhere:\n\n" in text


def test_v31_prefix_completion_matches_template_cut_after_content():
    messages = [Q1, {"role": "assistant", "content": "```python\n", "prefix": True}]
    for thinking in (False, True):
        full = render_chat_template(reference_template("deepseek-v3.1"), messages, add_generation_prompt=False,
                                    bos_token=BOS, eos_token=EOS, thinking=thinking)
        assert render("v3.1", messages, thinking=thinking) == full.removesuffix(EOS)


def test_prefix_completion_classic_and_errors():
    messages = [Q1, {"role": "assistant", "content": "```python\n"}]
    assert render("v3", messages, prefix=True) == f"{BOS}{U}Hi there{A}```python\n"
    assert render("r1", messages, prefix=True) == f"{BOS}{U}Hi there{A}<think>\n\n</think>\n\n```python\n"
    thinking_prefix = [Q1, {"role": "assistant", "content": "", "reasoning_content": "First,", "prefix": True}]
    assert render("r1", thinking_prefix) == f"{BOS}{U}Hi there{A}<think>\nFirst,"
    with pytest.raises(InvalidRequestError, match="last message to be role 'assistant'"):
        render("v3", [Q1], prefix=True)


def test_opens_reasoning_from_prompt():
    assert prompt_opens_reasoning("r1", render("r1", [Q1]))
    assert prompt_opens_reasoning("r1-0528", render("r1-0528", [Q1]))
    assert not prompt_opens_reasoning("r1-0528", render("r1-0528", [Q2, tool_turn(), RESULT]))
    assert prompt_opens_reasoning("v3.1", render("v3.1", [Q1], thinking=True))
    assert not prompt_opens_reasoning("v3.1", render("v3.1", [Q1], thinking=False))
    assert not prompt_opens_reasoning("r1", render("r1", [Q1, {"role": "assistant", "content": "x"}], prefix=True))


def test_fim_prompt_and_ids(tokenizer):
    text = render_fim("def add(a, b):\n", "\n    return c")
    assert text == "<｜fim▁begin｜>def add(a, b):\n<｜fim▁hole｜>\n    return c<｜fim▁end｜>"
    ids = encode_prompt(tokenizer, text)
    assert ids[0] == 128801 and ids[-1] == 128802 and 128800 in ids


def test_token_ids_single_bos_and_special_tokens(tokenizer):
    ids = encode_prompt(tokenizer, render("r1", [Q1]))
    assert ids[:2] == [0, 128803] and ids.count(0) == 1
    assert ids[-3:] == [128804, 128798, tokenizer.token_to_id("Ċ")]  # <｜Assistant｜><think>\n


def test_jinja_variant_renders_checkpoint_template():
    template = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}>{% endif %}")
    variant = ChatVariant(name="jinja", template=template, bos_token="<s>", eos_token="</s>")
    assert render(variant, [Q1]) == "[user]Hi there>"
    continued = render(variant, [Q1, {"role": "assistant", "content": "Sure"}], prefix=True)
    assert continued == "[user]Hi there[assistant]Sure"


def test_transformers_apply_chat_template_agrees(tokenizer, v3_template):
    from tokenizer_files import V3_DIR
    from transformers import AutoTokenizer  # a test dependency: a missing one fails here, never skips

    hf = AutoTokenizer.from_pretrained(str(V3_DIR))
    for messages in PLAIN_CORPUS + SYSTEM_CORPUS + TOOL_CORPUS:
        messages = [dict(m, content=m["content"] or "") for m in messages]  # transformers drops None keys
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render("v3", messages) == text
        assert encode_prompt(tokenizer, text) == hf(text, add_special_tokens=False)["input_ids"]
    distill = reference_template("deepseek-r1-distill")
    for messages in PLAIN_CORPUS:
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=distill)
        assert render("r1-distill-llama", messages) == text
