"""`UpstreamEngine`: the local engine's interface (`generate(prompt_ids, params, request_id)` -> StreamDelta
stream) over an engine reached by HTTP, through a `Wire` (wire.py: SGLang's `/generate` or vLLM's completions).

Every token the upstream sends is replayed through a whale `Request` (engine/request.py): its detokenizer, stop
checks and controllers are the local engine's own, so text, finish reasons and usage read the same. The
controllers the upstream cannot run itself are enforced between calls: where a controller forces a token the
upstream did not produce (the reasoning budget's end of thinking, the format's tail before a grammar), the front
writes the forced tokens and continues with a new call on the whole sequence so far (the upstream's prefix cache
makes that a short prefill). A grammar goes to the upstream from the first answer token on (a call that started
in the thinking ends there) and is the upstream's to hold from then (its grammar engine may allow other
whitespace than whale's llguidance); the end-of-sequence ban after thinking becomes `min_new_tokens`.

The same continuation resumes a reply whose upstream stream broke off (a replica that died under the gateway):
the next call carries every token so far, and the gateway sends it to a live replica. Only where that cannot
work (no upstream answers, a grammar mid-answer, `max_resumes` spent) does the reply end early, as a failed one
does (finish_reason insufficient_system_resource)."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from whale.engine.async_engine import DeltaCursor, StreamDelta
from whale.engine.grammar import GrammarController
from whale.engine.request import Request
from whale.engine.sampler import SampledToken
from whale.errors import (
    CapabilityError,
    EngineOverloadedError,
    InvalidRequestError,
    RequestFailedError,
)
from whale.sampling_params import SamplingParams
from whale.upstream import PROTOCOLS
from whale.upstream.sglang_wire import SGLangWire
from whale.upstream.vllm_wire import VLLMWire
from whale.upstream.wire import Chunk, Wire

CONNECT_TIMEOUT_S = 5.0
log = logging.getLogger("whale.upstream")


def wire_for(protocol: str, model: str | None = None) -> Wire:
    """The Wire of a protocol name; `model` is the model id a vLLM upstream serves (None: the first it lists)."""
    if protocol not in PROTOCOLS:
        raise InvalidRequestError(f"upstream protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    return SGLangWire() if protocol == "sglang" else VLLMWire(model)


class UpstreamBroke(RequestFailedError):
    """The upstream's stream ended before its request did (a connection cut, an engine that died)."""


@dataclass
class _Running:
    request: Request
    response: httpx.Response | None = None
    error: str | None = None  # set by fail_all
    calls: int = 0
    grammar_start: int | None = None  # output tokens before the grammar took over


@dataclass
class UpstreamEngine:
    """Requests go to the first of `urls` that accepts a connection (the others are fallbacks: for load
    balancing, put SGLang's gateway in front of the replicas and give its URL), in `wire`'s protocol. `api_key`
    is sent as a bearer token; `max_in_flight` requests beyond which new ones get a 503."""

    urls: list[str]
    tokenizer: object
    max_model_len: int
    eos_token_ids: frozenset[int]
    vocab_size: int
    wire: Wire = field(default_factory=SGLangWire)
    api_key: str | None = None
    max_in_flight: int = 1024
    max_resumes: int = 2  # calls one reply may start again after its stream broke off
    _running: dict[str, _Running] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=itertools.count)
    _client: httpx.AsyncClient | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    @property
    def num_unfinished(self) -> int:
        return len(self._running)

    def _check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty: send at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_ids)} tokens but this model serves at most {self.max_model_len} "
                "tokens including the completion: shorten the prompt")
        if params.logits_processors or params.prompt_logprobs is not None:
            raise CapabilityError("logits processors and prompt logprobs need a local engine; this server's "
                                  "engine is an upstream")
        if params.structured_output is not None:
            self.wire.check(params.structured_output)  # a kind the protocol cannot carry is a 400 now
        if len(self._running) >= self.max_in_flight:
            raise EngineOverloadedError(f"{len(self._running)} requests are in flight, the limit of this server: "
                                        "retry later")

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[StreamDelta]:
        self._check(prompt_token_ids, params)
        self._loop = asyncio.get_running_loop()
        request_id = request_id or f"req-{next(self._ids)}"
        request = Request(request_id, prompt_token_ids, params, self.tokenizer, self.max_model_len,
                          self.eos_token_ids, vocab_size=self.vocab_size)
        running = _Running(request)
        self._running[request_id] = running
        cursor, resumes = DeltaCursor(), 0
        try:
            while not request.status.finished:
                try:
                    async for _ in self._call(running):
                        if not request.status.finished and cursor.tokens < len(request.output_token_ids):
                            yield cursor.next(request)
                except UpstreamBroke as exc:
                    if running.error is not None or resumes == self.max_resumes:
                        raise
                    resumes += 1
                    log.warning("%s: %s; resuming after %d tokens", request_id, exc,
                                len(request.output_token_ids))
            yield cursor.next(request)  # the last, once the call has ended (its usage read)
        except RequestFailedError as exc:
            log.warning("%s: %s", request_id, exc)
            raise
        finally:
            self._running.pop(request_id, None)
            if running.response is not None:
                await running.response.aclose()  # the upstream aborts a request whose connection closes

    # -- one upstream call ------------------------------------------------------------------------------------
    def _force(self, request: Request) -> None:
        """Write the tokens the controllers force now (the end of thinking, a format's tail)."""
        while not request.status.finished:
            constraint = request.constraint()
            if constraint is None or constraint.only is None:
                return
            request.append(SampledToken(constraint.only, 0.0 if request.params.logprobs is not None else None,
                                        {} if request.params.logprobs else None))

    def _body(self, running: _Running) -> tuple[dict, GrammarController | None]:
        request = running.request
        params = request.params
        produced = len(request.output_token_ids)
        constraint = request.constraint()
        banned_end = constraint is not None and bool(constraint.banned & self.eos_token_ids)
        min_new = max(params.min_tokens - produced, 1 if banned_end else 0)
        room = (params.max_tokens or math.inf) - produced
        max_new = int(min(room, self.max_model_len - request.num_tokens))
        grammar = next((c for c in request.controllers if isinstance(c, GrammarController)), None)
        structured = None
        if grammar is not None and grammar.constraining:
            running.grammar_start = produced if running.grammar_start is None else running.grammar_start
            if running.grammar_start != produced:
                raise RequestFailedError("the upstream's output left the grammar and cannot be resumed mid-answer")
            structured = params.structured_output
        body = self.wire.body(list(request.all_token_ids), params, f"{request.request_id}-{running.calls}",
                              max_new_tokens=max_new, min_new_tokens=min_new, structured=structured)
        return body, grammar

    async def _call(self, running: _Running) -> AsyncIterator[None]:
        """One upstream call: its tokens into the request, a yield after each chunk; returns when the upstream
        ends (after a finished call, the payloads up to `[DONE]`: vLLM's usage comes last), when the request is
        finished while the upstream goes on, or when a controller needs a new call."""
        request = running.request
        self._force(request)
        if request.status.finished:
            yield None
            return
        body, grammar = self._body(running)
        pending_grammar = grammar is not None and not grammar.constraining
        first = running.calls == 0
        running.calls += 1
        produced = len(request.output_token_ids)
        seen, ended = 0, Chunk()
        async with self._stream(running, body) as payloads:
            async for payload in payloads:
                chunk = self.wire.read(payload, seen)
                seen += len(chunk.tokens)
                if first and chunk.cached_tokens is not None:
                    request.num_cached_tokens = min(chunk.cached_tokens, request.num_prompt_tokens)
                ended = chunk if chunk.finish is not None else ended
                if chunk.tokens and not self._take(running, chunk, grammar, pending_grammar):
                    yield None
                    return
                yield None
                if request.status.finished and ended.finish is None:
                    return  # finished here (a stop string) while the upstream goes on: closing aborts it
            if ended.finish is None and not request.status.finished:
                raise UpstreamBroke(running.error or "the upstream engine's stream ended before the request did")
        if ended.finish == "abort" and not request.status.finished:
            raise self._abort_error(ended)
        if len(request.output_token_ids) == produced and not request.status.finished:
            raise RequestFailedError("the upstream engine ended the request without output: "
                                     f"{ended.message or ended.finish or 'no reason given'}")

    def _take(self, running: _Running, chunk: Chunk, grammar: GrammarController | None,
              pending_grammar: bool) -> bool:
        """The chunk's tokens into the request; False when this call must end (a forced token the upstream
        did not write, or the grammar's turn)."""
        request = running.request
        for sampled in chunk.tokens:
            if request.status.finished:
                return False
            # once the grammar holds (the upstream's to enforce) nothing is forced: skip computing its mask
            constraint = None if grammar is not None and grammar.constraining else request.constraint()
            if constraint is not None and constraint.only is not None and sampled.token_id != constraint.only:
                self._force(request)
                return False
            request.append(sampled)
            if pending_grammar and grammar.constraining:
                running.grammar_start = len(request.output_token_ids)
                return False
        return True

    # -- HTTP --------------------------------------------------------------------------------------------------
    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.AsyncClient(
                headers=headers, timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        return self._client

    def _stream(self, running: _Running, body: dict) -> _UpstreamStream:
        return _UpstreamStream(self, running, body)

    def _abort_error(self, chunk: Chunk) -> Exception:
        message = f"the upstream engine ended the request: {chunk.message or 'no reason given'}"
        if chunk.status is not None and 400 <= chunk.status < 500:
            return InvalidRequestError(message)
        return RequestFailedError(message)

    def fail_all(self, message: str) -> None:
        """End every request in flight with a RequestFailedError(message); safe from any thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fail_all, message)

    def _fail_all(self, message: str) -> None:
        for running in self._running.values():
            running.error = message
            if running.response is not None:
                asyncio.ensure_future(running.response.aclose())

    def shutdown(self) -> None:
        """Nothing runs here to stop: the requests end with their connections, which close with the server."""


class _UpstreamStream:
    """`async with` one streamed call: connects to the first upstream that answers, maps refusals to whale's
    errors, and yields each `data:` payload as a dict."""

    def __init__(self, engine: UpstreamEngine, running: _Running, body: dict):
        self.engine, self.running, self.body = engine, running, body

    async def __aenter__(self) -> AsyncIterator[dict]:
        client, wire = self.engine._http(), self.engine.wire
        failures = []
        for url in self.engine.urls:
            try:
                if getattr(wire, "model", "") is None:  # vLLM wants its served name: the first it lists
                    listed = (await client.get(f"{url.rstrip('/')}/v1/models")).json()
                    wire.model = listed["data"][0]["id"]
                    self.body["model"] = wire.model
                request = client.build_request("POST", f"{url.rstrip('/')}{wire.path}", json=self.body)
                response = await client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failures.append(f"{url}: {exc or type(exc).__name__}")
                continue
            self.running.response = response
            if response.status_code >= 400:
                raise await self._refusal(response)
            return self._payloads(response)
        raise EngineOverloadedError("no upstream engine accepts a connection (" + "; ".join(failures) +
                                    "): retry later")

    async def __aexit__(self, *exc_info: object) -> None:
        response, self.running.response = self.running.response, None
        if response is not None:
            await response.aclose()

    async def _refusal(self, response: httpx.Response) -> Exception:
        text = (await response.aread()).decode(errors="replace")
        try:
            error = json.loads(text).get("error", text)
            message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        except (ValueError, AttributeError):
            message = text.strip() or response.reason_phrase
        status = response.status_code
        if status in (429, 503):
            return EngineOverloadedError(f"the upstream engine is busy: {message}")
        if status < 500:
            return InvalidRequestError(f"the upstream engine refused the request ({status}): {message}")
        return RequestFailedError(f"the upstream engine failed the request ({status}): {message}")

    async def _payloads(self, response: httpx.Response) -> AsyncIterator[dict]:
        """Each `data:` payload until `[DONE]` or the end of the body."""
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                yield json.loads(data)
        except (httpx.HTTPError, httpx.StreamError, ValueError) as exc:
            raise UpstreamBroke(self.running.error or "the upstream engine's stream broke off mid-way: "
                                f"{exc or type(exc).__name__}") from None
