"""The serving engine on the default model: paged cache, prefix caching, chunked prefill, preemption, abort.
Each configuration is checked against the plain engine's greedy tokens."""

from __future__ import annotations

import pytest
import torch

from whale import SamplingParams
from whale.cache_spec import KVCacheSpec
from whale.engine.kv_cache import BlockManager
from whale.engine.llm_engine import EngineConfig, LLMEngine
from whale.engine.paged_attention import create_cache

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived",
           "def fibonacci(n):", "The three primary colours are", "Whales are mammals that"]


def _run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams = GREEDY):
    requests = [engine.add_request(p, params) for p in prompts]
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return requests, steps


@pytest.fixture(scope="module")
def prompt_ids(default_llm):
    return [default_llm.tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def expected(default_llm, prompt_ids):
    """Greedy tokens of each prompt run alone on a roomy engine."""
    engine = LLMEngine(default_llm.loaded, EngineConfig(enable_prefix_caching=False))
    return [_run(engine, [p])[0][0].output_token_ids for p in prompt_ids]


def test_prefix_cache_hit_serves_full_blocks_and_gives_the_same_tokens(default_llm):
    engine = LLMEngine(default_llm.loaded, EngineConfig(block_size=4))
    system = default_llm.tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are a terse assistant who answers in one line."},
         {"role": "user", "content": "Name a large sea mammal."}])
    ids = default_llm.tokenizer.encode(system, add_special_tokens=False)
    (first,), _ = _run(engine, [ids])
    (second,), _ = _run(engine, [ids])
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == (len(ids) - 1) // 4 * 4  # every full block but the one with the last token
    assert second.output_token_ids == first.output_token_ids
    # a different continuation of the same prefix hits the shared blocks only
    (third,), _ = _run(engine, [ids[:17] + [ids[0]] * 5])
    assert third.num_cached_tokens == 16


def test_eviction_under_a_tiny_block_budget(default_llm, prompt_ids, expected):
    engine = LLMEngine(default_llm.loaded, EngineConfig(block_size=4, num_kv_blocks=8))
    long_prompt = prompt_ids[4] + prompt_ids[1]  # 20 tokens + 12 generated: all 8 blocks, no shared prefix
    (reference,), _ = _run(LLMEngine(default_llm.loaded, EngineConfig(enable_prefix_caching=False)), [long_prompt])
    (a,), _ = _run(engine, [prompt_ids[1]])
    (warm,), _ = _run(engine, [prompt_ids[1]])
    assert warm.num_cached_tokens == (len(prompt_ids[1]) - 1) // 4 * 4
    (b,), _ = _run(engine, [long_prompt])  # takes every block: A's cached blocks are evicted
    (again,), _ = _run(engine, [prompt_ids[1]])
    assert again.num_cached_tokens == 0
    assert [a.output_token_ids, warm.output_token_ids, again.output_token_ids] == [expected[1]] * 3
    assert b.output_token_ids == reference.output_token_ids
    assert engine.cache.blocks.num_free_blocks == 8


def test_preemption_under_a_tiny_block_budget_completes_every_request(default_llm, prompt_ids, expected):
    engine = LLMEngine(default_llm.loaded, EngineConfig(block_size=4, num_kv_blocks=14))
    requests, _ = _run(engine, prompt_ids)
    assert sum(r.num_preemptions for r in requests) > 0, "the budget is small enough to force preemption"
    assert [r.output_token_ids for r in requests] == expected
    assert all(r.finish_reason == "length" for r in requests)


def test_chunked_prefill_mixed_with_decodes_gives_the_same_tokens(default_llm, prompt_ids, expected):
    engine = LLMEngine(default_llm.loaded, EngineConfig(max_num_batched_tokens=5, enable_prefix_caching=False))
    requests, steps = _run(engine, prompt_ids)
    assert steps > sum(len(p) for p in prompt_ids) // 5  # prompts really went in 5-token chunks
    assert [r.output_token_ids for r in requests] == expected


def test_max_num_seqs_bounds_the_running_batch(default_llm, prompt_ids, expected):
    engine = LLMEngine(default_llm.loaded, EngineConfig(max_num_seqs=2))
    requests = [engine.add_request(p, GREEDY) for p in prompt_ids]
    while engine.has_unfinished():
        engine.step()
        assert len(engine.scheduler.running) <= 2
    assert [r.output_token_ids for r in requests] == expected


def test_abort_frees_every_block(default_llm, prompt_ids):
    engine = LLMEngine(default_llm.loaded, EngineConfig(block_size=4, num_kv_blocks=64))
    # ignore_eos: a sampled end of text would finish a request before its abort
    requests = [engine.add_request(p, SamplingParams(max_tokens=50, ignore_eos=True)) for p in prompt_ids]
    for _ in range(3):
        engine.step()
    assert engine.cache.blocks.num_free_blocks < 64
    for request in requests:
        engine.abort(request.request_id)
    assert engine.cache.blocks.num_free_blocks == 64
    assert all(r.finish_reason == "abort" for r in requests) and not engine.has_unfinished()
    assert engine.step() == []


def _resident_bytes() -> int:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024


def test_a_cache_sized_for_a_long_context_is_resident_only_where_written():
    before = _resident_bytes()
    cache = create_cache(KVCacheSpec("mha", num_layers=28, num_kv_heads=2, head_dim=128), torch.float32,
                         num_blocks=4096, block_size=16)  # 65,536 tokens: 3.5 GiB of K and V
    assert sum(s.numel() * s.element_size() for s in cache.stores.values()) == 28 * 65536 * 2 * 256 * 4
    assert all(not s.any() for s in (cache.stores["k"][:, :64], cache.stores["v"][:, -64:]))  # reads as zeros
    assert _resident_bytes() - before < 256 * 2**20
    # what /metrics reports as written (blocks handed out so far) is what became resident
    assert cache.blocks.grow("a", 64 * 16)
    written = cache.blocks.blocks_written * cache.block_size * cache.bytes_per_token()
    assert written == 64 * 16 * 28 * 2 * 256 * 4
    # one token's row in every layer costs its bytes, not a huge page of each layer's storage (2 MiB x 56)
    before = _resident_bytes()
    for store in cache.stores.values():
        store[:, 0] = 1.0
    assert _resident_bytes() - before < 16 * 2**20
    for store in cache.stores.values():
        store[:, :64 * 16] = 1.0
    assert written <= _resident_bytes() - before < written + 256 * 2**20


def test_block_manager_chains_hashes_and_evicts_least_recently_freed():
    blocks = BlockManager(num_blocks=4, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    assert blocks.prefix_hashes([9, 9, 3, 4])[1] != blocks.prefix_hashes(prompt)[1]  # same block, other prefix
    assert blocks.allocate_prefix("a", prompt) == 0 and blocks.grow("a", 5) and blocks.blocks_written == 3
    blocks.register_full_blocks("a", prompt, 5)
    assert blocks.allocate_prefix("b", prompt) == 4  # two full blocks shared
    assert blocks.grow("b", 6) and blocks.ref_counts[blocks.block_table("a")[0]] == 2 and blocks.blocks_written == 4
    assert not blocks.grow("c", 4)  # 4 blocks: a has 3, b shares 2 and owns 1 -> none free
    blocks.free("b")
    blocks.free("a")
    assert blocks.num_free_blocks == 4
    assert blocks.allocate_prefix("d", prompt) == 4  # still cached after free
    blocks.free("d")
    assert blocks.grow("e", 8)  # takes all four blocks: the cached ones are evicted
    assert blocks.allocate_prefix("f", prompt) == 0 and blocks.blocks_written == 4


def test_a_repeated_greedy_chat_decodes_the_same_tokens_in_the_default_configuration():
    """The server's defaults (kernels and dtype chosen for this CPU: on AVX-512 bf16 the hybrid int4/GEMM
    linears). Prompts sharing a system prompt hit each other's cached blocks, so each second send computes only
    its last tokens; before prompt steps took one path whatever their size, 2 of these 7 changed their reply."""
    from whale import LLM

    llm = LLM("default")
    greedy = SamplingParams(temperature=0, max_tokens=24)
    system = {"role": "system", "content": "You are a helpful, terse assistant. Answer briefly."}
    asks = ["Say hello.", "What is the capital of France?", "Write a haiku about the sea.", "Count to five.",
            "Name three colors.", "Explain gravity in one sentence.", "What is 2+2?"]
    hits = []
    for ask in asks:
        messages = [system, {"role": "user", "content": ask}]
        first, second = llm.chat(messages, greedy), llm.chat(messages, greedy)
        hits.append((first.num_cached_tokens, second.num_cached_tokens))
        assert second.outputs[0].token_ids == first.outputs[0].token_ids, ask
    assert all(second >= 16 for _, second in hits)
    assert any(second > first for first, second in hits)  # some second sends computed fewer prompt tokens
