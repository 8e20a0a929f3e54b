"""Turn a step's next-token logits into tokens, one row per request, in one batch: penalties, temperature,
top-k/top-p/min-p, what the requests' controllers allow, per-request seeded generators (a seed gives the same
tokens whatever else is in the batch: each row draws from its own generator and no row's arithmetic reads another
row), and logprobs. A failure that belongs to one request (a logits processor raising, NaN logits, a grammar that
allows nothing) fails that row only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from whale.engine.controllers import Constraint
from whale.kernels import cpu_ops
from whale.sampling_params import SamplingParams


@dataclass
class SamplingState:
    """What sampling needs to know about one request between steps: its tokens (the request's own lists, or
    read-only views of them) and its generator."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    _prompt_ids: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # the user's hook, built per request: a class is instantiated for this request alone (its state is the
        # request's), a function or an object is used as given
        self.logits_processors = [p() if isinstance(p, type) else p for p in self.params.logits_processors]
        if not self.params.greedy:
            self.generator = torch.Generator()
            if self.params.seed is not None:
                self.generator.manual_seed(self.params.seed)
            else:
                self.generator.seed()

    def seen_token_ids(self) -> torch.Tensor:
        """The prompt's and the output's token ids (with repeats), for the repetition penalty."""
        if self._prompt_ids is None:  # the prompt never changes: made into a tensor once
            self._prompt_ids = torch.tensor(self.prompt_token_ids[:], dtype=torch.long)
        return torch.cat([self._prompt_ids, torch.tensor(self.output_token_ids[:], dtype=torch.long)])


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


def _column(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).unsqueeze(1)


def _token_counts(rows: list[torch.Tensor], vocab: int) -> torch.Tensor:
    """[len(rows), vocab]: how often each token occurs in each row's ids, in one bincount."""
    offsets = [ids + i * vocab for i, ids in enumerate(rows)]
    return torch.bincount(torch.cat(offsets), minlength=len(rows) * vocab).view(len(rows), vocab)


def apply_penalties(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    """In place on logits [rows, vocab]: the repetition penalty (CTRL: over prompt and output tokens, positive
    logits divided, negative multiplied), then frequency and presence (OpenAI: over output tokens,
    `count * frequency + presence` subtracted)."""
    vocab = logits.shape[1]
    repeated = [i for i, s in enumerate(states) if s.params.repetition_penalty != 1.0]
    if repeated:
        seen = _token_counts([states[i].seen_token_ids() for i in repeated], vocab) > 0
        penalty = _column([states[i].params.repetition_penalty for i in repeated])
        rows = logits[repeated]
        logits[repeated] = torch.where(seen, torch.where(rows > 0, rows / penalty, rows * penalty), rows)
    counted = [i for i, s in enumerate(states)
               if (s.params.frequency_penalty or s.params.presence_penalty) and len(s.output_token_ids)]
    if counted:
        counts = _token_counts([torch.tensor(states[i].output_token_ids[:], dtype=torch.long) for i in counted],
                               vocab).to(logits.dtype)
        frequency = _column([states[i].params.frequency_penalty for i in counted])
        presence = _column([states[i].params.presence_penalty for i in counted])
        logits[counted] -= frequency * counts + presence * (counts > 0)


_BITS = torch.arange(32, dtype=torch.int32)


def allowed_tokens(mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Int32 bitmasks [..., words] (bit i of word i // 32) as bool tensors [..., vocab_size]."""
    return ((mask.unsqueeze(-1) >> _BITS) & 1).flatten(-2)[..., :vocab_size].bool()


def _constrain(logits: torch.Tensor, constraints: Sequence[Constraint | None], failed: dict[int, Exception]) -> None:
    """In place: each row limited to what its constraint allows; a row whose grammar allows nothing fails."""
    masked = [i for i, c in enumerate(constraints) if c is not None and c.only is None and c.mask is not None]
    if masked:  # every grammar of the batch at once
        words = torch.stack([constraints[i].mask for i in masked])
        for i, empty in zip(masked, (words == 0).all(1).tolist(), strict=True):
            if empty:
                failed[i] = ValueError("the output grammar allows no token here")
        ops = cpu_ops() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
        if ops is not None:  # in place, one pass (the compiled kernel)
            ops.mask_logits_(logits, words, torch.tensor(masked))
        else:
            rows = _subset(logits, masked).masked_fill_(~allowed_tokens(words, logits.shape[1]), float("-inf"))
            if rows is not logits:
                logits[masked] = rows
        # the model gives every allowed token -inf: pick among them evenly
        for index in (_subset(logits, masked).amax(1) == float("-inf")).nonzero().flatten().tolist():
            row = masked[index]
            logits[row] = torch.where(allowed_tokens(words[index], logits.shape[1]), 0.0, float("-inf"))
    for i, constraint in enumerate(constraints):
        if constraint is None:
            continue
        row = logits[i]
        if constraint.only is not None:
            kept = row[constraint.only].clone()
            row.fill_(float("-inf"))
            row[constraint.only] = kept if torch.isfinite(kept) else 0.0
        elif constraint.banned:
            row[sorted(constraint.banned)] = float("-inf")


CANDIDATES = 64  # top-p looks for its nucleus among the most likely tokens first: 16x more until they hold it
BLOCK = 512  # the inverse CDF finds a block of the vocabulary, then the token inside it


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One index per row of `weights` [rows, n] (unnormalised, >= 0): the first whose cumulative sum passes
    uniform * total, summed in float64 (never an index of weight 0). Block sums first, then a cumulative sum
    inside the chosen block only: no full-width float64 copy of the weights."""
    rows, n = weights.shape
    whole = n // BLOCK * BLOCK
    sums = [weights[:, :whole].reshape(rows, -1, BLOCK).sum(2, dtype=torch.float64)] if whole else []
    if whole < n:
        sums.append(weights[:, whole:].sum(1, keepdim=True, dtype=torch.float64))
    cumulative = torch.cat(sums, 1).cumsum(1)
    points = (uniforms * cumulative[:, -1]).unsqueeze(1)
    block = torch.searchsorted(cumulative, points, right=True).clamp_(max=cumulative.shape[1] - 1)
    before = torch.where(block > 0, cumulative.gather(1, (block - 1).clamp(min=0)), 0.0)
    columns = block * BLOCK + torch.arange(BLOCK)
    inside = torch.where(columns < n, weights.gather(1, columns.clamp(max=n - 1)), 0.0).double().cumsum(1)
    # the point inside its block, kept below the block's own total (rounding may differ between the two sums)
    below_total = torch.nextafter(inside[:, -1:], torch.zeros(1, dtype=torch.float64))
    local = torch.minimum((points - before).clamp_(min=0.0), below_total)
    offset = torch.searchsorted(inside, local, right=True).clamp_(max=BLOCK - 1)
    return (block * BLOCK + offset).squeeze(1)


def _uniforms(generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One uniform number in [0, 1) per row, from the row's own generator."""
    return torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])


def _column_of(params: Sequence[SamplingParams], name: str) -> torch.Tensor:
    return _column([getattr(p, name) for p in params])


def _draw_full(rows: torch.Tensor, params: Sequence[SamplingParams], uniforms: torch.Tensor) -> torch.Tensor:
    """Rows without top-k or top-p (logits over temperature, overwritten): min-p, then a draw over the whole
    vocabulary."""
    weights = rows.sub_(rows.amax(1, keepdim=True)).exp_()  # each probability over the largest one
    floor = [i for i, p in enumerate(params) if p.min_p > 0]
    if floor:
        weights[floor] = weights[floor].masked_fill_(weights[floor] < _column_of([params[i] for i in floor],
                                                                                 "min_p"), 0.0)
    return _inverse_cdf(weights, uniforms)


def _draw_narrowed(rows: torch.Tensor, params: Sequence[SamplingParams], uniforms: torch.Tensor) -> torch.Tensor:
    """Rows with top-k or top-p (logits over temperature): the draw among the most likely tokens only, which hold
    the top-k set and the top-p nucleus (the smallest set of most likely tokens whose mass reaches top_p: found
    among CANDIDATES tokens, else 16x more, up to the whole vocabulary), then min-p; sorting the whole vocabulary
    cost 4 ms a row at 49k tokens and 14 ms at 152k (bench/constrained.py)."""
    vocab = rows.shape[1]
    tokens = torch.zeros(len(params), dtype=torch.long)
    limits = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params])
    free = limits == vocab  # top-p alone: normalised over the whole vocabulary
    lse = rows.logsumexp(1, keepdim=True) if bool(free.any()) else None
    top_p, min_p = _column_of(params, "top_p"), _column_of(params, "min_p")
    pending, width = torch.arange(len(params)), CANDIDATES
    while len(pending):
        everyone = len(pending) == len(params)
        limit = limits if everyone else limits[pending]
        k = min(vocab, max(width, int(limit.masked_fill(limit == vocab, 0).max())))
        values, ids = (rows if everyone else rows[pending]).topk(k, dim=1)
        values.masked_fill_(torch.arange(k) >= limit.unsqueeze(1), float("-inf"))  # past a row's own top-k
        own = free if everyone else free[pending]
        if lse is None:
            norm = values.logsumexp(1, keepdim=True)
        else:
            norm = torch.where(own.unsqueeze(1), lse if everyone else lse[pending], values.logsumexp(1, keepdim=True))
        probs = values.sub_(norm).exp_()
        p_cut = top_p if everyone else top_p[pending]
        # the nucleus lies among these candidates when their mass reaches top_p (a top-k row holds all its mass)
        held = (probs.sum(1) >= p_cut.squeeze(1)) | ~own | (k == vocab)
        drop = (probs.cumsum(1) - probs) >= p_cut  # the mass before a token already reaches top_p
        drop[:, 0] = False  # a top_p below float32's smallest number (5e-324) reads as 0: the top token stays
        probs.masked_fill_(drop, 0.0)
        probs.masked_fill_(probs < (min_p if everyone else min_p[pending]) * probs[:, :1], 0.0)
        if not bool(held.all()):
            probs, ids = probs[held], ids[held]
        # in vocabulary order, as the whole-vocabulary draw goes (the same uniform picks the same token)
        if len(ids):
            ids, order = ids.sort(1)
            chosen = _inverse_cdf(probs.gather(1, order), uniforms[pending[held]])
            tokens[pending[held]] = ids.gather(1, chosen.unsqueeze(1)).squeeze(1)
        pending, width = pending[~held], width * 16
    return tokens


def draw(logits: torch.Tensor, params: Sequence[SamplingParams],
         generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row of `logits` [rows, vocab] (overwritten) under each row's temperature, top-k, top-p and
    min-p, by inverse CDF in vocabulary order: one uniform number from each row's own generator. torch.multinomial
    does the same job ~20x slower on a CPU (2 ms against 0.09 ms for 49k tokens)."""
    logits.div_(_column_of(params, "temperature"))
    uniforms = _uniforms(generators)
    vocab = logits.shape[1]
    narrowed = [i for i, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1.0]
    whole = [i for i in range(len(params)) if i not in set(narrowed)]
    tokens = torch.zeros(len(params), dtype=torch.long)
    if whole:
        tokens[whole] = _draw_full(_subset(logits, whole), [params[i] for i in whole], uniforms[whole])
    if narrowed:
        tokens[narrowed] = _draw_narrowed(_subset(logits, narrowed), [params[i] for i in narrowed],
                                          uniforms[narrowed])
    return tokens.tolist()


def _subset(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The rows (a copy), or the tensor itself when they are all of it, in order."""
    if rows == list(range(len(tensor))):
        return tensor
    return tensor.index_select(0, torch.tensor(rows))


def sample_batch(logits: torch.Tensor, states: Sequence[SamplingState],
                 constraints: Sequence[Constraint | None] | None = None) -> list[SampledToken | Exception]:
    """logits: [rows, vocab] float32, one row per request (overwritten). `constraints`: per row, what the
    request's controllers allow next; logprobs stay the model's own distribution. Returns per row the token, or
    the exception that failed that row."""
    constraints = constraints if constraints is not None else [None] * len(states)
    params = [s.params for s in states]
    failed: dict[int, Exception] = {}
    scored = [i for i, p in enumerate(params) if p.logprobs is not None]
    raw_logprobs = _subset(logits, scored).log_softmax(1) if scored else None
    apply_penalties(logits, states)
    for i, state in enumerate(states):
        try:
            for processor in state.logits_processors:
                logits[i] = processor(state.output_token_ids, logits[i])
        except Exception as exc:  # noqa: BLE001 - a user's hook raising fails its own request
            failed[i] = exc
    _constrain(logits, constraints, failed)
    for i in torch.isnan(logits.amax(1)).nonzero().flatten().tolist():  # amax passes a NaN on, ~5x faster than isnan
        failed.setdefault(i, FloatingPointError("the logits hold NaN"))
    tokens = [0] * len(states)
    greedy = [i for i, p in enumerate(params) if p.greedy and i not in failed]
    if greedy:
        for i, token in zip(greedy, _subset(logits, greedy).argmax(1).tolist(), strict=True):
            tokens[i] = token
    sampled = [i for i, p in enumerate(params) if not p.greedy and i not in failed]
    if sampled:
        drawn = draw(_subset(logits, sampled), [params[i] for i in sampled], [states[i].generator for i in sampled])
        for i, token in zip(sampled, drawn, strict=True):
            tokens[i] = token
    results: list[SampledToken | Exception] = [failed.get(i) or SampledToken(t) for i, t in enumerate(tokens)]
    for row, i in enumerate(scored):
        if i in failed:
            continue
        logprobs, count = raw_logprobs[row], params[i].logprobs
        top = None
        if count:
            values, ids = logprobs.topk(count)
            top = dict(zip(ids.tolist(), values.tolist(), strict=True))
        results[i] = SampledToken(tokens[i], float(logprobs[tokens[i]]), top)
    return results


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
