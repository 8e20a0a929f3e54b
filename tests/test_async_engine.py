"""The async front on the default model: concurrent streams, cancellation, error isolation, back-pressure."""

from __future__ import annotations

import asyncio
import time

import pytest

from whale import SamplingParams
from whale.engine.async_engine import AsyncEngine
from whale.engine.llm_engine import EngineConfig, LLMEngine
from whale.errors import EngineOverloadedError, InvalidRequestError, RequestFailedError

PROMPTS = ["The capital of France is", "Whales 🐳 are", "def add(a, b):"]


@pytest.fixture
def engine(default_llm):
    front = AsyncEngine(LLMEngine(default_llm.loaded, EngineConfig(block_size=4, num_kv_blocks=256)))
    yield front
    front.shutdown()


async def _collect(front: AsyncEngine, ids: list[int], params: SamplingParams):
    deltas = [d async for d in front.generate(ids, params)]
    return deltas


def test_concurrent_streams_equal_offline_generation(default_llm, engine):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [default_llm.tokenizer.encode(p) for p in PROMPTS]

    async def main():
        return await asyncio.gather(*(_collect(engine, ids, params) for ids in prompts))

    results = asyncio.run(main())
    for prompt, deltas in zip(PROMPTS, results, strict=True):
        offline = default_llm.generate(prompt, params)[0].outputs[0]
        assert [t for d in deltas for t in d.token_ids] == offline.token_ids
        assert "".join(d.text for d in deltas) == offline.text
        assert all("\ufffd" not in d.text for d in deltas)
        assert deltas[-1].finished and deltas[-1].finish_reason == "length"
        assert deltas[-1].completion_tokens == 16 and sum(d.finished for d in deltas) == 1


def test_cancelling_a_stream_aborts_the_request_and_frees_its_blocks(default_llm, engine):
    blocks = engine.engine.cache.blocks
    ids = default_llm.tokenizer.encode(PROMPTS[0])

    async def main():
        stream = engine.generate(ids, SamplingParams(temperature=0, max_tokens=500, ignore_eos=True), "cancelled")
        for _ in range(3):
            await anext(stream)
        request = engine.engine.requests["cancelled"]  # running on the engine thread
        await stream.aclose()  # what a disconnecting client does
        return request

    request = asyncio.run(main())
    deadline = time.monotonic() + 10
    while engine.engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.engine.has_unfinished()
    # aborted, not run to its 500 tokens (which a fast machine does within the deadline above)
    assert request.finish_reason == "abort" and len(request.output_token_ids) < 500
    assert blocks.num_free_blocks == blocks.num_blocks


def test_a_failing_request_does_not_touch_the_others(default_llm, engine):
    def broken(output_ids, logits):
        if len(output_ids) == 2:
            raise RuntimeError("processor bug")
        return logits

    def poisons(output_ids, logits):
        return logits * float("nan")

    good = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ids = default_llm.tokenizer.encode(PROMPTS[1])

    async def main():
        return await asyncio.gather(
            _collect(engine, ids, SamplingParams(temperature=0, max_tokens=8, logits_processors=[broken])),
            _collect(engine, ids, SamplingParams(temperature=0, max_tokens=8, logits_processors=[poisons])),
            _collect(engine, ids, good), return_exceptions=True)

    bad, nan, ok = asyncio.run(main())
    assert isinstance(bad, RequestFailedError) and "processor bug" in str(bad)
    assert isinstance(nan, RequestFailedError) and "NaN" in str(nan)
    assert [t for d in ok for t in d.token_ids] == default_llm.generate(PROMPTS[1], good)[0].outputs[0].token_ids
    assert engine.engine.cache.blocks.num_free_blocks == engine.engine.cache.blocks.num_blocks


def test_a_request_the_engine_cannot_take_fails_alone_and_the_engine_thread_goes_on(default_llm, engine):
    """A bug while taking a request (here: a seed torch cannot take, slipped past SamplingParams' own check)
    used to end the engine thread, and every later request waited forever."""
    unseedable = SamplingParams(temperature=1.0, seed=1, max_tokens=4)
    unseedable.seed = 2**70
    good = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ids = default_llm.tokenizer.encode(PROMPTS[0])

    async def main():
        return await asyncio.gather(asyncio.wait_for(_collect(engine, ids, unseedable), 60), return_exceptions=True)

    (failed,) = asyncio.run(main())
    assert isinstance(failed, RequestFailedError) and "could not take this request" in str(failed)
    deltas = asyncio.run(_collect(engine, ids, good))
    assert [t for d in deltas for t in d.token_ids] == default_llm.generate(PROMPTS[0], good)[0].outputs[0].token_ids


def test_a_request_whose_output_cannot_be_reported_fails_alone(default_llm, engine, monkeypatch):
    """A bug while turning a request's output into a delta (fault injected: a wrapper that raises for the request
    marked by max_tokens=3) used to end the engine thread, and every request waited forever."""
    report = AsyncEngine._delta

    def faulty(self, request):
        if request.params.max_tokens == 3:
            raise RuntimeError("reporting bug")
        return report(self, request)

    monkeypatch.setattr(AsyncEngine, "_delta", faulty)
    good = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ids = default_llm.tokenizer.encode(PROMPTS[0])

    async def main():
        return await asyncio.gather(asyncio.wait_for(_collect(engine, ids, SamplingParams(max_tokens=3)), 60),
                                    asyncio.wait_for(_collect(engine, ids, good), 60), return_exceptions=True)

    failed, ok = asyncio.run(main())
    assert isinstance(failed, RequestFailedError) and "reporting bug" in str(failed)
    assert [t for d in ok for t in d.token_ids] == default_llm.generate(PROMPTS[0], good)[0].outputs[0].token_ids
    assert engine.engine.cache.blocks.num_free_blocks == engine.engine.cache.blocks.num_blocks


def test_a_seed_beyond_64_bits_is_refused_by_the_sampling_params():
    with pytest.raises(InvalidRequestError, match="64-bit seed"):
        SamplingParams(seed=2**64)


def test_bad_and_excess_requests_are_refused_at_once(default_llm):
    front = AsyncEngine(LLMEngine(default_llm.loaded, EngineConfig(max_num_seqs=1)), max_waiting=0)
    ids = default_llm.tokenizer.encode(PROMPTS[0])

    async def main():
        with pytest.raises(InvalidRequestError, match="shorten the prompt"):
            await anext(front.generate([1] * 10**5, SamplingParams()))
        first = front.generate(ids, SamplingParams(max_tokens=200, ignore_eos=True))
        await anext(first)
        with pytest.raises(EngineOverloadedError, match="retry later"):
            await anext(front.generate(ids, SamplingParams()))
        await first.aclose()

    try:
        asyncio.run(main())
    finally:
        front.shutdown()
