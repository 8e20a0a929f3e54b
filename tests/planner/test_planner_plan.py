"""Layouts and plans: the fewest valid GPUs, what each holds, how many sequences fit."""

import math

import pytest

from whale.errors import InvalidRequestError
from whale.planner.catalog import CATALOG
from whale.planner.gpus import GPUS
from whale.planner.memory import CUDA_GRAPH_BYTES
from whale.planner.parallelism import Layout, layout_problems
from whale.planner.plan import PlanRequest, make_plan

V3 = CATALOG["deepseek-v3"]


def test_v3_fp8_needs_eight_h200_not_five():
    # ~673 GB of FP8 weights would fit the memory of 5 x 141 GB, but TP must divide the 128 heads
    assert "does not divide the 128 attention heads" in layout_problems(V3, Layout(tp=5), "fp8")[0]
    plan = make_plan(PlanRequest(V3, GPUS["H200"], "fp8", context=131072, concurrency=1))
    assert plan.fits and plan.gpus_needed == 8
    assert plan.chosen.layout == Layout(tp=8, expert_parallel=True)
    assert "--tensor-parallel-size 8" in plan.launch["vllm"]
    assert "--tp 8" in plan.launch["sglang"]


def test_five_gpus_is_refused_with_the_reason():
    with pytest.raises(InvalidRequestError, match="128 attention heads"):
        make_plan(PlanRequest(V3, GPUS["H200"], "fp8", context=4096, gpus=5))
    with pytest.raises(InvalidRequestError, match="multiple of 8"):
        make_plan(PlanRequest(V3, GPUS["H200"], "fp8", context=4096, gpus=12))


def test_v3_on_h100_spans_two_nodes_and_bf16_more():
    fp8 = make_plan(PlanRequest(V3, GPUS["H100"], "fp8", context=32768))
    assert fp8.gpus_needed == 16 and fp8.chosen.layout.pp == 2 and fp8.chosen.layout.nodes == 2
    assert "--pipeline-parallel-size 2" in fp8.launch["vllm"]
    assert "--nnodes 2" in fp8.launch["sglang"] and "--node-rank $RANK" in fp8.launch["sglang"]
    bf16 = make_plan(PlanRequest(V3, GPUS["H200"], "bf16", context=32768))
    assert bf16.gpus_needed == 16  # 1.34 TB of BF16 weights: two H200 nodes
    assert "fp8_cast_bf16" in " ".join(bf16.notes)


def test_per_gpu_budget_adds_up():
    plan = make_plan(PlanRequest(V3, GPUS["H200"], "fp8", context=163840, concurrency=1))
    b, gpu = plan.chosen.budget, GPUS["H200"]
    assert b.reserved == round(gpu.memory_bytes * 0.10)
    # an 8192-token prefill chunk in bf16: 4 x hidden of residual and attention buffers plus the gate/up outputs of
    # the widest MLP (dense 18432 = 9 experts x 2048) split over 8 ranks; and fp32 logits of 256 sequences
    assert b.activations == 8192 * (4 * 7168 + 2 * 18432 // 8) * 2 + 256 * 129280 * 4
    assert b.kv_pool == gpu.memory_bytes - b.reserved - b.weights - b.activations - CUDA_GRAPH_BYTES
    assert b.kv_sequence_bytes == 163840 * 61 * 576 * 2  # the latent is replicated on every TP rank
    assert b.max_sequences == b.kv_pool // b.kv_sequence_bytes
    # TP8 + EP8: the experts and the split attention weights are an eighth each, a little is replicated
    assert plan.weights_bytes / 8 < b.weights < plan.weights_bytes / 8 + 2e9


def test_concurrency_grows_the_plan():
    small = make_plan(PlanRequest(V3, GPUS["H200"], "fp8", context=131072, concurrency=1))
    many = make_plan(PlanRequest(V3, GPUS["H200"], "fp8", context=131072, concurrency=64))
    assert many.gpus_needed > small.gpus_needed
    assert many.chosen.budget.max_sequences >= 64


def test_dp_attention_multiplies_capacity():
    plan = make_plan(PlanRequest(V3, GPUS["H200"], "fp8", context=131072, concurrency=1, gpus=8))
    tp = plan.chosen.budget
    options = make_plan(PlanRequest(V3, GPUS["H200"], "fp8", context=131072, concurrency=tp.max_sequences + 1,
                                    gpus=8))
    assert options.chosen.layout.dp_attention and options.fits
    assert "--enable-dp-attention" in options.launch["sglang"]
    assert "--data-parallel-size 8" in options.launch["vllm"]


def test_distill_on_one_gpu_offers_whale_and_llama_cpp():
    spec = CATALOG["r1-distill-qwen-7b"]
    plan = make_plan(PlanRequest(spec, GPUS["RTX4090"], "q4_k_m", context=16384, concurrency=4))
    assert plan.gpus_needed == 1 and plan.fits
    assert plan.launch["llama.cpp"].startswith("llama-server -m ./DeepSeek-R1-Distill-Qwen-7B-Q4_K_M.gguf")
    assert "--ctx-size 65536 --parallel 4" in plan.launch["llama.cpp"]
    assert "whale" in plan.launch and "vllm" not in plan.launch
    b = plan.chosen.budget
    assert b.kv_sequence_bytes == 16384 * 28 * 2 * 4 * 128 * 2


def test_decode_roofline_single_stream():
    spec = CATALOG["r1-distill-llama-8b"]
    plan = make_plan(PlanRequest(spec, GPUS["H100"], "bf16", context=1024))
    hidden, layers, q, kv, ffn, vocab = 4096, 32, 32 * 128, 8 * 128, 14336, 128256
    layer = 2 * q * hidden + 2 * kv * hidden + 3 * hidden * ffn + 2 * hidden
    read = (layers * layer + vocab * hidden + hidden) * 2  # bf16: every weight but the embedding table
    kv_sequence = 1024 * layers * 2 * kv * 2
    # one token reads those weights plus one sequence of KV, at 3.35 TB/s
    expected = 3.35e12 / (read + kv_sequence)
    assert math.isclose(plan.decode.single_stream_tps, expected)
    assert 180 < plan.decode.single_stream_tps < 240


def test_bad_requests():
    with pytest.raises(InvalidRequestError, match="outside"):
        make_plan(PlanRequest(V3, GPUS["H200"], "fp8", context=10**7))
    with pytest.raises(InvalidRequestError, match="dtype"):
        make_plan(PlanRequest(V3, GPUS["H200"], "fp16", context=1024))
    with pytest.raises(InvalidRequestError, match="fp4"):
        make_plan(PlanRequest(V3, GPUS["H200"], "fp4", context=1024))
