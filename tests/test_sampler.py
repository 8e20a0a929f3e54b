"""The sampler: each knob checked against a hand computation on a small vocabulary, and the batch against its
rows sampled alone."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from whale.engine.controllers import Constraint
from whale.engine.sampler import SampledToken, SamplingState, apply_penalties, sample_batch
from whale.errors import InvalidRequestError
from whale.sampling_params import SamplingParams

LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, 3.0])


def sample_one(logits: torch.Tensor, state: SamplingState, constraint: Constraint | None = None) -> SampledToken:
    """One row through the batch sampler; a failed row raises its exception."""
    result = sample_batch(logits.unsqueeze(0), [state], [constraint])[0]
    if isinstance(result, Exception):
        raise result
    return result


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
    state = SamplingState(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), [3], [0, 0, 2])
    out = LOGITS.clone().unsqueeze(0)
    apply_penalties(out, [state])
    # logit - count * frequency - presence, only for generated tokens (the prompt token 3 is untouched)
    assert out[0].tolist() == pytest.approx([2.0 - 2 * 0.5 - 0.25, 1.0, 0.5 - 0.5 - 0.25, -1.0, 3.0])
    state = SamplingState(SamplingParams(repetition_penalty=2.0), [3], [0])
    out = LOGITS.clone().unsqueeze(0)
    apply_penalties(out, [state])
    # positive logits divided, negative multiplied, over prompt and output tokens
    assert out[0].tolist() == pytest.approx([1.0, 1.0, 0.5, -2.0, 3.0])


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


def _bitmask(allowed: set[int], vocab: int) -> torch.Tensor:
    words = [0] * ((vocab + 31) // 32)
    for token in allowed:
        words[token // 32] |= 1 << (token % 32)
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def _reference(logits: np.ndarray, params: SamplingParams, prompt: list[int], output: list[int],
               constraint: Constraint | None, uniform: float | None) -> int:
    """One row by the textbook, in float64 numpy, independent of the sampler's code."""
    x = logits.astype(np.float64).copy()
    if params.repetition_penalty != 1.0:
        for t in set(prompt) | set(output):
            x[t] = x[t] / params.repetition_penalty if x[t] > 0 else x[t] * params.repetition_penalty
    for t in set(output):
        x[t] -= output.count(t) * params.frequency_penalty + params.presence_penalty
    if constraint is not None and constraint.only is not None:
        return constraint.only
    if constraint is not None:
        keep = np.ones_like(x, dtype=bool) if constraint.mask is None else np.array(
            [(int(constraint.mask[t // 32]) >> (t % 32)) & 1 == 1 for t in range(len(x))])
        keep[list(constraint.banned)] = False
        x[~keep] = -np.inf
    if params.greedy:
        return int(np.argmax(x))
    x = x / params.temperature
    order = np.argsort(-x, kind="stable")
    if 0 < params.top_k < len(x):
        x[x < x[order[params.top_k - 1]]] = -np.inf
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        sorted_probs = probs[order]
        before = np.cumsum(sorted_probs) - sorted_probs
        drop = before >= params.top_p
        drop[0] = False
        probs[order[drop]] = 0.0
        probs /= probs.sum()
    if params.min_p > 0:
        probs[probs < params.min_p * probs.max()] = 0.0
    cumulative = np.cumsum(probs / probs.sum())
    return int(min(np.searchsorted(cumulative, uniform * cumulative[-1], side="right"), len(x) - 1))


def _mixed_batch(vocab: int, rows: int, rng: random.Random):
    """Rows with every knob in many combinations (seeded), their prompts, outputs and constraints."""
    cases = []
    for i in range(rows):
        params = SamplingParams(
            temperature=rng.choice([0.0, 0.3, 0.7, 1.0, 1.5]), top_k=rng.choice([-1, -1, 5, 50]),
            top_p=rng.choice([1.0, 1.0, 0.9, 0.5]), min_p=rng.choice([0.0, 0.0, 0.05]),
            repetition_penalty=rng.choice([1.0, 1.0, 1.3]), frequency_penalty=rng.choice([0.0, 0.5]),
            presence_penalty=rng.choice([0.0, 0.4]), logprobs=rng.choice([None, 0, 3]), seed=1000 + i)
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        output = [rng.randrange(vocab) for _ in range(rng.randrange(0, 20))]
        constraint = rng.choice([None, None, Constraint(only=rng.randrange(vocab)),
                                 Constraint(banned=frozenset(rng.sample(range(vocab), 40))),
                                 Constraint(mask=_bitmask(set(rng.sample(range(vocab), 300)), vocab)),
                                 Constraint(banned=frozenset(range(0, vocab, 2)),
                                            mask=_bitmask(set(rng.sample(range(vocab), 300)), vocab))])
        cases.append((params, prompt, output, constraint))
    return cases


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled masks", "pytorch masks"])
def test_a_mixed_batch_matches_a_float64_reference_row_by_row(monkeypatch, compiled):
    if not compiled:
        monkeypatch.setattr("whale.engine.sampler.cpu_ops", lambda: None)
    vocab, rows = 3001, 48
    rng = random.Random(0)
    cases = _mixed_batch(vocab, rows, rng)
    logits = torch.randn(rows, vocab) * 4
    states = [SamplingState(p, prompt, output) for p, prompt, output, _ in cases]
    # the uniform number each seeded row will draw, from a twin of its generator
    uniforms = [None if p.greedy else float(torch.rand((), generator=torch.Generator().manual_seed(p.seed),
                                                       dtype=torch.float64)) for p, *_ in cases]
    results = sample_batch(logits.clone(), states, [c for *_, c in cases])
    for row, ((params, prompt, output, constraint), result) in enumerate(zip(cases, results, strict=True)):
        expected = _reference(logits[row].numpy(), params, prompt, output, constraint, uniforms[row])
        assert result.token_id == expected, (row, params, constraint)
        if params.logprobs is not None:
            raw = logits[row].double().log_softmax(-1)
            assert result.logprob == pytest.approx(float(raw[expected]), abs=1e-4)
            if params.logprobs:
                values, ids = raw.topk(params.logprobs)
                expected_top = dict(zip(ids.tolist(), values.tolist(), strict=True))
                assert result.top_logprobs == pytest.approx(expected_top, abs=1e-4)
            else:
                assert result.top_logprobs is None


def test_a_seeded_row_gives_the_same_tokens_alone_and_in_any_batch():
    vocab = 4000
    rng = random.Random(1)
    target = SamplingParams(temperature=0.8, top_p=0.9, top_k=100, seed=42, presence_penalty=0.3)
    alone, output = [], []
    steps = [torch.randn(vocab) * 3 for _ in range(20)]
    state = SamplingState(target, [1, 2, 3], output)
    for logits in steps:
        token = sample_batch(logits.unsqueeze(0).clone(), [state])[0].token_id
        alone.append(token)
        output.append(token)
    batched, output = [], []
    state = SamplingState(target, [1, 2, 3], output)
    for logits in steps:
        others = _mixed_batch(vocab, rng.randrange(1, 16), rng)
        position = rng.randrange(len(others) + 1)
        states = [SamplingState(p, prompt, out) for p, prompt, out, _ in others]
        constraints = [c for *_, c in others]
        states.insert(position, state)
        constraints.insert(position, None)
        batch = torch.randn(len(states), vocab) * 3
        batch[position] = logits
        token = sample_batch(batch, states, constraints)[position].token_id
        batched.append(token)
        output.append(token)
    assert batched == alone


def test_a_failing_row_fails_alone():
    vocab = 100

    def broken(output_ids, logits):
        raise RuntimeError("processor bug")

    logits = torch.randn(4, vocab)
    logits[1, 7] = float("nan")
    states = [SamplingState(SamplingParams(temperature=0), []),
              SamplingState(SamplingParams(temperature=1.0, seed=0), []),
              SamplingState(SamplingParams(temperature=0, logits_processors=[broken]), []),
              SamplingState(SamplingParams(temperature=1.0, seed=1), [])]
    empty = Constraint(mask=torch.zeros((vocab + 31) // 32, dtype=torch.int32))
    results = sample_batch(logits.clone(), states, [None, None, None, empty])
    assert results[0].token_id == int(logits[0].argmax())
    assert isinstance(results[1], FloatingPointError) and "NaN" in str(results[1])
    assert isinstance(results[2], RuntimeError) and "processor bug" in str(results[2])
    assert isinstance(results[3], ValueError) and "allows no token" in str(results[3])


@pytest.mark.parametrize("top_p", [0.5, 0.99])
def test_a_nucleus_wider_than_the_first_candidates_is_found(top_p):
    """Nearly flat logits over 5000 tokens: the nucleus holds thousands of tokens, far past the first 64 looked at."""
    vocab = 5000
    logits = torch.randn(24, vocab) * 0.05
    params = [SamplingParams(temperature=1.0, top_p=top_p, seed=s) for s in range(24)]
    uniforms = [float(torch.rand((), generator=torch.Generator().manual_seed(s), dtype=torch.float64))
                for s in range(24)]
    results = sample_batch(logits.clone(), [SamplingState(p, []) for p in params])
    expected = [_reference(logits[i].numpy(), params[i], [], [], None, uniforms[i]) for i in range(24)]
    assert [r.token_id for r in results] == expected
    assert len(set(expected)) > 12  # the draws spread over the wide nucleus
