"""Draft proposers for speculative decoding: after each step, a proposer guesses the next few tokens of every
request that is decoding; the next step feeds them to the model behind the request's last token and keeps the
longest prefix the target's own sampling agrees with (llm_engine.py). A proposer only guesses: a wrong draft
costs a little compute, never a wrong token.

- `NgramProposer` (prompt lookup, any model): the tokens that followed the most recent earlier occurrence of the
  sequence's last n tokens (n from MAX_N down to MIN_N), in the prompt or the output so far. Editing, extraction
  and code rewriting copy long runs of their input: those runs are drafted for free.
- `MtpProposer` (DeepSeek V3 / R1 / V3.1 / V3.2 checkpoints with their multi-token-prediction layer): the MTP
  layer reads the target's final hidden state at each verified position and the token after it, keeps its own
  latent cache (a second storage over the same block tables), and predicts one token further; K drafts reuse the
  layer on its own output. Drafts are its argmax: a deterministic draft keeps verification exact.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from whale.errors import InvalidRequestError

if TYPE_CHECKING:  # the CLI reads SPECULATIVE_METHODS without importing torch
    import torch

    from whale.engine.paged_attention import PagedKVCache
    from whale.engine.request import Request

SPECULATIVE_METHODS = ("off", "ngram", "mtp")
DEFAULT_DRAFT_TOKENS = {"ngram": 3, "mtp": 1}


@dataclass(frozen=True)
class VerifiedStep:
    """What one step computed and kept, for proposers that read the model's states: per request of the batch,
    the final hidden states of its newly verified positions (prompt chunk, last token, accepted drafts), and the
    position of the first of them."""

    requests: list[Request]
    hidden: list[torch.Tensor]
    starts: list[int]


class Proposer(Protocol):
    def propose(self, step: VerifiedStep, room: list[int]) -> list[list[int]]:
        """Per request of the step, at most room[i] draft tokens (room[i] == 0: none wanted)."""
        ...

    def release(self, request_id: str) -> None:
        """Forget a request that finished or was aborted."""
        ...


@dataclass
class _NgramIndex:
    """Where each n-gram of a sequence last ended (an exclusive end index), for every n in [min_n, max_n]. The
    n-grams ending at the sequence's last token are indexed on the next call only, so looking up the sequence's
    own suffix finds an earlier occurrence."""

    ends: dict[int, dict[tuple[int, ...], int]]
    indexed: int = 0  # the n-grams ending before this index are in


class NgramProposer:
    MIN_N, MAX_N = 2, 4  # a single token recurs too often to say what follows it

    def __init__(self, min_n: int = MIN_N, max_n: int = MAX_N):
        if not 1 <= min_n <= max_n:
            raise ValueError("the n-gram sizes need 1 <= min_n <= max_n")
        self.min_n, self.max_n = min_n, max_n
        self._indexes: dict[str, _NgramIndex] = {}

    def _index(self, request: Request) -> _NgramIndex:
        index = self._indexes.setdefault(request.request_id,
                                         _NgramIndex({n: {} for n in range(self.min_n, self.max_n + 1)}))
        end = request.num_tokens
        first = max(0, index.indexed - self.max_n)
        window = request.all_token_ids[first:end]  # one copy of what the new n-grams are made of
        for stop in range(index.indexed, end):
            for n, ends in index.ends.items():
                if stop >= n:
                    ends[tuple(window[stop - n - first:stop - first])] = stop
        index.indexed = end
        return index

    def draft(self, request: Request, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the longest recurring suffix of the request's tokens."""
        index = self._index(request)
        tokens = request.all_token_ids
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(tokens) <= n:
                continue
            end = index.ends[n].get(tuple(tokens[len(tokens) - n:]))
            if end is not None:
                return tokens[end:end + limit]
        return []

    def propose(self, step: VerifiedStep, room: list[int]) -> list[list[int]]:
        return [self.draft(r, k) if k > 0 else [] for r, k in zip(step.requests, room, strict=True)]

    def release(self, request_id: str) -> None:
        self._indexes.pop(request_id, None)


class MtpProposer:
    def __init__(self, model, cache: PagedKVCache):
        from whale.engine.paged_attention import PagedKVCache

        self.model, self.blocks = model, cache.blocks
        # the MTP layers' latent rows, one storage beside the main cache's, addressed by the same block tables
        self.cache = PagedKVCache(model.mtp_kv_cache_spec(), cache.blocks.num_blocks, cache.block_size, cache.dtype,
                                  cache.device)
        self.cache.blocks = cache.blocks

    def _draft_step(self, requests: list[Request], hidden: torch.Tensor, next_ids: list[int], starts: list[int],
                    counts: list[int]) -> torch.Tensor:
        """The MTP layer over `counts[i]` positions of each request from `starts[i]` (writing its cache rows there):
        the draft hidden state of every row."""
        import torch

        from whale.engine.paged_attention import StepLayout

        device = self.cache.device
        positions = [p for start, count in zip(starts, counts, strict=True) for p in range(start, start + count)]
        layout = StepLayout.build([self.blocks.block_table(r.request_id) for r in requests], starts, counts,
                                  self.cache.block_size, device)
        self.cache.set_layout(layout)
        try:
            return self.model.draft_hidden(hidden, torch.tensor(next_ids, device=device),
                                           torch.tensor(positions, device=device), self.cache)
        finally:
            self.cache.set_layout(None)

    def _argmax(self, draft_hidden: torch.Tensor) -> list[int]:
        return self.model.compute_draft_logits(draft_hidden).argmax(-1).tolist()

    def propose(self, step: VerifiedStep, room: list[int]) -> list[list[int]]:
        import torch

        drafts: list[list[int]] = [[] for _ in step.requests]
        live = [i for i, r in enumerate(step.requests) if not r.status.finished and len(step.hidden[i])]
        if not live:
            return drafts
        requests = [step.requests[i] for i in live]
        starts = [step.starts[i] for i in live]
        counts = [len(step.hidden[i]) for i in live]
        # every newly verified position: its hidden state and the token after it (known: the prompt's next token,
        # an accepted draft, or the token just sampled)
        next_ids = [t for r, start, count in zip(requests, starts, counts, strict=True)
                    for t in r.all_token_ids[start + 1:start + count + 1]]
        out = self._draft_step(requests, torch.cat([step.hidden[i] for i in live]), next_ids, starts, counts)
        ends = list(itertools.accumulate(counts))
        wanting = [j for j, i in enumerate(live) if room[i] > 0]
        if not wanting:
            return drafts
        hidden = out[[ends[j] - 1 for j in wanting]]
        tokens = self._argmax(hidden)
        for j, token in zip(wanting, tokens, strict=True):
            drafts[live[j]].append(token)
        for depth in range(1, max(room[live[j]] for j in wanting)):
            # the layer again on its own output, one position further; its cache row there is provisional (the
            # next step writes the verified one)
            going = [n for n, j in enumerate(wanting) if room[live[j]] > depth
                     and self.blocks.grow(requests[j].request_id, starts[j] + counts[j] + depth)]
            if not going:
                break
            position = [starts[wanting[n]] + counts[wanting[n]] + depth - 1 for n in going]
            out = self._draft_step([requests[wanting[n]] for n in going], hidden[going], [tokens[n] for n in going],
                                   position, [1] * len(going))
            wanting, hidden, tokens = [wanting[n] for n in going], out, self._argmax(out)
            for j, token in zip(wanting, tokens, strict=True):
                drafts[live[j]].append(token)
        return drafts

    def release(self, request_id: str) -> None:
        pass  # its cache rows live in the request's blocks


def build_proposer(method: str, num_tokens: int | None, model=None, cache: PagedKVCache | None = None
                   ) -> tuple[Proposer | None, int]:
    """The proposer `method` names for `model` (its main cache `cache`) and how many tokens it drafts per step
    (None: the method's default)."""
    if method not in SPECULATIVE_METHODS:
        raise InvalidRequestError(f"speculative method {method!r}: use one of {', '.join(SPECULATIVE_METHODS)}")
    if method == "off":
        return None, 0
    from whale.engine.paged_attention import KERNEL_MAX_NEW_TOKENS

    count = DEFAULT_DRAFT_TOKENS[method] if num_tokens is None else num_tokens
    if not 1 <= count < KERNEL_MAX_NEW_TOKENS:
        # a verify step is a decode step: the last token and its drafts go through the decode kernels together
        raise InvalidRequestError(f"num_speculative_tokens must be in [1, {KERNEL_MAX_NEW_TOKENS - 1}]")
    if method == "ngram":
        return NgramProposer(), count
    if not getattr(model, "num_mtp_layers", 0):
        raise InvalidRequestError("speculative 'mtp' needs a DeepSeek checkpoint that carries its multi-token-"
                                  "prediction layer (V3, R1, V3.1, V3.2 safetensors; GGUF files drop it); use ngram")
    return MtpProposer(model, cache), count
