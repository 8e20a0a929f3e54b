"""The engine loop: `add_request`, then `step()` = schedule -> one forward over the batch -> sample -> update.

The scheduler (scheduler.py) picks each step's tokens under a token budget: decode tokens and prefill chunks
of many requests, which the runner (runner.py) flattens into one ragged batch for one forward. The model reads
and writes the paged KV cache (paged_attention.py) through the step's layout; finished and aborted requests
release their blocks at once, which stay cached for prefix hits until evicted.

With speculative decoding (`EngineConfig.speculative`), a proposer (proposers.py) guesses a few tokens after each
decoding request's last one; the next step computes them behind it, and the sampler verifies them one position
at a time: it samples each position from the target's own logits, with every control of the request applied
(penalties, grammar, budget, stops, the request's seeded generator), and moves on to the next position only while
the token drawn equals the draft. Every token is drawn exactly as without speculation, in the same order from the
same generator, so the output distribution, a seeded reply and every constraint are unchanged; a draft only
decides how many tokens one forward yields. No controller ever sees a token it must take back, and the cache keeps
the K/V of rejected drafts only in slots the next step overwrites (blocks are registered for prefix hits only
as far as verified tokens fill them).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch

from whale.engine.paged_attention import DEFAULT_KV_CACHE_BYTES, create_cache
from whale.engine.proposers import VerifiedStep, build_proposer
from whale.engine.request import Request
from whale.engine.runner import ModelRunner, StepHidden
from whale.engine.sampler import sample_batch, score_tokens
from whale.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from whale.errors import InvalidRequestError
from whale.models.loader import LoadedModel
from whale.sampling_params import SamplingParams

log = logging.getLogger("whale.engine")
PROMPT_SCORING_ROWS = 256  # prompt positions whose logits are computed at once (256 x a 152K vocabulary: 156 MB)


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    block_size: int = 16
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES
    num_kv_blocks: int | None = None  # overrides kv_cache_bytes
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # caps the context below the model's (None: the model's, or the cache's)
    speculative: str = "off"  # draft proposer: off, ngram, mtp (proposers.SPECULATIVE_METHODS)
    num_speculative_tokens: int | None = None  # drafts per step (None: the proposer's default)


@dataclass
class SpeculationStats:
    """Speculative decoding so far: draft tokens verified, accepted, and the request-steps that verified any
    (each yields its accepted drafts plus one token of its own)."""

    drafted: int = 0
    accepted: int = 0
    verifications: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verifying forward: accepted drafts + the one the target always gives."""
        return 1 + self.accepted / self.verifications if self.verifications else 0.0


def eos_token_ids(loaded: LoadedModel) -> frozenset[int]:
    """The tokens that end a generation: the config's and the tokenizer's end of sequence."""
    tokenizer = loaded.tokenizer
    return frozenset(loaded.config.eos_token_ids) | (
        {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        self.loaded = loaded
        self.config = config or EngineConfig()
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = eos_token_ids(loaded)
        c = self.config
        model_len = self.model_config.max_position_embeddings
        if c.max_model_len is not None and not 1 < c.max_model_len <= model_len:
            raise InvalidRequestError(f"max_model_len {c.max_model_len} must be in [2, {model_len}] (the model's "
                                      "context)")
        self.cache = create_cache(loaded.model.kv_cache_spec(), loaded.dtype, loaded.device, c.num_kv_blocks,
                                  c.block_size, c.kv_cache_bytes, c.enable_prefix_caching, c.max_num_seqs,
                                  c.max_num_batched_tokens)
        self.scheduler = Scheduler(SchedulerConfig(c.max_num_seqs, c.max_num_batched_tokens), self.cache.blocks)
        self.runner = ModelRunner(loaded, self.cache)
        self.proposer, self.num_speculative_tokens = build_proposer(c.speculative, c.num_speculative_tokens,
                                                                    loaded.model, self.cache)
        self.speculation = SpeculationStats()
        self.requests: dict[str, Request] = {}
        self._id_counter = itertools.count()

    @property
    def max_model_len(self) -> int:
        """Longest sequence (prompt + completion) served: the model's context, or the whole KV cache or the
        configured cap if smaller."""
        return min(self.model_config.max_position_embeddings, self.cache.num_tokens_capacity,
                   self.config.max_model_len or self.model_config.max_position_embeddings)

    def check_prompt(self, prompt_token_ids: list[int]) -> None:
        """Refuse a prompt this engine can never serve; reads no mutable state, so any thread may call it."""
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty: send at least one token")
        limit = self.max_model_len
        if len(prompt_token_ids) >= limit:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_token_ids)} tokens but this model serves at most {limit} tokens "
                f"including the completion: shorten the prompt")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    prompt: str | None = None) -> Request:
        self.check_prompt(prompt_token_ids)
        limit = self.max_model_len
        request_id = request_id or f"req-{next(self._id_counter)}"
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        request = Request(request_id, prompt_token_ids, params, self.tokenizer, limit, self.eos_token_ids, prompt,
                          self.model_config.vocab_size)
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its blocks."""
        request = self.requests.get(request_id)
        if request is not None:
            request.abort()
            self._retire(request)

    def _retire(self, request: Request) -> None:
        """Drop a finished request: its blocks go back (cached), its proposer state goes."""
        self.requests.pop(request.request_id, None)
        self.scheduler.finish(request)
        if self.proposer is not None:
            self.proposer.release(request.request_id)

    def _fail(self, request: Request, message: str) -> None:
        request.fail(message)
        self._retire(request)

    def _score_prompt(self, request: Request, hidden: torch.Tensor) -> None:
        """Record the prompt logprobs this step's tokens of `request` give (the rows at positions
        num_computed_tokens..), each predicting the prompt token after it; positions scored before a preemption
        are not scored again."""
        start, prompt = request.num_computed_tokens, request.prompt_token_ids
        first = len(request.prompt_logprobs) - 1 - start  # the first row whose next token is not yet scored
        end = min(len(hidden), len(prompt) - 1 - start)  # rows past the prompt's second-to-last token: no target
        for lo in range(max(first, 0), end, PROMPT_SCORING_ROWS):
            hi = min(lo + PROMPT_SCORING_ROWS, end)
            logits = self.runner.logits(hidden[lo:hi])
            targets = prompt[start + lo + 1:start + hi + 1]
            request.prompt_logprobs.extend(score_tokens(logits, targets, request.params.prompt_logprobs))

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Run one scheduled step; returns the requests that produced a token (finished ones included)."""
        batch = self.scheduler.schedule()
        if not batch.requests:
            return []
        try:
            hidden = self.runner.execute(batch)
        except Exception as exc:  # noqa: BLE001 - a failed forward ends this batch's requests, not the engine
            for request in batch.requests:
                self._fail(request, f"the model failed on this batch: {exc}")
            return batch.requests
        starts = [r.num_computed_tokens for r in batch.requests]
        sampling_rows = []
        for row, (request, count, drafts) in enumerate(zip(batch.requests, batch.num_new_tokens, batch.drafts,
                                                           strict=True)):
            if request.params.prompt_logprobs is not None:
                self._score_prompt(request, hidden.of(row))
            request.num_computed_tokens += count - len(drafts)  # the drafts' K/V count once verified
            if request.num_computed_tokens == request.num_tokens:  # not mid-way through a prefill
                sampling_rows.append(row)
            else:
                self._register(request)
        produced = [batch.requests[row] for row in sampling_rows]
        accepted = dict(zip(sampling_rows, self._sample(batch, hidden, sampling_rows), strict=True))
        if self.proposer is not None:
            self._propose(batch, hidden, starts, accepted)
        return produced

    def _register(self, request: Request) -> None:
        self.cache.blocks.register_full_blocks(request.request_id, request.all_token_ids,
                                               request.num_computed_tokens)

    def _sample(self, batch: ScheduledBatch, hidden: StepHidden, rows: list[int]) -> list[int]:
        """Sample the next token of each request of `rows` (indices into the batch) and verify its drafts: one
        masked batch per position, position j for the requests whose tokens so far all equalled their drafts.
        Returns per row the drafts accepted."""
        if not rows:
            return []
        requests = [batch.requests[row] for row in rows]
        drafts = [batch.drafts[row] for row in rows]
        logits = self.runner.logits(hidden.tails(rows, [len(d) + 1 for d in drafts]))
        first = list(itertools.accumulate([0] + [len(d) + 1 for d in drafts]))  # each request's first row
        accepted = [0] * len(rows)
        active = list(range(len(rows)))
        for position in itertools.count():
            # what each request's controllers allow next (a controller failing ends its own request only)
            live, constraints = [], []
            for i in active:
                try:
                    constraints.append(requests[i].constraint())
                except Exception as exc:  # noqa: BLE001
                    self._fail(requests[i], f"the request's output controls failed: {exc}")
                    continue
                live.append(i)
            if not live:
                break
            picked = [first[i] + position for i in live]
            position_logits = logits if picked == list(range(len(logits))) else logits[picked]
            results = sample_batch(position_logits, [requests[i].sampling for i in live], constraints)
            active = []
            for i, result in zip(live, results, strict=True):
                request = requests[i]
                if isinstance(result, Exception):  # e.g. a logits processor raising: only this request ends
                    self._fail(request, f"sampling failed: {result}")
                    continue
                request.append(result)
                if request.status.finished:
                    self._settle(request, accepted[i], drafts[i])
                elif position < len(drafts[i]) and result.token_id == drafts[i][position]:
                    accepted[i] += 1
                    active.append(i)
                else:
                    self._settle(request, accepted[i], drafts[i])
            if not active:
                break
        return accepted

    def _settle(self, request: Request, accepted: int, drafts: list[int]) -> None:
        """A request's verification is over: its accepted drafts' K/V count as computed, its full blocks become
        prefix hits; a finished request leaves."""
        request.num_computed_tokens += accepted
        self._register(request)
        if drafts:
            stats = self.speculation
            stats.drafted += len(drafts)
            stats.accepted += accepted
            stats.verifications += 1
        if request.status.finished:
            self._retire(request)

    def _propose(self, batch: ScheduledBatch, hidden: StepHidden, starts: list[int],
                 accepted: dict[int, int]) -> None:
        """Draft the next tokens of every request that goes on decoding."""
        verified = [hidden.of(row)[:count - len(drafts) + accepted.get(row, 0)]
                    for row, (count, drafts) in enumerate(zip(batch.num_new_tokens, batch.drafts, strict=True))]
        room = [self._draft_room(r) for r in batch.requests]
        try:
            proposed = self.proposer.propose(VerifiedStep(batch.requests, verified, starts), room)
        except Exception as exc:  # noqa: BLE001 - drafts only save time: without them every request goes on
            log.warning("the draft proposer failed; this step's requests decode without drafts: %s", exc)
            return
        for request, drafts in zip(batch.requests, proposed, strict=True):
            request.draft_token_ids = drafts

    def _draft_room(self, request: Request) -> int:
        """How many drafts the request can use next step: none unless it is decoding; never past its length
        limits (the drafts and the token after them must fit)."""
        if request.status.finished or request.num_computed_tokens != request.num_tokens - 1:
            return 0
        limit = request.max_total_tokens
        if request.params.max_tokens is not None:
            limit = min(limit, request.num_prompt_tokens + request.params.max_tokens)
        return max(0, min(self.num_speculative_tokens, limit - request.num_tokens - 1))
