"""whale's DeepSeek models against transformers on the same tiny checkpoints on disk: logits (batched ragged
prefill, then chunks with past context), greedy generations, the latent cache's size, DSA and FP8."""

from __future__ import annotations

import json

import pytest
import torch
from deepseek_checkpoints import assert_greedy_like_reference, checkpoint_maker, write_checkpoint

from whale import LLM
from whale.config import parse_hf_config
from whale.engine.paged_attention import create_cache
from whale.models import build_model
from whale.models.loader import load_model

KINDS = ["v2", "v2_lite", "v3", "v32", "v3_fp8"]
PROMPTS = [[5, 17, 3, 99, 42, 8, 120, 77, 13, 61, 200, 4, 9, 31, 150, 23, 88, 64, 7, 19, 250],
           [11, 22, 33, 44, 55, 66, 77],
           [100, 3, 250, 8]]
CONTINUATIONS = [[6, 60, 160], [12], [70, 71, 72, 73, 74]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return checkpoint_maker(tmp_path_factory, write_checkpoint, "deepseek")


def _forward(model, cache, slots: list[int], chunks: list[list[int]], starts: list[int]) -> list[torch.Tensor]:
    """One engine-style step over ragged chunks; per-sequence logits of every new token."""
    ids = torch.tensor([t for chunk in chunks for t in chunk])
    positions = torch.tensor([s + i for s, chunk in zip(starts, chunks, strict=True) for i in range(len(chunk))])
    cache.begin_step(slots, [len(c) for c in chunks])
    logits = model.compute_logits(model(ids, positions, cache))
    cache.end_step()
    return list(logits.split([len(c) for c in chunks]))


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_logits_match_transformers(kind, checkpoints):
    directory, reference = checkpoints(kind)
    model = load_model(str(directory), dtype="float32", device="cpu").model
    cache = create_cache(model.kv_cache_spec(), torch.float32, torch.device("cpu"))
    prefill = _forward(model, cache, [0, 1, 2], PROMPTS, [0, 0, 0])
    more = _forward(model, cache, [0, 1, 2], CONTINUATIONS, [len(p) for p in PROMPTS])
    for prompt, extra, first, second in zip(PROMPTS, CONTINUATIONS, prefill, more, strict=True):
        expected = reference(torch.tensor([prompt + extra])).logits[0]
        assert (first - expected[:len(prompt)]).abs().max() <= 1e-4
        assert (second - expected[len(prompt):]).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_greedy_generations_match_transformers(kind, checkpoints):
    directory, reference = checkpoints(kind)
    llm = LLM(str(directory), dtype="float32", device="cpu")
    assert_greedy_like_reference(llm, reference, PROMPTS)


def test_latent_cache_holds_kv_lora_rank_plus_rope_per_token(checkpoints):
    directory, _ = checkpoints("v3")
    llm = LLM(str(directory), dtype="float32", device="cpu")
    config, cache = llm.loaded.config, llm.engine.cache
    assert set(cache.stores) == {"latent"}  # one latent row per token, no per-head K/V
    width = config.kv_lora_rank + config.qk_rope_head_dim
    assert cache.bytes_per_token() == config.num_hidden_layers * width * 4
    stored = cache.stores["latent"]
    assert stored.shape == (config.num_hidden_layers, cache.num_tokens_capacity, width)


@pytest.mark.parametrize(("model_type", "extra", "per_token"), [
    ("deepseek_v3", {}, 61 * 576 * 2),  # 70,272 B per token in bf16
    ("deepseek_v32", {"index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}, 61 * (576 + 128) * 2),
])
def test_real_v3_cache_size_per_token(model_type, extra, per_token):
    config = parse_hf_config(dict(
        model_type=model_type, vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3, n_group=8,
        topk_group=4, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1, rope_theta=10000,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}, **extra))
    model = build_model(config)  # on the meta device: no memory
    cache = create_cache(model.kv_cache_spec(), torch.bfloat16, torch.device("cpu"))
    assert cache.bytes_per_token() == per_token
    assert abs(model.model.layers[0].self_attn.scale - 0.135234) < 1e-6  # 192^-0.5 * mscale(40, 1.0)^2


@torch.inference_mode()
def test_sparse_attention_equals_dense_below_top_k(checkpoints):
    directory, _ = checkpoints("v32")
    model = load_model(str(directory), dtype="float32", device="cpu").model
    assert model.config.index_topk == 8
    short, long = PROMPTS[1][:6], PROMPTS[0]

    def logits(prompt: list[int]) -> torch.Tensor:
        cache = create_cache(model.kv_cache_spec(), torch.float32, torch.device("cpu"))
        return _forward(model, cache, [0], [prompt], [0])[0]

    sparse_short, sparse_long = logits(short), logits(long)
    indexers = [layer.self_attn.indexer for layer in model.model.layers]
    for layer in model.model.layers:
        layer.self_attn.indexer = None  # plain MLA over every position
    assert (logits(short) - sparse_short).abs().max() <= 1e-5
    assert (logits(long) - sparse_long).abs().max() > 1e-3  # beyond top-k the selection does change things
    for layer, indexer in zip(model.model.layers, indexers, strict=True):
        layer.self_attn.indexer = indexer


def test_fp8_checkpoint_layout(checkpoints):
    directory, _ = checkpoints("v3_fp8")
    config = json.loads((directory / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    scales = [name for name in index if name.endswith("_scale_inv")]
    assert "model.layers.0.self_attn.o_proj.weight_scale_inv" in scales  # 160 x 64: a partial row block
    assert "model.layers.1.mlp.gate.weight_scale_inv" not in scales
