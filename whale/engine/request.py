"""One generation request as the engine tracks it: prompt, outputs so far, status and why it finished."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import InitVar, dataclass, field
from itertools import islice

from whale.engine.controllers import Constraint, Controller, build_controllers, combine
from whale.engine.detokenizer import IncrementalDetokenizer
from whale.engine.sampler import SampledToken, SamplingState
from whale.sampling_params import SamplingParams
from whale.tokenizer import Tokenizer


class TokenView(Sequence[int]):
    """A read-only window on a token list, from `start` to `stop` (None: its end): the list grows in place and an
    open-ended view with it, so nobody copies a sequence to read it."""

    __slots__ = ("_tokens", "_start", "_stop")

    def __init__(self, tokens: list[int], start: int = 0, stop: int | None = None):
        self._tokens, self._start, self._stop = tokens, start, stop

    def _end(self) -> int:
        return len(self._tokens) if self._stop is None else self._stop

    def __len__(self) -> int:
        return self._end() - self._start

    def __getitem__(self, index):  # an int, or a slice (a new list)
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            return self._tokens[self._start + start:self._start + stop:step]
        if not -len(self) <= index < len(self):
            raise IndexError("token index out of range")
        return self._tokens[self._start + index % len(self)]

    def __iter__(self) -> Iterator[int]:
        return islice(self._tokens, self._start, self._end())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and self[:] == list(other)

    __hash__ = None  # it changes as the request runs

    def __repr__(self) -> str:
        return f"TokenView({self[:]})"


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass
class Request:
    request_id: str
    prompt_ids: InitVar[Sequence[int]]  # copied: the request owns its tokens
    params: SamplingParams
    tokenizer: Tokenizer
    max_total_tokens: int  # the model's context length: generation ends there
    eos_token_ids: frozenset[int] = frozenset()
    prompt: str | None = None
    vocab_size: int = 0  # the model's (a grammar's mask covers it)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache on first admission
    num_preemptions: int = 0
    # speculative decoding: tokens a proposer guessed to follow, fed to the next step after the last token and
    # kept only as far as the target's own sampling agrees (never part of the request's tokens until then)
    draft_token_ids: list[int] = field(default_factory=list)
    logprobs: list[SampledToken] = field(default_factory=list)
    # with params.prompt_logprobs: per prompt token, how likely it was after the ones before it (None for the first)
    prompt_logprobs: list[SampledToken | None] = field(default_factory=lambda: [None])
    cumulative_logprob: float = 0.0
    error: str | None = None

    def __post_init__(self, prompt_ids: Sequence[int]) -> None:
        # one list, prompt then output, appended in place; everyone else reads views of it
        self._tokens = list(prompt_ids)
        self.num_prompt_tokens = len(self._tokens)
        self.sampling = SamplingState(self.params, self.prompt_token_ids, self.output_token_ids)
        self.detokenizer = IncrementalDetokenizer(self.tokenizer, self.params.skip_special_tokens)
        self.text = ""
        self.controllers: list[Controller] = build_controllers(
            self.params, self.eos_token_ids, lambda: self.text, lambda: not self.detokenizer.holding,
            self.tokenizer, self.vocab_size)

    @property
    def prompt_token_ids(self) -> TokenView:
        return TokenView(self._tokens, 0, self.num_prompt_tokens)

    @property
    def output_token_ids(self) -> TokenView:
        return TokenView(self._tokens, self.num_prompt_tokens)

    @property
    def all_token_ids(self) -> TokenView:
        return TokenView(self._tokens)

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def append(self, sampled: SampledToken) -> None:
        """Record a sampled token, then decide whether the request is finished."""
        token = sampled.token_id
        self._tokens.append(token)
        if sampled.logprob is not None:
            self.logprobs.append(sampled)
            self.cumulative_logprob += sampled.logprob
        p = self.params
        count = len(self._tokens) - self.num_prompt_tokens
        if count >= p.min_tokens and not p.ignore_eos and token in self.eos_token_ids:
            self._finish(RequestStatus.FINISHED_STOPPED, None)
        elif count >= p.min_tokens and token in (p.stop_token_ids or ()):
            self._finish(RequestStatus.FINISHED_STOPPED, token)
        delta = self.detokenizer.push(token)
        self.text += delta
        for controller in self.controllers:
            controller.accept([token])
        if not self.status.finished and p.stop_strings and count >= p.min_tokens:
            self._check_stop_strings(len(delta))
        if not self.status.finished and (count >= (p.max_tokens or self.max_total_tokens)
                                         or len(self._tokens) >= self.max_total_tokens):
            self._finish(RequestStatus.FINISHED_LENGTH, None)
        if self.status.finished and not isinstance(self.stop_reason, str):
            self.text += self.detokenizer.flush()  # a character cut off by the end, as U+FFFD

    @property
    def reasoning_tokens(self) -> int | None:
        """Reasoning tokens so far, counted by the reasoning controller; None where no controller tracks them."""
        return next((c.reasoning_tokens for c in self.controllers if hasattr(c, "reasoning_tokens")), None)

    def constraint(self) -> Constraint | None:
        """What the next token may be, from every controller of the request."""
        return combine(c.allowed() for c in self.controllers)

    def _check_stop_strings(self, new_chars: int) -> None:
        # only a match that ends in the new text can be new
        longest = max(len(s) for s in self.params.stop_strings)
        window_start = max(0, len(self.text) - new_chars - longest + 1)
        for stop in self.params.stop_strings:
            index = self.text.find(stop, window_start)
            if index >= 0:
                end = index + len(stop) if self.params.include_stop_str_in_output else index
                self.text = self.text[:end]
                self._finish(RequestStatus.FINISHED_STOPPED, stop)
                return

    def _finish(self, status: RequestStatus, reason: int | str | None) -> None:
        self.status = status
        self.stop_reason = reason

    def abort(self) -> None:
        if not self.status.finished:
            self._finish(RequestStatus.FINISHED_ABORTED, None)

    def fail(self, message: str) -> None:
        """End this request with an error; the engine and the other requests go on."""
        self.error = message
        self._finish(RequestStatus.FINISHED_ERROR, None)

    def streamable_text(self) -> str:
        """Text safe to send: while running, hold back a tail that could still become a stop string."""
        if self.status.finished or not self.params.stop_strings:
            return self.text
        hold = 0
        for stop in self.params.stop_strings:
            for size in range(min(len(stop) - 1, len(self.text)), hold, -1):
                if self.text.endswith(stop[:size]):
                    hold = size
                    break
        return self.text[:len(self.text) - hold]
