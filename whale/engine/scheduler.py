"""Continuous batching by token budget (vLLM v1's shape): each step gives running requests their next tokens
(a decode token or the next prefill chunk), then admits waiting requests FCFS while the budget, `max_num_seqs`
and the KV blocks last. A prefill longer than the budget is chunked across steps, mixed with decodes. When blocks
run out, the most recently admitted request is preempted: its blocks are freed and it is recomputed later
(its prefix-cached blocks usually make that cheap). A decoding request's draft tokens (speculative decoding) ride
along behind its last token on the budget every other token of the step left (so prompt chunks are cut where
they would be without drafts) while the blocks allow, and are dropped before anyone is preempted."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from whale.engine.kv_cache import BlockManager
from whale.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024  # the token budget of one step; longer prefills are chunked


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # drafts included
    drafts: list[list[int]] = field(default_factory=list)  # the draft tokens that end each request's new tokens
    preempted: list[Request] = field(default_factory=list)

    def add(self, request: Request, count: int, drafts: list[int] | None = None) -> None:
        self.requests.append(request)
        self.num_new_tokens.append(count)
        self.drafts.append(drafts or [])


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def _preempt(self, victim: Request, batch: ScheduledBatch) -> None:
        self.running.remove(victim)
        self.blocks.free(victim.request_id)
        victim.num_computed_tokens = 0
        victim.draft_token_ids = []
        victim.status = RequestStatus.WAITING
        victim.num_preemptions += 1
        self.waiting.appendleft(victim)
        batch.preempted.append(victim)

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> tuple[int, list[tuple[int, list[int]]]]:
        """Each running request's next tokens; returns the budget left and the drafts on offer, by batch index."""
        offered = []
        for request in list(self.running):
            if request not in self.running or budget == 0:
                continue  # preempted earlier in this loop
            pending = request.num_tokens - request.num_computed_tokens
            drafts = request.draft_token_ids if pending == 1 else []
            request.draft_token_ids = []
            count = min(pending, budget)
            while not self.blocks.grow(request.request_id, request.num_computed_tokens + count):
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is request:
                    break
            else:
                if drafts:
                    offered.append((len(batch.requests), drafts))
                batch.add(request, count)
                budget -= count
        return budget, offered

    def _add_drafts(self, batch: ScheduledBatch, budget: int, offered: list[tuple[int, list[int]]]) -> None:
        """Drafts behind their requests' decode tokens, on what budget is left, where blocks allow (else none)."""
        for index, drafts in offered:
            request, drafts = batch.requests[index], drafts[:budget]
            if not drafts or not self.blocks.grow(request.request_id, request.num_computed_tokens + 1 + len(drafts)):
                continue
            batch.num_new_tokens[index] += len(drafts)
            batch.drafts[index] = list(drafts)
            budget -= len(drafts)

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            # a request scoring its prompt needs every prompt position's logits: nothing from the cache
            hits = self.blocks.allocate_prefix(request.request_id, request.all_token_ids,
                                               use_cache=request.params.prompt_logprobs is None)
            count = min(request.num_tokens - hits, budget)
            if not self.blocks.grow(request.request_id, hits + count):
                self.blocks.free(request.request_id)
                break
            if request.num_preemptions == 0:
                request.num_cached_tokens = hits
            request.num_computed_tokens = hits
            request.status = RequestStatus.RUNNING
            self.waiting.popleft()
            self.running.append(request)
            batch.add(request, count)
            budget -= count
        return budget

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget, offered = self._schedule_running(batch, self.config.max_num_batched_tokens)
        if not batch.preempted:  # nothing new while running requests are short of blocks
            budget = self._admit_waiting(batch, budget)
        self._add_drafts(batch, budget, offered)
        return batch

    def finish(self, request: Request) -> None:
        """Drop a finished or aborted request and release its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.blocks.free(request.request_id)
