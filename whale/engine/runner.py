"""One forward over a scheduled batch: every request's new tokens (prefill chunks and decode tokens alike) are
flattened into one ragged batch, the paged cache is given the step's layout (where each token's K/V goes and
which blocks make up its context), and the model runs once over all of them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from whale.engine.paged_attention import PagedKVCache
from whale.engine.request import Request
from whale.engine.scheduler import ScheduledBatch
from whale.models.layers import prompt_step
from whale.models.loader import LoadedModel


@dataclass
class StepHidden:
    """One step's final hidden states [tokens, hidden]; request i's tokens are rows offsets[i]:offsets[i + 1]."""

    hidden: torch.Tensor
    offsets: list[int]

    def tails(self, requests: list[int], counts: list[int]) -> torch.Tensor:
        """The hidden states of the last counts[j] scheduled tokens of each of `requests` (indices into the
        batch), request after request."""
        rows = [r for i, n in zip(requests, counts, strict=True) for r in range(self.offsets[i + 1] - n,
                                                                                  self.offsets[i + 1])]
        return self.hidden if rows == list(range(len(self.hidden))) else self.hidden[rows]

    def of(self, request: int) -> torch.Tensor:
        return self.hidden[self.offsets[request]:self.offsets[request + 1]]


class ModelRunner:
    def __init__(self, loaded: LoadedModel, cache: PagedKVCache):
        self.model, self.device, self.cache = loaded.model, loaded.device, cache

    def execute(self, batch: ScheduledBatch) -> StepHidden:
        """The final hidden state of every scheduled token, by request."""
        ids, positions = [], []
        for request, count, drafts in zip(batch.requests, batch.num_new_tokens, batch.drafts, strict=True):
            start = request.num_computed_tokens
            ids.extend(request.all_token_ids[start:start + count - len(drafts)])
            ids.extend(drafts)
            positions.extend(range(start, start + count))
        layout = self.cache.build_layout([r.request_id for r in batch.requests],
                                         [r.num_computed_tokens for r in batch.requests], batch.num_new_tokens)
        self.cache.set_layout(layout)
        decoding = all(_decoding(r, count, len(drafts))
                       for r, count, drafts in zip(batch.requests, batch.num_new_tokens, batch.drafts, strict=True))
        try:
            with prompt_step(not decoding):
                hidden = self.model(torch.tensor(ids, device=self.device),
                                    torch.tensor(positions, device=self.device), self.cache)
        finally:
            self.cache.set_layout(None)
        return StepHidden(hidden, [0, *itertools.accumulate(batch.num_new_tokens)])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits on the CPU, where the sampler runs."""
        return self.model.compute_logits(hidden).cpu()


def _decoding(request: Request, count: int, drafts: int) -> bool:
    """Whether the request's new tokens are a decode token (its last sampled one) and its drafts, rather than
    prompt tokens or tokens recomputed after a preemption. A draft verified in a decode step is computed as it
    would have been as that step's decode token: speculation does not change a greedy reply."""
    return (count == 1 + drafts and bool(request.output_token_ids)
            and request.num_computed_tokens == request.num_tokens - 1)
