"""A draft proposer for tests (a test double of the n-gram and MTP proposers, which cannot be told what to guess):
it drafts a reply known in advance, the one the same request gave without speculation, with every `wrong_every`th
token of the reply replaced by another. Drafts are then accepted in long runs and refused at known places,
including inside the stretches a grammar or a reasoning budget forces, which real proposers on random weights rarely
reach."""

from __future__ import annotations

from whale.engine.proposers import VerifiedStep


class ReplayProposer:
    def __init__(self, replies: dict[str, list[int]], vocab_size: int, wrong_every: int = 0):
        self.replies, self.vocab_size, self.wrong_every = replies, vocab_size, wrong_every
        self.released: list[str] = []

    def _token(self, reply: list[int], index: int) -> int:
        token = reply[index]
        if self.wrong_every and index % self.wrong_every == self.wrong_every - 1:
            return (token + 1) % self.vocab_size
        return token

    def propose(self, step: VerifiedStep, room: list[int]) -> list[list[int]]:
        drafts = []
        for request, limit in zip(step.requests, room, strict=True):
            reply, done = self.replies.get(request.request_id, []), len(request.output_token_ids)
            drafts.append([self._token(reply, i) for i in range(done, min(done + limit, len(reply)))])
        return drafts

    def release(self, request_id: str) -> None:
        self.released.append(request_id)
