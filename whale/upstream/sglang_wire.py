"""SGLang's native generation protocol (`POST /generate`), the one both SGLang's engine and its model gateway
(smg) take token ids through: a request body from whale's SamplingParams, and the streamed chunks read back as
tokens. whale's own server speaks it too (server/gateway_api.py), so a whale replica behind the gateway is read
the same way."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from whale.engine.sampler import SampledToken
from whale.errors import CapabilityError
from whale.sampling_params import SamplingParams, StructuredOutput

# The structured-output kinds the protocol carries, by the sampling parameter that carries them. Lark grammars
# (whale's forced and strict tool calls) have no field: SGLang's `ebnf` is another dialect.
_REGEX_SPECIAL = set("\\.^$|?*+()[]{}/")


def regex_literal(text: str) -> str:
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in text)


def structured_fields(structured: StructuredOutput) -> dict[str, str]:
    """The sampling parameter that asks the upstream for `structured`; a kind it cannot carry is a 400."""
    if structured.kind == "json_schema":
        return {"json_schema": structured.value}
    if structured.kind == "json_object":
        return {"json_schema": json.dumps({"type": "object"})}
    if structured.kind == "regex":
        return {"regex": structured.value}
    if structured.kind == "choice":
        return {"regex": "(" + "|".join(regex_literal(c) for c in json.loads(structured.value)) + ")"}
    raise CapabilityError(
        "this server's engine is an upstream (SGLang protocol), which cannot hold the output to a Lark grammar "
        "(tool_choice 'required' or a named function, strict tools): send tool_choice 'auto' without strict "
        "tools, or use a server with a local engine")


def generate_body(prompt_ids: list[int], params: SamplingParams, rid: str, *, max_new_tokens: int,
                  min_new_tokens: int, structured: StructuredOutput | None) -> dict[str, Any]:
    """One streamed `/generate` request: `prompt_ids` so far, at most `max_new_tokens` more (at least
    `min_new_tokens` before an end token). The server detokenizes and checks stops itself, so the upstream keeps
    special tokens and stop strings in its output (it still stops at them early)."""
    sampling: dict[str, Any] = {
        "max_new_tokens": max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1, "min_p": params.min_p,
        "frequency_penalty": params.frequency_penalty, "presence_penalty": params.presence_penalty,
        "repetition_penalty": params.repetition_penalty, "ignore_eos": params.ignore_eos,
        "skip_special_tokens": False, "no_stop_trim": True}
    if min_new_tokens:
        sampling["min_new_tokens"] = min_new_tokens
    if params.stop_strings:
        sampling["stop"] = list(params.stop_strings)
    if params.stop_token_ids:
        sampling["stop_token_ids"] = list(params.stop_token_ids)
    if params.seed is not None:
        sampling["sampling_seed"] = params.seed
    if structured is not None:
        sampling.update(structured_fields(structured))
    body: dict[str, Any] = {"input_ids": prompt_ids, "sampling_params": sampling, "stream": True, "rid": rid}
    if params.logprobs is not None:
        body.update(return_logprob=True, top_logprobs_num=params.logprobs, logprob_start_len=-1)
    return body


@dataclass
class Chunk:
    """What one streamed chunk adds: the new tokens (with their logprobs where asked), and how the upstream ended
    the request (`finish`: "stop", "length" or "abort", with its message) once it did."""

    tokens: list[SampledToken] = field(default_factory=list)
    finish: str | None = None
    message: str = ""
    status: int | None = None  # an abort's HTTP status, where the upstream gives one
    prompt_tokens: int = 0
    cached_tokens: int = 0


def _entry_logprob(entry: Any) -> tuple[float, int]:
    return float(entry[0]), int(entry[1])


def read_chunk(payload: dict[str, Any], seen: int) -> Chunk:
    """The tokens of a chunk after the `seen` already read. SGLang streams every token so far in each chunk by
    default and only the new ones with `--incremental-streaming-output` (whale always): a chunk holding as many
    ids as `completion_tokens` says is cumulative."""
    if "error" in payload:
        error = payload["error"]
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        return Chunk(finish="abort", message=message)
    meta = payload.get("meta_info") or {}
    ids = [int(t) for t in payload.get("output_ids") or []]
    total = meta.get("completion_tokens")
    start = seen if total is not None and len(ids) == total and len(ids) >= seen else 0
    values = meta.get("output_token_logprobs")
    tops = meta.get("output_top_logprobs")
    tokens = []
    for index in range(start, len(ids)):
        logprob, top = None, None
        if values is not None and index < len(values):
            logprob = _entry_logprob(values[index])[0]
            if tops is not None and index < len(tops) and tops[index]:
                top = dict((t, lp) for lp, t in map(_entry_logprob, tops[index]))
        tokens.append(SampledToken(ids[index], logprob, top))
    chunk = Chunk(tokens, prompt_tokens=int(meta.get("prompt_tokens") or 0),
                  cached_tokens=int(meta.get("cached_tokens") or 0))
    finish = meta.get("finish_reason")
    if finish:
        kind = finish.get("type") if isinstance(finish, dict) else str(finish)
        chunk.finish = kind if kind in ("stop", "length") else "abort"
        if isinstance(finish, dict):
            chunk.message = str(finish.get("message") or "")
            chunk.status = finish.get("status_code")
    return chunk
