"""Bytes of weights per format and of the KV cache per token, derived by hand."""

import math

import pytest

from whale.errors import InvalidRequestError
from whale.planner.catalog import CATALOG
from whale.planner.memory import kv_shape, tensor_bytes, weight_bytes
from whale.planner.params import TensorGroup, count_params, inventory


def test_mla_kv_bytes_per_token_exact():
    # MLA caches the latent: kv_lora_rank 512 + rope key 64 per layer, whatever the head count
    assert kv_shape(CATALOG["deepseek-v3"]).token_bytes == 61 * (512 + 64) * 2  # 70,272 B in bf16
    assert kv_shape(CATALOG["deepseek-v2-lite"]).token_bytes == 27 * (512 + 64) * 2
    assert kv_shape(CATALOG["deepseek-v3"], "fp8").token_bytes == 61 * (512 + 64) * 1
    # V3.2 adds the indexer's key: 128 fp8 bytes + one fp32 scale, per layer
    assert kv_shape(CATALOG["deepseek-v3.2"]).token_bytes == 61 * ((512 + 64) * 2 + 128 + 4)
    # the MTP layer, when loaded, caches like one more layer
    assert kv_shape(CATALOG["deepseek-v3"], include_mtp=True).token_bytes == 62 * 576 * 2


def test_gqa_kv_bytes_per_token():
    assert kv_shape(CATALOG["r1-distill-llama-8b"]).token_bytes == 32 * 2 * 8 * 128 * 2  # K and V, 8 heads
    assert kv_shape(CATALOG["r1-distill-qwen-7b"]).token_bytes == 28 * 2 * 4 * 128 * 2


def test_kv_sharding_under_tensor_parallelism():
    mla = kv_shape(CATALOG["deepseek-v3"])
    # the latent is one vector shared by all heads: every TP rank keeps all of it
    assert mla.per_gpu_token_bytes(tp=8, pp=1) == 61 * 576 * 2
    # pipeline stages split the layers: ceil(61 / 2) = 31 on the heavier stage
    assert mla.per_gpu_token_bytes(tp=8, pp=2) == 31 * 576 * 2
    gqa = kv_shape(CATALOG["r1-distill-llama-8b"])
    assert gqa.per_gpu_token_bytes(tp=4, pp=1) == 32 * 2 * 2 * 128 * 2  # 8 KV heads / 4 ranks
    assert gqa.per_gpu_token_bytes(tp=16, pp=1) == 32 * 2 * 1 * 128 * 2  # a head cannot be split: replicated


def test_v4_compressed_kv():
    flash = kv_shape(CATALOG["deepseek-v4-flash"], "fp8")
    # 21 ratio-4 layers hold a 512-wide row + a 128-wide indexer key every 4 tokens; 20 ratio-128 layers a
    # 512-wide row every 128 tokens; layers 0-1 only the 128-token window
    assert flash.token_bytes == 21 * (512 + 128) / 4 + 20 * 512 / 128
    # per sequence, whale's windowed pool: 9 blocks of 16 tokens (127 before a step, its token, a block begun
    # mid-way) of every layer's 512-wide window row, the CSA compressors' kv and gate (2 x 2 x 512, indexer
    # 2 x 2 x 128) and the HCA compressors' (2 x 512)
    assert flash.sequence_bytes == 9 * 16 * (43 * 512 + 21 * 4 * 512 + 21 * 4 * 128 + 20 * 2 * 512)


def test_format_bytes_for_one_matrix():
    g = TensorGroup("attention", 300, 256, 2, down_proj=True)
    assert tensor_bytes(g, "bf16") == 2 * 300 * 256 * 2
    # fp8: a byte a weight + an fp32 scale per 128x128 block: ceil(300/128)=3 x 2 blocks
    assert tensor_bytes(g, "fp8") == 2 * (300 * 256 + 3 * 2 * 4)
    assert tensor_bytes(g, "int8") == 2 * (300 * 256 + 300 * 4)  # per-row fp32 scale
    # int4: half a byte a weight, per 128-group an fp16 scale and a 4-bit zero
    assert tensor_bytes(g, "int4") == 2 * (300 * 256 // 2 + 600 * 2 + 300)
    # Q4_K_M: 144 B per 256 weights; one of the two down projections in Q6_K (210 B per 256)
    assert tensor_bytes(g, "q4_k_m") == 300 * 1 * 210 + 300 * 1 * 144
    with pytest.raises(InvalidRequestError):
        tensor_bytes(g, "fp16")


def test_v3_fp8_weights_hold_block_scales():
    spec = CATALOG["deepseek-v3"]
    groups = [g for g in inventory(spec) if not g.mtp]
    quantized = sum(g.params for g in groups if g.quantized)
    scales = sum(g.count * math.ceil(g.rows / 128) * math.ceil(g.cols / 128) * 4 for g in groups if g.quantized)
    unquantized = count_params(spec).total - quantized  # embedding, head, norms, router stay bf16
    assert weight_bytes(inventory(spec), "fp8") == quantized + scales + 2 * unquantized
    assert 670e9 < weight_bytes(inventory(spec), "fp8") < 675e9  # about 673 GB
    assert weight_bytes(inventory(spec), "bf16") == 2 * count_params(spec).total


def test_v4_release_keeps_experts_in_fp4():
    spec = CATALOG["deepseek-v4-flash"]
    experts = [g for g in inventory(spec) if g.component == "routed_experts" and not g.mtp]
    mxfp4 = sum(g.count * (g.rows * g.cols // 2 + g.rows * g.cols // 32) for g in experts)  # + 1 B per 32
    fp8 = sum(tensor_bytes(g, "fp8") for g in experts)
    assert weight_bytes(inventory(spec), "fp4") == weight_bytes(inventory(spec), "fp8") - fp8 + mxfp4
