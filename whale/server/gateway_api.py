"""What SGLang's model gateway (smg) asks of a worker, so that a `whale serve` replica can stand behind it:
`/server_info` and `/model_info` (the served name, so the gateway does not call the model "unknown"), `/get_load`
(running and waiting requests) and SGLang's native `/generate`, the route through which the gateway and SGLang's
clients send token ids. The `get_` spellings are the older names the gateway falls back to."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import Field, model_validator

from whale import __version__
from whale.engine.async_engine import StreamDelta
from whale.errors import CapabilityError, InvalidRequestError
from whale.sampling_params import SamplingParams, StructuredOutput
from whale.server.metrics import engine_gauges
from whale.server.protocol import StopField, WireModel, check_stop
from whale.server.served_model import PreparedRequest
from whale.server.state import ServerState, start_generation
from whale.server.streaming import Collected, collect_response, sse, sse_deltas

SGLANG_MAX_NEW_TOKENS = 128  # SGLang's default when a request names none


class GenerateSampling(WireModel):
    """SGLang's `sampling_params`, with its defaults."""

    max_new_tokens: int | None = Field(default=SGLANG_MAX_NEW_TOKENS, ge=1)
    min_new_tokens: int = Field(default=0, ge=0)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = -1
    min_p: float = Field(default=0.0, ge=0, le=1)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, gt=0)
    stop: StopField = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    n: int = Field(default=1, ge=1, le=1)

    def structured(self) -> StructuredOutput | None:
        if self.ebnf is not None:
            raise CapabilityError("'ebnf' grammars are not taken here: send 'json_schema' or 'regex'")
        if self.json_schema is not None and self.regex is not None:
            raise InvalidRequestError("send one of 'json_schema' and 'regex'")
        if self.json_schema is not None:
            return StructuredOutput("json_schema", self.json_schema)
        return StructuredOutput("regex", self.regex) if self.regex is not None else None


class GenerateRequest(WireModel):
    """SGLang's `/generate` body, one prompt: `text` or `input_ids`."""

    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: GenerateSampling = Field(default_factory=GenerateSampling)
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = Field(default=0, ge=0, le=20)
    rid: str | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("send exactly one of 'text' and 'input_ids'")
        check_stop(self.sampling_params.stop)
        return self


def _prepare(state: ServerState, body: GenerateRequest) -> PreparedRequest:
    s = body.sampling_params
    ids = body.input_ids if body.input_ids is not None else state.served.tokenizer.encode(body.text)
    if not ids:
        raise InvalidRequestError("the prompt is empty: send at least one token")
    params = SamplingParams(
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
        frequency_penalty=s.frequency_penalty, presence_penalty=s.presence_penalty,
        repetition_penalty=s.repetition_penalty, max_tokens=s.max_new_tokens, min_tokens=s.min_new_tokens,
        stop=s.stop, stop_token_ids=s.stop_token_ids, ignore_eos=s.ignore_eos,
        skip_special_tokens=s.skip_special_tokens, include_stop_str_in_output=s.no_stop_trim,
        seed=s.sampling_seed, structured_output=s.structured(),
        logprobs=body.top_logprobs_num if body.return_logprob else None)
    return PreparedRequest(state.served.name, list(ids), params)


def _finish_reason(collected: Collected) -> dict[str, Any] | None:
    last = collected.deltas[-1] if collected.deltas else None
    if collected.failed:
        return {"type": "abort", "message": "the request failed"}
    if last is None or not last.finished:
        return None
    if last.finish_reason == "length":
        return {"type": "length", "length": last.completion_tokens}
    if last.finish_reason == "stop":
        ids = [t for d in collected.deltas for t in d.token_ids]
        matched = last.stop_reason if last.stop_reason is not None else (ids[-1] if ids else None)
        return {"type": "stop", "matched": matched}
    return {"type": "abort"}


def _meta(rid: str, collected: Collected, deltas: list[StreamDelta], logprobs: bool) -> dict[str, Any]:
    prompt, completion, cached = collected.usage_counts()
    meta: dict[str, Any] = {"id": rid, "finish_reason": _finish_reason(collected), "prompt_tokens": prompt,
                            "completion_tokens": completion, "cached_tokens": cached}
    if logprobs:
        sampled = [s for d in deltas for s in d.logprobs]
        meta["output_token_logprobs"] = [[s.logprob, s.token_id, None] for s in sampled]
        meta["output_top_logprobs"] = [[[lp, t, None] for t, lp in sorted((s.top_logprobs or {}).items(),
                                                                         key=lambda kv: -kv[1])]
                                       for s in sampled]
    return meta


def _body(rid: str, collected: Collected, logprobs: bool) -> dict[str, Any]:
    ids = [t for d in collected.deltas for t in d.token_ids]
    return {"text": collected.text, "output_ids": ids, "meta_info": _meta(rid, collected, collected.deltas, logprobs)}


async def _events(rid: str, items: AsyncIterator[StreamDelta | str | Exception], logprobs: bool) -> AsyncIterator[str]:
    """Incremental chunks (SGLang's `--incremental-streaming-output`): each chunk's text and ids are the new
    ones, its meta_info counts all; a failure is an `error` payload."""
    collected = Collected()
    async for item in items:
        if isinstance(item, str):
            yield item
            continue
        if isinstance(item, Exception):
            yield sse({"error": {"message": str(item)}})
            break
        collected.deltas.append(item)
        yield sse({"text": item.text, "output_ids": item.token_ids,
                   "meta_info": _meta(rid, collected, [item], logprobs)})
    yield sse("[DONE]")


async def generate(body: GenerateRequest, request: Request) -> Response:
    state: ServerState = request.app.state.whale
    prepared = _prepare(state, body)
    rid = body.rid or uuid.uuid4().hex
    stream, first = await start_generation(state, prepared, rid, request.scope)
    if not body.stream:
        return await collect_response(request, stream, state.timings,
                                      lambda c: _body(rid, c, body.return_logprob), first)
    return StreamingResponse(_events(rid, sse_deltas(stream, state.timings, first), body.return_logprob),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def server_info(request: Request) -> dict[str, Any]:
    state: ServerState = request.app.state.whale
    served = state.served
    return {"served_model_name": served.name, "model_type": served.config.get("model_type"),
            "context_length": served.max_model_len, "max_total_tokens": served.max_model_len,
            "tp_size": 1, "dp_size": 1, "version": f"whale {__version__}"}


async def model_info(request: Request) -> dict[str, Any]:
    served = request.app.state.whale.served
    architectures = served.config.get("architectures")
    return {"is_generation": True, "model_type": served.config.get("model_type"),
            "architectures": architectures if isinstance(architectures, list) else None}


async def get_load(request: Request) -> list[dict[str, Any]]:
    gauges = engine_gauges(request.app.state.whale.engine)
    return [{"dp_rank": 0, "num_reqs": gauges.running, "num_waiting_reqs": gauges.waiting,
             "num_tokens": gauges.kv_tokens_used}]


def build_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)
    router.add_api_route("/generate", generate, methods=["POST"], response_model=None)
    for path, handler in (("server_info", server_info), ("model_info", model_info)):
        for name in (path, f"get_{path}"):
            router.add_api_route(f"/{name}", handler, methods=["GET"])
    router.add_api_route("/get_load", get_load, methods=["GET"])
    return router
