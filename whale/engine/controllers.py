"""Per-request controllers: small state machines that see every token a request accepts and say what its next
token may be (`allowed()`: a `Constraint`, or None for anything). `SamplingParams` stays declarative
(`min_tokens`, `thinking_budget`, ...); the engine builds a request's controllers (`build_controllers`) and the
sampler applies their combined constraint. `rollback(n)` undoes the last n accepted tokens (speculative decoding
drafts tokens that may be refused)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from whale.sampling_params import ReasoningSpec, SamplingParams

SENTENCE_ENDS = (".", "!", "?", "。", "！", "？", "\n")


@dataclass(frozen=True, eq=False)
class Constraint:
    """What the next token may be: `only` that one (a forced token), or what `mask` allows (an int32 bitmask over
    the vocabulary, bit i of word i // 32 for token i) less `banned`."""

    only: int | None = None
    banned: frozenset[int] = frozenset()
    mask: torch.Tensor | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Constraint):
            return NotImplemented
        same_mask = (self.mask is None) == (other.mask is None) and (
            self.mask is None or torch.equal(self.mask, other.mask))
        return self.only == other.only and self.banned == other.banned and same_mask


def combine(constraints: Iterable[Constraint | None]) -> Constraint | None:
    """One constraint from several: bans add up, masks intersect; a forced token wins over both (it is the
    format's own marker, which no ban or grammar is about), the first forced token over later ones."""
    only, banned, mask = None, frozenset(), None
    for constraint in constraints:
        if constraint is None:
            continue
        only = only if only is not None else constraint.only
        banned |= constraint.banned
        if constraint.mask is not None:
            mask = constraint.mask if mask is None else mask & constraint.mask
    if only is not None:
        return Constraint(only)
    if not banned and mask is None:
        return None
    return Constraint(None, banned, mask)


class Controller(Protocol):
    def allowed(self) -> Constraint | None: ...

    def accept(self, token_ids: Sequence[int]) -> None: ...

    def rollback(self, n: int) -> None: ...


class MinTokens:
    """No end of sequence (EOS, stop token ids) before `min_tokens` tokens."""

    def __init__(self, min_tokens: int, stop_ids: frozenset[int]):
        self._min, self._stop_ids, self._count = min_tokens, stop_ids, 0

    def allowed(self) -> Constraint | None:
        return Constraint(banned=self._stop_ids) if self._count < self._min else None

    def accept(self, token_ids: Sequence[int]) -> None:
        self._count += len(token_ids)

    def rollback(self, n: int) -> None:
        self._count -= n


@dataclass(frozen=True)
class _BudgetState:
    phase: str  # "before" (the model opens the block itself), "thinking", "closing" (forced tail), "answer", "done"
    count: int = 0  # reasoning tokens so far, end tokens included
    forced: int = 0  # tokens of spec.forced_end written by force so far
    stopping: bool = False  # the end is being forced from the next token on
    answer_tokens: int = 0


class ThinkingBudget:
    """At most `budget` reasoning tokens, the end-of-thinking tokens included; then the answer has its turn.

    The end is forced at a clean point: within the last WINDOW tokens before the cap, after a sentence end; within
    the last CHAR_ZONE, at the first whole character; at the cap, whatever the text (a UTF-8 character spans at most
    four byte tokens, so the zone always holds a whole-character point). Small budgets scale the window and
    the zone down to half and an eighth of the budget (under 32 tokens the cap may fall inside a character), so a
    budget of 3 is 3 tokens of thinking. After the
    thinking ends, by force or by the model, the first answer token may not end the sequence: no empty answers.
    `text()` is the request's text so far and `clean()` whether it ends on a whole character."""

    WINDOW = 32  # long enough to usually hold a sentence end, short enough to lose little of the budget
    CHAR_ZONE = 4

    def __init__(self, spec: ReasoningSpec, budget: int, eos_ids: frozenset[int], text: Callable[[], str],
                 clean: Callable[[], bool]):
        self._spec = spec
        self._budget = max(budget, len(spec.forced_end))
        self._eos_ids = eos_ids
        self._text, self._clean = text, clean
        self._state = _BudgetState("thinking" if spec.starts_inside else "before")
        self._state = replace(self._state, stopping=self._should_stop(self._state))
        self._history: list[_BudgetState] = []

    @property
    def reasoning_tokens(self) -> int:
        return self._state.count

    def allowed(self) -> Constraint | None:
        state = self._state
        if state.phase == "closing":
            return Constraint(only=self._spec.forced_end[state.forced])
        if state.phase == "thinking" and state.stopping:
            return Constraint(only=self._spec.forced_end[state.forced])
        if state.phase == "answer" and state.answer_tokens == 0:
            return Constraint(banned=self._eos_ids)
        return None

    def accept(self, token_ids: Sequence[int]) -> None:
        for token in token_ids:
            self._history.append(self._state)
            self._state = self._next(self._state, token)

    def rollback(self, n: int) -> None:
        for _ in range(n):
            self._state = self._history.pop()

    def _next(self, state: _BudgetState, token: int) -> _BudgetState:
        spec = self._spec
        if state.phase == "before":
            if token != spec.start_id:
                return state
            opened = _BudgetState("thinking", count=1)
            return replace(opened, stopping=self._should_stop(opened))
        if state.phase in ("answer", "done"):
            return replace(state, answer_tokens=state.answer_tokens + 1, phase="done")
        count = state.count + 1
        forcing = state.phase == "closing" or state.stopping
        forced = state.forced + 1 if forcing else 0
        if forcing and forced < len(spec.forced_end):
            return replace(state, phase="closing", count=count, forced=forced, stopping=False)
        if forcing or token == spec.end_id:
            return _BudgetState("answer", count=count)
        following = replace(state, count=count)
        return replace(following, stopping=self._should_stop(following))

    def _should_stop(self, state: _BudgetState) -> bool:
        """Whether, in this state, the next token must begin the forced end."""
        if state.phase != "thinking":
            return False
        slack = self._budget - state.count - len(self._spec.forced_end)
        if slack <= 0:
            return True
        # small budgets scale the window and the zone down, so that they are not spent on them
        window, zone = min(self.WINDOW, self._budget // 2), min(self.CHAR_ZONE, self._budget // 8)
        if slack > window or not self._clean():
            return False
        return slack <= zone or self._text().rstrip(" ").endswith(SENTENCE_ENDS)


def build_controllers(params: SamplingParams, eos_ids: frozenset[int], text: Callable[[], str],
                      clean: Callable[[], bool], tokenizer: Any = None, vocab_size: int = 0) -> list[Controller]:
    """The controllers a request's SamplingParams ask for (`tokenizer` and `vocab_size` for a grammar)."""
    controllers: list[Controller] = []
    if params.min_tokens:
        controllers.append(MinTokens(params.min_tokens, eos_ids | frozenset(params.stop_token_ids or ())))
    if params.thinking_budget is not None and params.reasoning is not None:
        controllers.append(ThinkingBudget(params.reasoning, params.thinking_budget, eos_ids, text, clean))
    if params.structured_output is not None:
        from whale.engine.grammar import GrammarController, compile_grammar, grammar_tokenizer

        vocab = grammar_tokenizer(tokenizer, vocab_size, eos_ids)
        grammar = compile_grammar(params.structured_output, vocab)
        controllers.append(GrammarController(grammar, vocab, vocab_size, params.reasoning))
    return controllers
