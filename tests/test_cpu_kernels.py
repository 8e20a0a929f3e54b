"""whale/kernels/cpu_ops.cpp against float64 computations written out here in PyTorch."""

from __future__ import annotations

import pytest
import torch

from whale.kernels import cpu_ops


def test_the_kernels_build_on_this_machine():
    assert cpu_ops() is not None  # g++ is part of every machine whale is developed and tested on


# bf16 results: within one bf16 rounding (2^-8 relative) of the float64 value
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=2 ** -8)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_adds_in_place_and_normalises_into_the_deltas_dtype(dtype):
    generator = torch.Generator().manual_seed(0)
    residual = torch.randn(5, 576, generator=generator)
    delta = torch.randn(5, 576, generator=generator).to(dtype)
    weight = torch.randn(576, generator=generator)
    summed = residual.double() + delta.double()
    expected = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    normed = cpu_ops().add_rms_norm(residual, delta, weight, 1e-5)
    assert torch.allclose(residual.double(), summed, atol=1e-6)  # the fp32 residual stream now holds the sum
    assert normed.dtype == dtype
    assert torch.allclose(normed.double(), expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype):
    gate_up = torch.randn(3, 2, 2 * 100, generator=torch.Generator().manual_seed(1)).to(dtype)
    gate, up = gate_up.double().chunk(2, dim=-1)
    out = cpu_ops().silu_and_mul(gate_up)
    assert out.shape == (3, 2, 100) and out.dtype == dtype
    assert torch.allclose(out.double(), gate * torch.sigmoid(gate) * up, **TOLERANCE[dtype])


def test_rotary_rotates_the_leading_heads_in_place_and_leaves_the_rest():
    generator = torch.Generator().manual_seed(3)
    tokens, heads, dim = 3, 5, 8
    x = torch.randn(tokens, heads, dim, generator=generator)
    angles = torch.rand(tokens, dim // 2, generator=generator, dtype=torch.float64) * 6
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1)
    sin = torch.cat((angles.sin(), angles.sin()), dim=-1)
    # rotate_half as the HF implementations write it, in float64
    first, second = x.double()[..., :dim // 2], x.double()[..., dim // 2:]
    rotated = x.double() * cos[:, None] + torch.cat((-second, first), dim=-1) * sin[:, None]
    signed_sin = torch.cat((-sin[:, :dim // 2], sin[:, dim // 2:]), dim=-1)
    original = x.clone()
    cpu_ops().rotary_(x, cos.float(), signed_sin.float(), 4)
    assert torch.allclose(x[:, :4].double(), rotated[:, :4], atol=1e-6)
    assert torch.equal(x[:, 4:], original[:, 4:])


def test_hyper_weights_equal_transformers_hyper_connection_in_float64():
    """DeepSeek-V4's hyper-connection weights (the norm, the three heads, 20 Sinkhorn iterations) against
    transformers' module run in float64: post and comb as it returns them, pre through the collapsed stream."""
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection

    config = DeepseekV4Config(hidden_size=64, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6)
    reference = DeepseekV4HyperConnection(config).double()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tensor in (reference.fn, reference.base, reference.scale):
            tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float64))
    streams = torch.randn(5, 4, 64, generator=generator)
    with torch.no_grad():
        post, comb, collapsed = reference(streams.double()[None])
    pre, got_post, got_comb = cpu_ops().hyper_weights(streams, reference.fn.float(), reference.base.float(),
                                                      reference.scale.float(), 20, 1e-6, 1e-6)
    assert torch.allclose(got_post.double(), post[0], atol=1e-5)
    assert torch.allclose(got_comb.double(), comb[0], atol=1e-5)
    assert torch.allclose((pre.double()[..., None] * streams.double()).sum(1), collapsed[0], atol=1e-5)


def test_mask_logits_sets_minus_infinity_where_a_bit_is_clear_in_the_masked_rows_only():
    generator = torch.Generator().manual_seed(6)
    vocab = 1000  # not a multiple of 32: the last word is partly past the vocabulary
    logits = torch.randn(5, vocab, generator=generator)
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (3, 32), generator=generator, dtype=torch.int32)
    words[1] = 0  # a row where nothing is allowed
    words[2, :10] = -1  # whole words allowed
    rows = [4, 0, 2]
    out = logits.clone()
    cpu_ops().mask_logits_(out, words, torch.tensor(rows))
    for k, row in enumerate(rows):  # bit v of word v // 32, written out
        allowed = [(int(words[k, v // 32]) >> (v % 32)) & 1 == 1 for v in range(vocab)]
        expected = [x if keep else float("-inf") for x, keep in zip(logits[row].tolist(), allowed, strict=True)]
        assert out[row].tolist() == expected
    assert torch.equal(out[[1, 3]], logits[[1, 3]])


def test_paged_attention_reads_each_tokens_visible_context_from_the_blocks():
    generator = torch.Generator().manual_seed(2)
    heads, kv_heads, dim, block = 6, 2, 16, 4
    k_store = torch.randn(64, kv_heads, dim, generator=generator)
    v_store = torch.randn(64, kv_heads, dim, generator=generator)
    # two sequences on scattered blocks: one decoding its 7th token, one with 3 new tokens after 2 cached
    tables = [[9, 2], [5, 14]]
    starts, counts = [6, 2], [1, 3]
    width = 8
    context_index = torch.tensor([[t[p // block] * block + p % block if p < s + c else 0 for p in range(width)]
                                  for t, s, c in zip(tables, starts, counts, strict=True)])
    token_seq = torch.tensor([0, 1, 1, 1])
    rows = torch.tensor([0, 0, 1, 2])
    token_len = torch.tensor(starts)[token_seq] + rows + 1
    slot_mapping = context_index[token_seq, token_len - 1]
    qkv = torch.randn(4, heads + 2 * kv_heads, dim, generator=generator)  # strided slices, as the models pass
    q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    expected_k, expected_v = k_store.clone(), v_store.clone()
    expected_k[slot_mapping], expected_v[slot_mapping] = k, v
    out = cpu_ops().paged_attention(q, k, v, k_store, v_store, slot_mapping, context_index, token_seq, token_len,
                                    0.25)
    assert torch.equal(k_store, expected_k) and torch.equal(v_store, expected_v)
    for t in range(4):
        slots = context_index[token_seq[t], :token_len[t]]
        keys, values = expected_k[slots].double(), expected_v[slots].double()  # [len, kv, dim]
        for h in range(heads):
            kv = h // (heads // kv_heads)
            probs = torch.softmax(keys[:, kv] @ q[t, h].double() * 0.25, dim=0)
            assert torch.allclose(out[t, h].double(), probs @ values[:, kv], atol=1e-5)


def test_paged_attention_over_long_contexts_is_the_same_for_a_token_alone_or_in_any_batch():
    """Contexts of several 256-position chunks (split-K), tokens ending just before, on and after chunk edges: each
    output is softmax attention (float64 reference), and bit-identical when the token is computed alone."""
    generator = torch.Generator().manual_seed(3)
    heads, kv_heads, dim, slots = 4, 2, 16, 4096
    k_store = torch.randn(slots, kv_heads, dim, generator=generator)
    v_store = torch.randn(slots, kv_heads, dim, generator=generator)
    permutation = torch.randperm(slots, generator=generator)  # scattered storage rows
    lens = [[511, 512, 513], [700], [1, 2], [257]]  # per sequence, its tokens' context lengths
    width = 700
    context_index = torch.stack([permutation[i * width:(i + 1) * width] for i in range(len(lens))])
    token_seq = torch.tensor([s for s, seq_lens in enumerate(lens) for _ in seq_lens])
    token_len = torch.tensor([n for seq_lens in lens for n in seq_lens])
    slot_mapping = context_index[token_seq, token_len - 1]
    tokens = len(token_seq)
    q = torch.randn(tokens, heads, dim, generator=generator)
    k = k_store[slot_mapping].clone()  # the new rows are the stored ones: writing them changes nothing
    v = v_store[slot_mapping].clone()
    out = cpu_ops().paged_attention(q, k, v, k_store, v_store, slot_mapping, context_index, token_seq, token_len,
                                    0.25)
    for t in range(tokens):
        slots_seen = context_index[token_seq[t], :token_len[t]]
        keys, values = k_store[slots_seen].double(), v_store[slots_seen].double()
        for h in range(heads):
            probs = torch.softmax(keys[:, h // 2] @ q[t, h].double() * 0.25, dim=0)
            assert torch.allclose(out[t, h].double(), probs @ values[:, h // 2], atol=1e-5)
        alone = cpu_ops().paged_attention(q[t:t + 1], k[t:t + 1], v[t:t + 1], k_store, v_store, slot_mapping[t:t + 1],
                                          context_index[token_seq[t]:token_seq[t] + 1], torch.tensor([0]),
                                          token_len[t:t + 1], 0.25)
        assert torch.equal(alone[0], out[t])


def test_paged_attention_refuses_a_layout_pointing_outside_the_storage():
    store = torch.zeros(16, 1, 8)
    q, k, v = torch.randn(1, 2, 8), torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    context = torch.tensor([[0, 1, 2, 3]])
    for slot, length in ((16, 4), (3, 5)):  # a slot past the end; more context than the row holds
        with pytest.raises(RuntimeError, match="out of range"):
            cpu_ops().paged_attention(q, k, v, store, store.clone(), torch.tensor([slot]), context,
                                      torch.tensor([0]), torch.tensor([length]), 1.0)
    assert not store.any()  # nothing was written


def test_latent_attention_through_the_kernel_equals_the_gathered_path(monkeypatch):
    """MLA decode steps read the latent rows in place with paged_attention (one KV head, values = the same rows);
    ragged sequences, contexts over several of the kernel's 256-position chunks, a few new tokens each: the
    result and what is left in the cache match the gather + matmul path."""
    from whale.cache_spec import KVCacheSpec
    from whale.engine import paged_attention
    from whale.engine.paged_attention import PagedKVCache

    torch.manual_seed(0)
    spec = KVCacheSpec("mla", num_layers=2, num_kv_heads=1, head_dim=72, rope_dim=8)
    caches = [PagedKVCache(spec, num_blocks=96, block_size=16, dtype=torch.float32) for _ in range(2)]
    heads, rank, rope = 4, 64, 8
    kernel_calls = []

    class Spy:  # the compiled ops, counting the paged-attention calls
        def __getattr__(self, name):
            if name == "paged_attention":
                kernel_calls.append(1)
            return getattr(cpu_ops(), name)

    for counts in [(300, 40, 600), (1, 2, 1), (3, 1, 2)]:
        tokens = sum(counts)
        inputs = (torch.randn(tokens, heads, rank), torch.randn(tokens, heads, rope), torch.randn(tokens, rank),
                  torch.randn(tokens, rope))
        results = []
        for cache, compiled in zip(caches, (True, False), strict=True):
            monkeypatch.setattr(paged_attention, "cpu_ops", Spy if compiled else lambda: None)
            cache.begin_step(["a", "b", "c"], list(counts))
            results.append(cache.attend_latent(1, *inputs, scale=0.1))
            cache.end_step()
            monkeypatch.undo()
        assert results[0].shape == (tokens, heads, rank)
        torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)
    assert len(kernel_calls) == 2  # the two decode steps; the prompts' chunks are gathered
    torch.testing.assert_close(caches[0].stores["latent"], caches[1].stores["latent"], rtol=0, atol=0)


PROMPTS = ["The capital of France is", "Whales sing because", "def fibonacci(n):", "Once upon a time",
           "The three primary colours are", "My favourite food is"]


GREEDY_12 = dict(temperature=0, max_tokens=12, ignore_eos=True)


def test_fp32_generation_with_the_kernels_equals_the_pytorch_fallbacks(monkeypatch):
    from whale import LLM, SamplingParams

    llm = LLM("default", dtype="float32", enable_prefix_caching=False)
    compiled = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SamplingParams(**GREEDY_12))]
    for module in ("whale.models.layers", "whale.engine.paged_attention"):
        monkeypatch.setattr(f"{module}.cpu_ops", lambda: None)
    fallback = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SamplingParams(**GREEDY_12))]
    assert compiled == fallback
