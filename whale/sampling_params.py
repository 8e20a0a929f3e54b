"""SamplingParams, with vLLM's names and defaults; invalid values raise InvalidRequestError saying what to change."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from whale.errors import InvalidRequestError

MAX_LOGPROBS = 20
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes
GREEDY_TEMPERATURE = 1e-5  # as vLLM: sampling below it is the argmax, without the overflow


@dataclass(frozen=True)
class ReasoningSpec:
    """How a chat format marks reasoning, as token ids, so the engine knows per token whether the model thinks:
    the output starts inside the think block (`starts_inside`, the prompt left it open) or opens it with
    `start_id`; the block ends at the token `end_id` (`</think>`). `forced_end` is what the engine writes to end
    it early, the way the format's models end it themselves (R1: "\n</think>\n\n", V3.1 and later: "</think>")."""

    start_id: int | None
    end_id: int
    forced_end: tuple[int, ...]
    starts_inside: bool


STRUCTURED_KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """Output constrained to a grammar (engine/grammar.py compiles it): `json_object` (any JSON object),
    `json_schema` (`value`: the schema as JSON text), `regex`, `choice` (`value`: a JSON list of strings) or
    `grammar` (Lark, as llguidance reads it)."""

    kind: str
    value: str = ""


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # how many top alternatives per token; 0 = only the sampled token's
    prompt_logprobs: int | None = None  # the same for each prompt token (computed, never from the prefix cache)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # reasoning budget: at most this many reasoning tokens (the end-of-thinking tokens included), then the end of
    # thinking is forced (needs `reasoning`); the engine builds the controller (engine/controllers.py)
    thinking_budget: int | None = None
    reasoning: ReasoningSpec | None = None
    # output that follows a grammar; in thinking mode (with `reasoning`) from the end of thinking on
    structured_output: StructuredOutput | None = None
    # each called as processor(output_token_ids, logits) -> logits before sampling: a hook for users; a class is
    # instantiated once per request (state kept per request, though LLM.generate shares these params between prompts)
    logits_processors: list[Callable[[Sequence[int], torch.Tensor], torch.Tensor] | type] = field(
        default_factory=list)
    stop_strings: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        self.stop_strings = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        checks = [
            (self.n == 1, "n must be 1 (whale returns one completion per request)"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k == -1 or self.top_k >= 0, "top_k must be -1 (off) or >= 0"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
             f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}] (a 64-bit seed)"),
            (self.min_tokens >= 0, "min_tokens must be >= 0"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be between 0 and {MAX_LOGPROBS}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}"),
            (all(s for s in self.stop_strings), "stop strings must not be empty"),
            (self.thinking_budget is None or self.thinking_budget >= 1, "thinking_budget must be >= 1"),
            (self.thinking_budget is None or self.reasoning is not None,
             "thinking_budget needs `reasoning` (the chat format's think markers as token ids)"),
            (self.structured_output is None or self.structured_output.kind in STRUCTURED_KINDS,
             f"structured_output kind must be one of {', '.join(STRUCTURED_KINDS)}"),
            (self.reasoning is None or self.reasoning.end_id in self.reasoning.forced_end,
             "reasoning.forced_end must contain reasoning.end_id"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)

    @property
    def greedy(self) -> bool:
        # below GREEDY_TEMPERATURE, logits / temperature overflows to inf: such a temperature means the argmax
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1
