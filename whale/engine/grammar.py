"""Grammar-constrained output with llguidance (Rust; picked over xgrammar for its zero dependencies, its bounded
per-step work and ~1 ms grammar compiles: figures in bench/constrained.py and docs/structured-output.md).

`compile_grammar` turns a StructuredOutput into llguidance's grammar text and checks it, raising a 400 that names
the problem (an unsupported JSON-schema keyword, a bad regex); `GrammarController` is the request's controller: its
allowed tokens are the grammar's next-token mask, from the end of thinking on in thinking mode."""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import llguidance
import torch

from whale.engine.controllers import Constraint
from whale.errors import InvalidRequestError
from whale.sampling_params import ReasoningSpec, StructuredOutput

# JSON on one line, a single optional space where JSON allows whitespace: `{"a": 1, "b": [1, 2]}` as models write
# it, and no room for a model to pad an answer with endless whitespace
JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": "[ ]?"}
# llguidance's own limits (its defaults), stated: a hostile grammar runs out of fuel instead of stalling a step
LIMITS = llguidance.LLParserLimits(step_lexer_fuel=200_000, step_max_items=50_000, initial_lexer_fuel=1_000_000,
                                   max_grammar_size=500_000, max_lexer_states=250_000)

_tokenizers: weakref.WeakKeyDictionary[Any, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def grammar_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> llguidance.LLTokenizer:
    """llguidance's view of a whale Tokenizer (built once per tokenizer, ~1 s: first from a request's worker
    thread, so the engine thread finds it ready)."""
    with _tokenizers_lock:
        found = _tokenizers.get(tokenizer)
        if found is None:
            try:
                # every end-of-sequence token: a grammar that is complete lets the model end with any of them
                found = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                               eos_token=sorted(eos_ids) or None)
            except ValueError as exc:
                raise InvalidRequestError(f"this model's tokenizer cannot drive constrained output: {exc}") from exc
            _tokenizers[tokenizer] = found
        return found


def token_marker(tokenizer: Any, grammar_view: llguidance.LLTokenizer) -> Any:
    """`marker(text)` for whale.chat.constrained_calls: a text that is one special token of the tokenizer is matched by
    its id (`<[128806]>`: llguidance never matches special tokens as text), anything else as a string literal."""

    def marker(text: str) -> str:
        ids = tokenizer.encode(text, add_special_tokens=False)
        ids = list(getattr(ids, "ids", ids))
        if len(ids) == 1 and grammar_view.is_special_token(ids[0]):
            return f"<[{ids[0]}]>"
        return json.dumps(text, ensure_ascii=False)

    return marker


def _json_grammar(schema: Any) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)


def grammar_text(spec: StructuredOutput) -> str:
    """llguidance's grammar for a StructuredOutput (not yet checked)."""
    if spec.kind == "json_object":
        return _json_grammar({"type": "object"})
    if spec.kind == "json_schema":
        try:
            return _json_grammar(json.loads(spec.value))
        except ValueError as exc:
            raise InvalidRequestError(f"the JSON schema is not a JSON object: {exc}") from exc
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        choices = json.loads(spec.value)
        alternatives = " | ".join(json.dumps(str(c), ensure_ascii=False) for c in choices)
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}\n")
    return llguidance.LLMatcher.grammar_from_lark(spec.value)


def compile_grammar(spec: StructuredOutput, tokenizer: llguidance.LLTokenizer) -> str:
    """The checked grammar text; a grammar llguidance cannot serve is a 400 naming why."""
    text = grammar_text(spec)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, tokenizer, limits=LIMITS)
    if is_error:
        raise InvalidRequestError(f"the {spec.kind.replace('_', ' ')} cannot be used to constrain the output: "
                                  f"{'; '.join(messages)}")
    return text


class GrammarController:
    """The request's output follows a grammar. In thinking mode it waits for the end of thinking (`</think>`),
    then the format's own tail (R1: "\\n\\n"), then constrains every token; the end of sequence is allowed only
    where the grammar is complete, so the answer is never empty."""

    def __init__(self, grammar: str, tokenizer: llguidance.LLTokenizer, vocab_size: int,
                 reasoning: ReasoningSpec | None):
        self._matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=LIMITS)  # errors: is_error()
        self._bitmask = torch.full(((vocab_size + 31) // 32,), -1, dtype=torch.int32)
        tail: tuple[int, ...] = ()
        if reasoning is not None:
            tail = reasoning.forced_end[reasoning.forced_end.index(reasoning.end_id) + 1:]
        self._end_id = reasoning.end_id if reasoning is not None else None
        self._tail = tail
        self._phase = "thinking" if reasoning is not None else "active"
        self._tail_done = 0
        self._history: list[tuple[str, int, bool]] = []  # (phase, tail_done, consumed by the matcher) per token

    @property
    def constraining(self) -> bool:
        """Whether the grammar holds the tokens now (thinking and the format's tail after it are over)."""
        return self._phase == "active"

    def allowed(self) -> Constraint | None:
        if self._phase == "tail":
            return Constraint(only=self._tail[self._tail_done])
        if self._phase != "active" or self._matcher.is_error():
            return None
        # into our own buffer (llguidance.torch would import torch's compiler, seconds, for a helper we do not use)
        self._matcher.unsafe_compute_mask_ptr(self._bitmask.data_ptr(), self._bitmask.numel() * 4)
        return Constraint(mask=self._bitmask)

    def accept(self, token_ids: Sequence[int]) -> None:
        for token in token_ids:
            before, consumed = (self._phase, self._tail_done), False
            if self._phase == "thinking":
                if token == self._end_id:
                    self._phase = "tail" if self._tail else "active"
            elif self._phase == "tail":
                self._tail_done += 1
                if self._tail_done == len(self._tail):
                    self._phase = "active"
            else:
                consumed = self._matcher.consume_token(token)
            self._history.append((*before, consumed))

    def rollback(self, n: int) -> None:
        undone = 0
        for _ in range(n):
            self._phase, self._tail_done, consumed = self._history.pop()
            undone += consumed
        if undone:
            self._matcher.rollback(undone)
