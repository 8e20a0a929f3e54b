"""vLLM's OpenAI completions protocol with token ids (`POST /v1/completions`): the prompt as ids,
`return_token_ids` for the ids of each streamed piece, `return_tokens_as_token_ids` for logprobs keyed by id,
the usage chunk for the prompt's cached tokens. whale's own `/v1/completions` takes the same extras."""

from __future__ import annotations

import json
from typing import Any

from whale.engine.sampler import SampledToken
from whale.errors import RequestFailedError
from whale.sampling_params import SamplingParams, StructuredOutput
from whale.upstream.wire import Chunk, error_chunk, no_lark_grammar

ID_PREFIX = "token_id:"


def _token(name: str) -> int:
    return int(name[len(ID_PREFIX):]) if name.startswith(ID_PREFIX) else -1


class VLLMWire:
    name, path = "vLLM", "/v1/completions"

    def __init__(self, model: str | None = None):
        self.model = model  # the upstream's served model id (None: the first it lists, asked at first use)

    def structured_outputs(self, structured: StructuredOutput) -> dict[str, Any]:
        """vLLM's `structured_outputs` for `structured`; a Lark grammar has none that every vLLM backend reads."""
        if structured.kind == "json_schema":
            return {"json": json.loads(structured.value)}
        if structured.kind == "json_object":
            return {"json": {"type": "object"}}
        if structured.kind == "regex":
            return {"regex": structured.value}
        if structured.kind == "choice":
            return {"choice": json.loads(structured.value)}
        raise no_lark_grammar(self.name)

    def check(self, structured: StructuredOutput) -> None:
        self.structured_outputs(structured)

    def body(self, prompt_ids: list[int], params: SamplingParams, rid: str, *, max_new_tokens: int,
             min_new_tokens: int, structured: StructuredOutput | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model, "prompt": prompt_ids, "max_tokens": max_new_tokens, "min_tokens": min_new_tokens,
            "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
            "min_p": params.min_p, "frequency_penalty": params.frequency_penalty,
            "presence_penalty": params.presence_penalty, "repetition_penalty": params.repetition_penalty,
            "ignore_eos": params.ignore_eos, "skip_special_tokens": False, "include_stop_str_in_output": True,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
        if params.stop_strings:
            body["stop"] = list(params.stop_strings)
        if params.stop_token_ids:
            body["stop_token_ids"] = list(params.stop_token_ids)
        if params.seed is not None:
            body["seed"] = params.seed
        if structured is not None:
            body["structured_outputs"] = self.structured_outputs(structured)
        if params.logprobs is not None:
            body.update(logprobs=params.logprobs, return_tokens_as_token_ids=True)
        return body

    def read(self, payload: dict[str, Any], seen: int) -> Chunk:
        if "error" in payload:
            return error_chunk(payload)
        chunk = Chunk()
        usage = payload.get("usage")
        if usage:
            chunk.prompt_tokens = usage.get("prompt_tokens")
            chunk.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        for choice in payload.get("choices") or []:
            ids = choice.get("token_ids")
            if ids is None:
                raise RequestFailedError("the upstream sent no token ids: it needs vLLM's `return_token_ids` "
                                         "(vLLM 0.10.2 or later)")
            logprobs = choice.get("logprobs") or {}
            values, tops = logprobs.get("token_logprobs"), logprobs.get("top_logprobs")
            for index, token in enumerate(ids):
                logprob = values[index] if values is not None and index < len(values) else None
                top = None
                if tops is not None and index < len(tops) and tops[index]:
                    top = {_token(name): lp for name, lp in tops[index].items()}
                chunk.tokens.append(SampledToken(int(token), logprob, top))
            finish = choice.get("finish_reason")
            if finish:
                chunk.finish = finish if finish in ("stop", "length") else "abort"
                chunk.message = "" if chunk.finish != "abort" else f"finish_reason {finish}"
        return chunk
