"""The engine loop: `add_request`, then `step()` = schedule -> one forward over the batch -> sample -> update.

The scheduler (scheduler.py) picks each step's tokens under a token budget: decode tokens and prefill chunks
of many requests, which the runner (runner.py) flattens into one ragged batch for one forward. The model reads
and writes the paged KV cache (paged_attention.py) through the step's layout; finished and aborted requests
release their blocks at once, which stay cached for prefix hits until evicted.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from whale.engine.paged_attention import DEFAULT_KV_CACHE_BYTES, create_cache
from whale.engine.request import Request
from whale.engine.runner import ModelRunner
from whale.engine.sampler import sample_batch, score_tokens
from whale.engine.scheduler import Scheduler, SchedulerConfig
from whale.errors import InvalidRequestError
from whale.models.loader import LoadedModel
from whale.sampling_params import SamplingParams

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
                                  c.block_size, c.kv_cache_bytes, c.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(c.max_num_seqs, c.max_num_batched_tokens), self.cache.blocks)
        self.runner = ModelRunner(loaded, self.cache)
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
        request = self.requests.pop(request_id, None)
        if request is not None:
            request.abort()
            self.scheduler.finish(request)

    def _fail(self, request: Request, message: str) -> None:
        request.fail(message)
        self.requests.pop(request.request_id, None)
        self.scheduler.finish(request)

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
        sampling_rows = []
        for row, (request, count) in enumerate(zip(batch.requests, batch.num_new_tokens, strict=True)):
            if request.params.prompt_logprobs is not None:
                self._score_prompt(request, hidden.of(row))
            request.num_computed_tokens += count
            self.cache.blocks.register_full_blocks(request.request_id, request.all_token_ids,
                                                   request.num_computed_tokens)
            if request.num_computed_tokens == request.num_tokens:  # not mid-way through a prefill
                sampling_rows.append(row)
        if not sampling_rows:
            return []
        produced = [batch.requests[row] for row in sampling_rows]
        # what each request's controllers allow next (a controller failing ends its own request only)
        live, constraints = [], []
        for index, request in enumerate(produced):
            try:
                constraints.append(request.constraint())
            except Exception as exc:  # noqa: BLE001
                self._fail(request, f"the request's output controls failed: {exc}")
                continue
            live.append(index)
        if not live:
            return produced
        logits = self.runner.logits(hidden.last([sampling_rows[i] for i in live]))
        requests = [produced[i] for i in live]
        results = sample_batch(logits, [r.sampling for r in requests], constraints)  # one masked sample
        for request, result in zip(requests, results, strict=True):
            if isinstance(result, Exception):  # e.g. a logits processor raising: only this request ends
                self._fail(request, f"sampling failed: {result}")
                continue
            request.append(result)
            if request.status.finished:
                del self.requests[request.request_id]
                self.scheduler.finish(request)
        return produced
