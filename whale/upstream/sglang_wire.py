"""SGLang's native generation protocol (`POST /generate`), the one both SGLang's engine and its model gateway
(smg) take token ids through: a request body from whale's SamplingParams, and the streamed chunks read back as
tokens. whale's own server speaks it too (server/gateway_api.py), so a whale replica behind the gateway is read
the same way."""

from __future__ import annotations

import json
from typing import Any

from whale.engine.sampler import SampledToken
from whale.sampling_params import SamplingParams, StructuredOutput
from whale.upstream.wire import Chunk, error_chunk, no_lark_grammar, regex_literal


def _logprob(entry: Any) -> tuple[float, int]:
    return float(entry[0]), int(entry[1])


class SGLangWire:
    name, path = "SGLang", "/generate"

    def structured_fields(self, structured: StructuredOutput) -> dict[str, str]:
        """The sampling parameter that asks for `structured`; Lark grammars (whale's forced and strict tool calls)
        have none: SGLang's `ebnf` is another dialect."""
        if structured.kind == "json_schema":
            return {"json_schema": structured.value}
        if structured.kind == "json_object":
            return {"json_schema": json.dumps({"type": "object"})}
        if structured.kind == "regex":
            return {"regex": structured.value}
        if structured.kind == "choice":
            return {"regex": "(" + "|".join(regex_literal(c) for c in json.loads(structured.value)) + ")"}
        raise no_lark_grammar(self.name)

    def check(self, structured: StructuredOutput) -> None:
        self.structured_fields(structured)

    def body(self, prompt_ids: list[int], params: SamplingParams, rid: str, *, max_new_tokens: int,
             min_new_tokens: int, structured: StructuredOutput | None) -> dict[str, Any]:
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
            sampling.update(self.structured_fields(structured))
        body: dict[str, Any] = {"input_ids": prompt_ids, "sampling_params": sampling, "stream": True, "rid": rid}
        if params.logprobs is not None:
            body.update(return_logprob=True, top_logprobs_num=params.logprobs, logprob_start_len=-1)
        return body

    def read(self, payload: dict[str, Any], seen: int) -> Chunk:
        """SGLang streams every token so far in each payload by default, only the new ones with
        `--incremental-streaming-output` (whale always): a payload holding as many ids as `completion_tokens`
        says is cumulative."""
        if "error" in payload:
            return error_chunk(payload)
        meta = payload.get("meta_info") or {}
        ids = [int(t) for t in payload.get("output_ids") or []]
        total = meta.get("completion_tokens")
        start = seen if total is not None and len(ids) == total and len(ids) >= seen else 0
        values, tops = meta.get("output_token_logprobs"), meta.get("output_top_logprobs")
        tokens = []
        for index in range(start, len(ids)):
            logprob, top = None, None
            if values is not None and index < len(values):
                logprob = _logprob(values[index])[0]
                if tops is not None and index < len(tops) and tops[index]:
                    top = {t: lp for lp, t in map(_logprob, tops[index])}
            tokens.append(SampledToken(ids[index], logprob, top))
        chunk = Chunk(tokens, prompt_tokens=meta.get("prompt_tokens"), cached_tokens=meta.get("cached_tokens"))
        finish = meta.get("finish_reason")
        if finish:
            kind = finish.get("type") if isinstance(finish, dict) else str(finish)
            chunk.finish = kind if kind in ("stop", "length") else "abort"
            if isinstance(finish, dict):
                chunk.message = str(finish.get("message") or "")
                chunk.status = finish.get("status_code")
        return chunk
