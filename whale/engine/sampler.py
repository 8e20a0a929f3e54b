"""Turn each sequence's next-token logits into a token: penalties, temperature, top-k/top-p/min-p, per-request
seeded generators (a seed gives the same tokens whatever else is in the batch), and logprobs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from whale.engine.controllers import Constraint
from whale.sampling_params import SamplingParams


@dataclass
class SamplingState:
    """What sampling needs to remember about one request between steps."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not self.params.greedy:
            self.generator = torch.Generator()
            if self.params.seed is not None:
                self.generator.manual_seed(self.params.seed)
            else:
                self.generator.seed()


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


def apply_penalties(logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
    p = state.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(state.prompt_token_ids) | set(state.output_token_ids)), dtype=torch.long)
        if len(seen):
            values = logits[seen]
            logits[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and state.output_token_ids:
        ids, counts = torch.tensor(state.output_token_ids).unique(return_counts=True)
        logits[ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty
    return logits


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Mask to -inf what top-k, top-p and min-p exclude (logits already divided by temperature)."""
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p; the first token always stays (a top_p
        # below float32's smallest number, such as 5e-324, compares as 0 and would drop it too)
        drop = (cumulative - sorted_logits.softmax(-1)) >= p.top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


_BITS = torch.arange(32, dtype=torch.int32)


def allowed_tokens(mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """An int32 bitmask (bit i of word i // 32) as a bool tensor over the vocabulary."""
    return ((mask.unsqueeze(1) >> _BITS) & 1).flatten()[:vocab_size].bool()


def _constrain(logits: torch.Tensor, constraint: Constraint) -> torch.Tensor:
    if constraint.only is not None:
        kept = logits[constraint.only].clone()
        logits.fill_(float("-inf"))
        logits[constraint.only] = kept if torch.isfinite(kept) else 0.0
        return logits
    if constraint.mask is not None:
        allowed = allowed_tokens(constraint.mask, logits.shape[-1])
        if not allowed.any():
            raise ValueError("the output grammar allows no token here")
        logits.masked_fill_(~allowed, float("-inf"))
        if not torch.isfinite(logits).any():  # the model gives every allowed token -inf: pick among them evenly
            logits.masked_fill_(allowed, 0.0)
    if constraint.banned:
        logits[sorted(constraint.banned)] = float("-inf")
    return logits


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from `probs` by inverse CDF: one uniform number from the request's own generator (so a seed gives
    the same tokens whatever else is in the batch) against the cumulative sum in float64. torch.multinomial does the
    same job ~20x slower on a CPU (2 ms against 0.09 ms for 49k tokens): at 16 rows it was most of a step's sampling."""
    cumulative = probs.double().cumsum(0)
    point = torch.rand((), generator=generator, dtype=torch.float64) * cumulative[-1]
    # the first token whose cumulative sum passes the point: never one of probability 0
    return int(torch.searchsorted(cumulative, point.reshape(1), right=True).clamp_(max=len(probs) - 1))


def sample_one(logits: torch.Tensor, state: SamplingState, constraint: Constraint | None = None) -> SampledToken:
    """logits: [vocab] float32 for one request. `constraint`: what the request's controllers allow next (a forced
    token, banned ones); logprobs stay the model's own distribution."""
    p = state.params
    raw_logprobs = logits.log_softmax(-1) if p.logprobs is not None else None
    penalised = p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty
    if penalised or constraint or p.logits_processors:  # they write into the logits: work on a copy
        logits = apply_penalties(logits.clone(), state)
    for processor in p.logits_processors:
        logits = processor(state.output_token_ids, logits)
    if constraint is not None:
        logits = _constrain(logits, constraint)
    if p.greedy:  # argmax picks a NaN if there is one: checking the winner checks them all
        token = int(logits.argmax())
        if math.isnan(logits[token]):
            raise FloatingPointError("the logits hold NaN")
    else:
        if torch.isnan(logits).any():
            raise FloatingPointError("the logits hold NaN")
        probs = _filter(logits / p.temperature, p).softmax(-1)
        token = draw(probs, state.generator)
    if raw_logprobs is None:
        return SampledToken(token)
    top = None
    if p.logprobs:
        values, ids = raw_logprobs.topk(p.logprobs)
        top = dict(zip(ids.tolist(), values.tolist(), strict=True))
    return SampledToken(token, float(raw_logprobs[token]), top)


def score_tokens(logits: torch.Tensor, targets: list[int], top: int) -> list[SampledToken]:
    """How likely each of `targets` was under its row of `logits` [len(targets), vocab] (the model's raw
    distribution, as vLLM's prompt logprobs), with the `top` most likely alternatives."""
    logprobs = logits.log_softmax(-1)
    chosen = logprobs.gather(1, torch.tensor(targets).unsqueeze(1)).squeeze(1).tolist()
    if not top:
        return [SampledToken(t, lp) for t, lp in zip(targets, chosen, strict=True)]
    values, ids = logprobs.topk(top, dim=-1)
    return [SampledToken(t, lp, dict(zip(i, v, strict=True)))
            for t, lp, i, v in zip(targets, chosen, ids.tolist(), values.tolist(), strict=True)]
