"""The sampler: each knob checked against a hand computation on a small vocabulary."""

from __future__ import annotations

import math

import pytest
import torch

from whale.engine.controllers import Constraint
from whale.engine.sampler import SamplingState, apply_penalties, sample_one
from whale.errors import InvalidRequestError
from whale.sampling_params import SamplingParams

LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, 3.0])


def _draws(params: SamplingParams, n: int = 400, logits: torch.Tensor = LOGITS) -> list[int]:
    state = SamplingState(params, [0])
    return [sample_one(logits.clone(), state).token_id for _ in range(n)]


def test_greedy_takes_the_argmax():
    assert sample_one(LOGITS.clone(), SamplingState(SamplingParams(temperature=0), [])).token_id == 4


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_single_nan_logit_fails_the_request(temperature):
    poisoned = LOGITS.clone()
    poisoned[2] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        sample_one(poisoned, SamplingState(SamplingParams(temperature=temperature, seed=0), []))


def test_sampling_leaves_the_callers_logits_alone():
    logits = LOGITS.clone()
    params = SamplingParams(temperature=1.0, seed=0, repetition_penalty=1.5, presence_penalty=0.5)
    sample_one(logits, SamplingState(params, [0, 4], [4]), Constraint(banned=frozenset({1})))
    assert torch.equal(logits, LOGITS)


def test_top_k_one_is_greedy_and_top_k_two_keeps_two_tokens():
    assert set(_draws(SamplingParams(temperature=1.0, top_k=1, seed=0), 50)) == {4}
    assert set(_draws(SamplingParams(temperature=1.0, top_k=2, seed=0))) == {0, 4}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = LOGITS.softmax(-1)  # sorted: token 4 (0.61), token 0 (0.22), token 1 (0.08), ...
    assert probs[4] < 0.7 < probs[4] + probs[0]
    assert set(_draws(SamplingParams(temperature=1.0, top_p=0.7, seed=1))) == {0, 4}
    assert set(_draws(SamplingParams(temperature=1.0, top_p=0.5, seed=1), 50)) == {4}


def test_a_top_p_below_float32s_range_keeps_the_top_token():
    """5e-324 is a valid top_p (> 0) that float32 reads as 0: the most likely token must still stay."""
    assert set(_draws(SamplingParams(temperature=1.0, top_p=5e-324, seed=1), 50)) == {4}


def test_a_temperature_too_small_to_divide_by_is_the_argmax():
    huge = torch.tensor([80.0, 79.0, -50.0])  # / 1e-37 overflows float32 to inf for two tokens
    assert set(_draws(SamplingParams(temperature=1e-37, seed=1), 20, huge)) == {0}


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    probs = LOGITS.softmax(-1)
    kept = {i for i in range(5) if probs[i] >= 0.2 * probs.max()}
    assert set(_draws(SamplingParams(temperature=1.0, min_p=0.2, seed=2))) == kept


def test_sampling_follows_the_softmax_distribution():
    draws = _draws(SamplingParams(temperature=2.0, seed=3), 4000)
    expected = (LOGITS / 2.0).softmax(-1)
    for token in range(5):
        assert draws.count(token) / len(draws) == pytest.approx(expected[token].item(), abs=0.03)


def test_same_seed_same_tokens_different_seed_different_tokens():
    a = _draws(SamplingParams(temperature=1.0, seed=7), 40)
    assert a == _draws(SamplingParams(temperature=1.0, seed=7), 40)
    assert a != _draws(SamplingParams(temperature=1.0, seed=8), 40)


def test_penalties_match_the_openai_and_ctrl_formulas():
    state = SamplingState(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), [3])
    state.output_token_ids.extend([0, 0, 2])
    out = apply_penalties(LOGITS.clone(), state)
    # logit - count * frequency - presence, only for generated tokens (the prompt token 3 is untouched)
    assert out.tolist() == pytest.approx([2.0 - 2 * 0.5 - 0.25, 1.0, 0.5 - 0.5 - 0.25, -1.0, 3.0])
    state = SamplingState(SamplingParams(repetition_penalty=2.0), [3])
    state.output_token_ids.append(0)
    out = apply_penalties(LOGITS.clone(), state)
    # positive logits divided, negative multiplied, over prompt and output tokens
    assert out.tolist() == pytest.approx([1.0, 1.0, 0.5, -2.0, 3.0])


def test_logprobs_are_the_log_softmax_of_the_raw_logits():
    sampled = sample_one(LOGITS.clone(), SamplingState(SamplingParams(temperature=0, logprobs=2), []))
    log_z = math.log(sum(math.exp(x) for x in LOGITS.tolist()))
    assert sampled.logprob == pytest.approx(3.0 - log_z, abs=1e-6)
    assert sampled.top_logprobs == pytest.approx({4: 3.0 - log_z, 0: 2.0 - log_z}, abs=1e-6)


def test_constraints_bind_and_logprobs_stay_the_models():
    state = SamplingState(SamplingParams(temperature=0, logprobs=1), [])
    assert sample_one(LOGITS.clone(), state, Constraint(banned=frozenset({4}))).token_id == 0
    forced = sample_one(LOGITS.clone(), state, Constraint(only=2))
    assert forced.token_id == 2 and forced.logprob == pytest.approx(float(LOGITS.log_softmax(-1)[2]))
    sampled = SamplingState(SamplingParams(temperature=1.0, seed=0), [])
    assert {sample_one(LOGITS.clone(), sampled, Constraint(only=2)).token_id for _ in range(20)} == {2}


@pytest.mark.parametrize("bad, field", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(max_tokens=0), "max_tokens"), (dict(logprobs=21), "logprobs"), (dict(stop=[""]), "stop"),
    (dict(presence_penalty=3), "presence_penalty"), (dict(n=2), "n"),
])
def test_invalid_parameters_say_what_to_change(bad, field):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**bad)
