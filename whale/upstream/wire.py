"""What an upstream protocol is to the engine over it: a request body for one call, and each streamed payload
read back as a `Chunk` of tokens. sglang_wire.py (SGLang's native `/generate`) and vllm_wire.py (vLLM's OpenAI
`/v1/completions` with token ids) implement it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from whale.engine.sampler import SampledToken
from whale.errors import CapabilityError
from whale.sampling_params import SamplingParams, StructuredOutput


@dataclass
class Chunk:
    """What one streamed payload adds: the new tokens (with their logprobs where asked), how the upstream ended
    the call once it did (`finish`: "stop", "length" or "abort", with its message and status), and the prompt's
    token counts where the payload reports them."""

    tokens: list[SampledToken] = field(default_factory=list)
    finish: str | None = None
    message: str = ""
    status: int | None = None  # an abort's HTTP status, where the upstream gives one
    prompt_tokens: int | None = None
    cached_tokens: int | None = None


class Wire(Protocol):
    name: str  # the protocol's name in messages ("SGLang", "vLLM")
    path: str  # the route a call posts to

    def check(self, structured: StructuredOutput) -> None:
        """Raise a CapabilityError (a 400) for an output constraint the protocol cannot carry."""

    def body(self, prompt_ids: list[int], params: SamplingParams, rid: str, *, max_new_tokens: int,
             min_new_tokens: int, structured: StructuredOutput | None) -> dict[str, Any]:
        """One streamed call: `prompt_ids` so far, at most `max_new_tokens` more, at least `min_new_tokens` before
        an end token. The front detokenizes and checks stops itself: the upstream keeps special tokens and stop
        strings in its output (it still stops at them early)."""

    def read(self, payload: dict[str, Any], seen: int) -> Chunk:
        """The new tokens of a payload, `seen` tokens of this call having been read."""


_REGEX_SPECIAL = set("\\.^$|?*+()[]{}/")


def regex_literal(text: str) -> str:
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in text)


def error_chunk(payload: dict[str, Any]) -> Chunk:
    error = payload["error"]
    message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
    status = error.get("code") if isinstance(error, dict) and isinstance(error.get("code"), int) else None
    return Chunk(finish="abort", message=message, status=status)


def no_lark_grammar(protocol: str) -> CapabilityError:
    """The 400 for a Lark grammar, which no upstream protocol carries."""
    return CapabilityError(
        f"this server's engine is an upstream ({protocol} protocol), which cannot hold the output to a Lark grammar "
        "(tool_choice 'required' or a named function, strict tools): send tool_choice 'auto' without strict "
        "tools, or use a server with a local engine")
