"""whale's DeepSeek-V4 against transformers' reference on tiny checkpoints written to disk (every layer type, windows
and compression rates small enough that the contexts here cross many compression boundaries): logits of ragged
batches and of decode steps over cached context, greedy generations, chunked prefill, prefix-cache hits that end
mid compression window, and the released layout (original names, FP8 blocks, FP4 experts)."""

from __future__ import annotations

import re

import pytest
import torch
from deepseek_checkpoints import assert_greedy_like_reference, checkpoint_maker
from deepseek_v4_checkpoints import write_checkpoint

from whale import LLM
from whale.config import parse_hf_config
from whale.engine.llm_engine import EngineConfig, LLMEngine
from whale.engine.paged_attention import MAX_DEFAULT_TOKENS, PagedKVCache, create_cache
from whale.errors import ModelLoadError
from whale.models.deepseek_v4 import cache_spec
from whale.models.loader import load_model
from whale.planner.catalog import CATALOG, v4_config_json
from whale.planner.memory import kv_shape
from whale.sampling_params import SamplingParams

# prompt lengths per kind: past the window (8 / 16) and several CSA (4) and HCA (16 / 128) windows
LENGTHS = {"v4": [70, 37, 9], "v4_released": [300, 140, 21]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return checkpoint_maker(tmp_path_factory, write_checkpoint, "deepseek_v4")


def _prompts(kind: str, extra: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(len(kind))
    return [torch.randint(2, 256, (n + extra,), generator=generator).tolist() for n in LENGTHS[kind]]


def _step(model, cache, chunks: list[list[int]], starts: list[int]) -> list[torch.Tensor]:
    ids = torch.tensor([t for chunk in chunks for t in chunk])
    positions = torch.tensor([s + i for s, chunk in zip(starts, chunks, strict=True) for i in range(len(chunk))])
    cache.begin_step(list(range(len(chunks))), [len(c) for c in chunks])
    logits = model.compute_logits(model(ids, positions, cache))
    cache.end_step()
    return list(logits.split([len(c) for c in chunks]))


@pytest.mark.parametrize("kind", ["v4", "v4_released"])
@torch.inference_mode()
def test_logits_match_transformers_through_the_paged_cache(kind, checkpoints):
    """A ragged prefill of three prompts cut into two chunks each, then nine one-token decode steps: every
    token's logits within 1e-4 of transformers' on the whole sequence."""
    directory, reference = checkpoints(kind)
    model = load_model(str(directory), dtype="float32", device="cpu").model
    cache = create_cache(model.kv_cache_spec(), torch.float32, block_size=16)
    sequences = _prompts(kind, extra=9)
    prompts = [s[:-9] for s in sequences]
    cuts = [len(p) * 2 // 3 for p in prompts]
    got = [[] for _ in sequences]
    for chunks, starts in (([p[:c] for p, c in zip(prompts, cuts, strict=True)], [0, 0, 0]),
                           ([p[c:] for p, c in zip(prompts, cuts, strict=True)], cuts)):
        for pieces, logits in zip(got, _step(model, cache, chunks, starts), strict=True):
            pieces.append(logits)
    for step in range(9):
        tokens = [[s[len(p) + step]] for s, p in zip(sequences, prompts, strict=True)]
        for pieces, logits in zip(got, _step(model, cache, tokens, [len(p) + step for p in prompts]), strict=True):
            pieces.append(logits)
    for sequence, pieces in zip(sequences, got, strict=True):
        expected = reference(torch.tensor([sequence])).logits[0]
        assert (torch.cat(pieces) - expected).abs().max() <= 1e-4


@torch.inference_mode()
def test_the_cache_holds_what_each_layer_type_needs(checkpoints):
    """Window rows for every layer, compressor inputs and entries (one per rate tokens) for the compressed ones; the
    per-token rows live in a pool of their own whose blocks a sequence gives back once out of its window, so a
    sequence costs the entries per token plus a bounded window."""
    directory, _ = checkpoints("v4")
    model = load_model(str(directory), dtype="float32", device="cpu").model
    spec = model.kv_cache_spec()
    assert {s.name: (s.layers, s.shape, s.rate) for s in spec.stores} == {
        "window": (5, (32,), 1), "csa_rows": (2, (128,), 1), "index_rows": (2, (64,), 1),
        "csa": (2, (32,), 4), "index": (2, (16,), 4), "hca_rows": (2, (64,), 1), "hca": (2, (32,), 16)}
    assert spec.retain == 15  # the HCA window (16) less one; the sliding window is 8, two CSA windows 8
    cache = create_cache(spec, torch.float32, num_blocks=8, block_size=16)
    assert cache.stores["hca"].shape[1] == 8 and cache.stores["csa"].shape[1] == 32  # an entry per 16 / 4 tokens
    assert cache.bytes_per_token() == 4 * (2 * 32 / 4 + 2 * 16 / 4 + 2 * 32 / 16)  # fp32 entries only
    assert spec.window_bytes(16, 4) == 2 * 16 * 4 * (5 * 32 + 2 * 128 + 2 * 64 + 2 * 64)  # 15 tokens and 1 new
    ids = torch.randint(2, 256, (120,), generator=torch.Generator().manual_seed(0))
    for start in range(0, 120, 30):
        cache.begin_step([0], [30])
        model(ids[start:start + 30], torch.arange(start, start + 30), cache)
        cache.end_step()
        kept = [b for b in cache.pools["window"].block_table(0) if b >= 0]
        assert len(kept) <= spec.window_blocks(16, 30) and len(cache.blocks.block_table(0)) == -(-(start + 30) // 16)
    cache.free(0)
    assert cache.pools["window"].num_free_blocks == cache.pools["window"].num_blocks


@pytest.mark.parametrize(("kind", "speculative"), [("v4", "off"), ("v4_released", "off"), ("v4", "ngram")])
@torch.inference_mode()
def test_greedy_generations_match_transformers(kind, speculative, checkpoints):
    """32 greedy tokens of a ragged batch; with n-gram drafts (prompts that repeat themselves, so drafts are
    made and verified; the random model rejects them, and their cache rows and entries are overwritten) the
    same."""
    directory, reference = checkpoints(kind)
    llm = LLM(str(directory), dtype="float32", device="cpu", speculative=speculative)
    prompts = _prompts(kind) if speculative == "off" else [p[:12] * 4 for p in _prompts(kind)]
    assert_greedy_like_reference(llm, reference, prompts)
    if speculative != "off":
        assert llm.engine.speculation.drafted > 0


@torch.inference_mode()
def test_chunked_prefill_and_a_prefix_hit_mid_compression_window(checkpoints):
    """Prompts prefilled 24 tokens a step; a second prompt sharing the first's 150 tokens takes 144 of them from
    the prefix cache (mid HCA window 1 of tokens 128-255, mid window 36 of the CSA layers' 4): the logprobs of
    both equal transformers' greedy continuation."""
    directory, reference = checkpoints("v4_released")
    llm = LLM(str(directory), dtype="float32", device="cpu", max_num_batched_tokens=24, block_size=16)
    first = _prompts("v4_released")[0][:150]
    second = first + [7, 8, 9, 10, 11]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)
    for prompt, cached in ((first, 0), (second, 144)):
        output = llm.generate([{"prompt_token_ids": prompt}], params)[0]
        assert output.num_cached_tokens == cached
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                      eos_token_id=None, pad_token_id=0, output_logits=True,
                                      return_dict_in_generate=True)
        tokens = expected.sequences[0, len(prompt):].tolist()
        assert output.outputs[0].token_ids == tokens
        for step, token in enumerate(tokens):
            want = torch.log_softmax(expected.logits[step][0].float(), dim=-1)[token].item()
            assert output.outputs[0].logprobs[step][token] == pytest.approx(want, abs=1e-4)


@torch.inference_mode()
def test_a_prefix_hit_needs_the_window_before_it(checkpoints):
    """With one sequence at a time, 32 tokens a step, the window pool is small (20 blocks): a 400-token prompt in
    between hands out the blocks that held the first prompt's last window, so a prompt extending the first one
    hits only as far as both pools still hold (here nothing: the entries are cached, their window is not), and
    still computes what transformers does."""
    directory, reference = checkpoints("v4_released")
    llm = LLM(str(directory), dtype="float32", device="cpu", max_num_seqs=1, max_num_batched_tokens=32,
              block_size=16)
    first = _prompts("v4_released")[0][:150]
    other = torch.randint(2, 256, (400,), generator=torch.Generator().manual_seed(99)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate([{"prompt_token_ids": first}], params)
    llm.generate([{"prompt_token_ids": other}], params)
    assert llm.engine.cache.blocks.main.cached  # the first prompt's entries are still cached
    again = llm.generate([{"prompt_token_ids": first + [5, 6]}], params)[0]
    assert again.num_cached_tokens == 0
    expected = reference.generate(torch.tensor([first + [5, 6]]), max_new_tokens=4, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(first) + 2:]
    assert again.outputs[0].token_ids == expected.tolist()


@pytest.mark.parametrize("name", ["deepseek-v4-flash", "deepseek-v4-pro"])
def test_the_planner_counts_what_the_engine_allocates(name):
    """`whale plan`'s V4 cache figures are the engine's: a config.json of the model's shape parsed as the engine
    parses it, its cache built by the engine's allocator (bf16, 16-token blocks; storage mapped, not touched):
    the bytes a token costs in the pools that grow with a sequence, and a sequence's windowed blocks."""
    spec = cache_spec(parse_hf_config(v4_config_json(CATALOG[name])))
    cache = PagedKVCache(spec, num_blocks=64, block_size=16, dtype=torch.bfloat16, max_num_seqs=1)
    per_token, per_sequence = cache.footprint()
    planned = kv_shape(CATALOG[name], "bf16")
    assert cache.pool_of["hca"] == "rate128"  # one 128-token block a row: nothing allocated that is not used
    assert planned.token_bytes == per_token and planned.sequence_bytes == per_sequence


def test_a_cache_budget_is_shared_between_the_window_and_the_entries():
    """V4-Flash in bf16 with 4 GiB for its cache (mapped, not touched): the windowed pool (192 KiB a token) takes at
    most half, at least one sequence's window and a whole step; the entries get the rest (up to the default cap)."""
    spec = cache_spec(parse_hf_config(v4_config_json(CATALOG["deepseek-v4-flash"])))
    cache = create_cache(spec, torch.bfloat16, memory_bytes=4 * 2**30, max_num_seqs=64, max_num_batched_tokens=1024)
    window = cache.pools["window"].num_blocks * spec.block_bytes(16, 2, windowed=True)
    assert spec.window_blocks(16, 1024) <= cache.pools["window"].num_blocks and window <= 2 * 2**30
    assert cache.num_tokens_capacity == min(MAX_DEFAULT_TOKENS, (4 * 2**30 - window) // 6880) // 16 * 16


@torch.inference_mode()
def test_sequences_that_outgrow_the_cache_are_preempted_and_still_match(checkpoints):
    """Four prompts (40-200 tokens, 32 a step) on 20 blocks of entries: requests are preempted, their blocks in
    every pool freed, recomputed later, and each still decodes what transformers does."""
    directory, reference = checkpoints("v4_released")
    loaded = load_model(str(directory), dtype="float32", device="cpu")
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, num_kv_blocks=20))
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, 256, (n,), generator=generator).tolist() for n in (150, 90, 200, 40)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    requests = [engine.add_request(prompt, params) for prompt in prompts]
    while engine.has_unfinished():
        engine.step()
    assert sum(r.num_preemptions for r in requests) > 0
    for prompt, request in zip(prompts, requests, strict=True):
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(prompt):]
        assert request.output_token_ids == expected.tolist()
    assert all(pool.num_free_blocks == pool.num_blocks for pool in engine.cache.pools.values())


@pytest.mark.parametrize(("fields", "message"), [
    ({"compress_ratios": [0, 4, 64]}, "compress_ratios holds [64]: DeepSeek-V4 layers compress by 0"),
    ({"layer_types": ["sliding_attention", "dense"]}, "layer_types must name each of the 3 layers one of"),
])
def test_a_config_with_an_unknown_layer_layout_is_refused_saying_what_is_allowed(fields, message):
    config = {"model_type": "deepseek_v4", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 3,
              "num_attention_heads": 4, "head_dim": 32, **fields}
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        parse_hf_config(config)
