"""whale's dense decoders against transformers on the same checkpoint files (fp32)."""

from __future__ import annotations

import pytest
import torch
from dense_checkpoints import VOCAB, tiny_dense_checkpoint

from whale import LLM, SamplingParams
from whale.engine.paged_attention import create_cache

KINDS = ["llama", "llama3", "qwen2", "qwen3"]


@pytest.fixture(scope="module", params=KINDS)
def checkpoint(request, tmp_path_factory):
    directory, reference = tiny_dense_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, directory, reference


def _reference_greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            next_id = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


def test_checkpoint_is_sharded_like_the_hub(checkpoint):
    _, directory, _ = checkpoint
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("model-*-of-*.safetensors"))) > 1


def test_logits_match_transformers_through_chunked_prefill_and_decode(checkpoint):
    kind, directory, reference = checkpoint
    llm = LLM(str(directory), dtype="float32")
    model = llm.loaded.model
    ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(1))
    cache = create_cache(model.kv_cache_spec(), torch.float32, block_size=4)
    hidden = []
    # a 12-token chunk, a 5-token chunk over cached context, then single-token decode steps
    for start, end in [(0, 12), (12, 17), *[(i, i + 1) for i in range(17, 24)]]:
        cache.begin_step([0], [end - start])
        hidden.append(model(ids[start:end], torch.arange(start, end), cache))
        cache.end_step()
    ours = model.compute_logits(torch.cat(hidden))
    with torch.no_grad():
        theirs = reference(ids[None]).logits[0]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4, kind


def test_greedy_generation_matches_transformers_token_for_token_batched(checkpoint):
    _, directory, reference = checkpoint
    llm = LLM(str(directory), dtype="float32")
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (5, 13, 9)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.outputs[0].token_ids == _reference_greedy(reference, prompt, 24)
        assert output.outputs[0].finish_reason == "length"


def test_llama3_rope_scaling_changes_the_frequencies(tmp_path):
    directory, _ = tiny_dense_checkpoint("llama3", tmp_path)
    llm = LLM(str(directory), dtype="float32")
    rope = llm.loaded.config.rope
    assert (rope.rope_type, rope.factor, rope.original_max_position_embeddings) == ("llama3", 8.0, 64)
    head_dim = llm.loaded.config.head_dim
    plain = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    # the lowest frequency (longest wavelength) is divided by the factor, the highest is untouched
    inv_freq = llm.loaded.model.rotary.inv_freq.double()
    assert inv_freq[-1].item() == pytest.approx(plain[-1].item() / 8.0, rel=1e-6)
    assert inv_freq[0].item() == pytest.approx(plain[0].item(), rel=1e-6)


def test_prompt_logprobs_match_transformers_through_chunks_the_cache_and_preemption(checkpoint):
    """Each prompt token's logprob (and top alternatives) under transformers' logits for the tokens before it, in
    float64: computed across prefill chunks, again for a prompt whose blocks are cached, and after a
    preemption (40-token prompts, 8-token chunks, a KV cache too small for two such requests at once)."""
    kind, directory, reference = checkpoint
    llm = LLM(str(directory), dtype="float32", max_num_batched_tokens=8, block_size=4, num_kv_blocks=14)
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (40,), generator=generator).tolist() for _ in range(2)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, prompt_logprobs=3)
    warm = llm.generate({"prompt_token_ids": prompts[0]}, params)[0]  # its blocks are now cached
    assert warm.num_cached_tokens == 0 and warm.prompt_logprobs[0] is None
    requests = [llm.engine.add_request(p, params) for p in prompts]
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert max(r.num_preemptions for r in requests) >= 1
    scored = [warm.prompt_logprobs] + [[None] + [{**s.top_logprobs, s.token_id: s.logprob}
                                                 for s in r.prompt_logprobs[1:]] for r in requests]
    for prompt, positions in zip([prompts[0], *prompts], scored, strict=True):
        with torch.no_grad():
            theirs = reference(torch.tensor([prompt])).logits[0, :-1].double().log_softmax(-1)
        assert len(positions) == len(prompt)
        for position, ours in enumerate(positions[1:]):
            top = theirs[position].topk(3)
            expected = {prompt[position + 1]: theirs[position, prompt[position + 1]].item(),
                        **dict(zip(top.indices.tolist(), top.values.tolist(), strict=True))}
            assert ours.keys() == expected.keys(), (kind, position)
            assert max(abs(ours[t] - expected[t]) for t in expected) < 1e-4, (kind, position)
    assert all(r.num_cached_tokens == 0 for r in requests)  # scored prompts are computed, never read from cache
