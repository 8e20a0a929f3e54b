"""The async front: the engine steps on its own thread; `AsyncEngine.generate(...)` is an async iterator of
deltas for one request. Cancelling the iterator (a client that disconnects) aborts the request and frees its
blocks at once. The event loop never runs model code: requests and aborts cross to the engine thread through a
command queue, deltas come back through each request's asyncio queue.

Give it a factory (`AsyncEngine(lambda: LLMEngine(load_model(...)))`) rather than a built engine where speed
matters: the model is then loaded on the engine thread too. Once a second thread has run torch's OpenMP-parallel
ops, the two thread pools share the cores and small-op decode runs ~2x slower (measured: 70 vs 40 tok/s on
the default model, 2 cores)."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from whale.engine.llm_engine import LLMEngine
from whale.engine.request import Request
from whale.errors import EngineOverloadedError, RequestFailedError, WhaleError
from whale.sampling_params import SamplingParams


@dataclass(frozen=True)
class StreamDelta:
    """What one request produced since its previous delta."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list  # SampledToken per new token when logprobs were asked for
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    prompt_logprobs: list | None = None  # the first delta of a request that asked for them: Request.prompt_logprobs
    reasoning_tokens: int | None = None  # reasoning tokens so far, where the engine tracks them (a thinking budget)


# commands from the event loop to the engine thread
@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class FailAll:
    message: str


@dataclass(frozen=True)
class Stop:
    pass


EngineCommand = AddRequest | AbortRequest | FailAll | Stop


@dataclass
class DeltaCursor:
    """How much of one request's output its stream has sent; `next(request)` is the delta since then."""

    text: int = 0
    tokens: int = 0
    logprobs: int = 0

    def next(self, request: Request) -> StreamDelta:
        text = request.streamable_text()
        tokens = request.output_token_ids
        # the prompt's logprobs go with the first delta (the first token: the whole prompt is scored by then)
        first = self.tokens == 0 and request.params.prompt_logprobs is not None
        delta = StreamDelta(request.request_id, text[self.text:], tokens[self.tokens:],
                            request.logprobs[self.logprobs:], request.status.finished,
                            request.finish_reason, request.stop_reason, request.num_prompt_tokens,
                            len(tokens), request.num_cached_tokens, request.prompt_logprobs if first else None,
                            request.reasoning_tokens)
        self.text, self.tokens, self.logprobs = len(text), len(tokens), len(request.logprobs)
        return delta


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    deltas: asyncio.Queue
    cursor: DeltaCursor = field(default_factory=DeltaCursor)


class AsyncEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], max_waiting: int = 256):
        self.max_waiting = max_waiting
        self._commands: queue.Queue[EngineCommand] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stopped = False
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(engine,), name="whale-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    def _check(self, prompt_token_ids: list[int]) -> None:
        """Refuse at once what add_request would refuse, without touching the engine's state."""
        self.engine.check_prompt(prompt_token_ids)
        if len(self._streams) >= self.max_waiting + self.engine.config.max_num_seqs:
            raise EngineOverloadedError(f"{len(self._streams)} requests are in flight, the limit of this server: "
                                        "retry later")

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[StreamDelta]:
        self._check(prompt_token_ids)
        request_id = request_id or f"req-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        self._commands.put(AddRequest(request_id, list(prompt_token_ids), params))
        finished = False
        try:
            while not finished:
                item = await stream.deltas.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # cancelled or closed early: free its blocks now
                self._commands.put(AbortRequest(request_id))

    def fail_all(self, message: str) -> None:
        """End every request in flight with a RequestFailedError(message) (a server draining on shutdown); the
        streams end as any failed request does. Safe from any thread."""
        self._commands.put(FailAll(message))

    def shutdown(self) -> None:
        self._stopped = True
        self._commands.put(Stop())
        self._thread.join(timeout=30)

    # -- the engine thread ------------------------------------------------------------------------------------
    def _deliver(self, request_id: str, item: StreamDelta | Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.deltas.put_nowait, item)

    def _handle(self, command: EngineCommand) -> None:
        match command:
            case AddRequest(request_id, prompt_ids, params):
                if request_id not in self._streams:
                    return  # cancelled before it reached the engine
                try:
                    self.engine.add_request(prompt_ids, params, request_id=request_id)
                except WhaleError as exc:
                    self._deliver(request_id, exc)
                except Exception as exc:  # noqa: BLE001 - a bug in taking one request must not stop the engine thread
                    self._deliver(request_id, RequestFailedError(f"the engine could not take this request: {exc}"))
            case AbortRequest(request_id):
                self.engine.abort(request_id)
            case FailAll(message):
                self._fail_all(RequestFailedError(message))

    def _delta(self, request: Request) -> StreamDelta | Exception | None:
        stream = self._streams.get(request.request_id)
        if stream is None:
            return None
        if request.error is not None:
            return RequestFailedError(request.error)
        return stream.cursor.next(request)

    def _run(self, engine: LLMEngine | Callable[[], LLMEngine]) -> None:
        try:
            self.engine = engine if isinstance(engine, LLMEngine) else engine()
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor's caller
            self._startup_error = exc
            return
        finally:
            self._ready.set()
        while not self._stopped:
            # block for work only when idle; otherwise take what arrived and step
            try:
                command = self._commands.get(timeout=None if not self.engine.has_unfinished() else 0)
            except queue.Empty:
                command = None
            while command is not None:
                if isinstance(command, Stop):
                    return
                self._handle(command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            try:
                produced = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - a bug in one step must not leave every client hanging
                self._fail_all(RequestFailedError(f"the engine failed a step: {exc}"))
                continue
            for request in produced:
                try:
                    delta = self._delta(request)
                except Exception as exc:  # noqa: BLE001 - only this request ends; the engine thread goes on
                    self.engine.abort(request.request_id)
                    delta = RequestFailedError(f"the server could not report this request's output: {exc}")
                if delta is not None:
                    self._deliver(request.request_id, delta)

    def _fail_all(self, exc: RequestFailedError) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
            self._deliver(request_id, exc)
