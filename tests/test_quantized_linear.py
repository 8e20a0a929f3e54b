"""The int4 weight-only path (whale.models.quant) against the fp32 path it replaces, forced on whatever CPU runs
the tests: exact block decoding, kernel accuracy, fused projections, and the default model's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from whale.errors import InvalidRequestError
from whale.models import quant
from whale.models.gguf_blocks import BlockEmbedding, BlockLinear
from whale.models.layers import fuse_linears
from whale.models.loader import load_model
from whale.platform import cpu_has_bf16, cpu_weight_kernels
from whale.weights.gguf import GGUFTensor


def _gguf_tensor(weight: np.ndarray, ggml_type: str) -> GGUFTensor:
    raw = quantize(weight, GGMLQuantizationType[ggml_type])
    return GGUFTensor("w", ggml_type, weight.shape, raw)


class SingleSequenceAttention:
    """The smallest attention backend: one sequence, K/V appended per layer (independent of the engine's caches)."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        keys = self.keys[layer] = torch.cat((self.keys.get(layer, k[:0]), k))
        values = self.values[layer] = torch.cat((self.values.get(layer, v[:0]), v))
        past = keys.shape[0] - q.shape[0]
        mask = torch.ones(q.shape[0], keys.shape[0], dtype=torch.bool).tril(past)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                                             attn_mask=mask, scale=scale, enable_gqa=True)
        return out.transpose(0, 1)


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q4_1"])
def test_blocks_decode_to_exactly_what_gguf_dequantizes(ggml_type):
    weight = np.random.default_rng(0).standard_normal((48, 128)).astype(np.float32)
    tensor = _gguf_tensor(weight, ggml_type)
    codes, scale, zero = quant.decode_q4_blocks(tensor)
    assert codes.min() >= 0 and codes.max() <= 15
    rebuilt = ((codes.view(48, 4, 32) - 8) * scale[..., None] + zero[..., None]).view(48, 128)
    assert torch.equal(rebuilt, tensor.dequantize())


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q4_1"])
def test_int4_linear_matches_fp32_within_bf16_rounding(ggml_type):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 256, generator=generator).numpy()
    tensor = _gguf_tensor(weight, ggml_type)
    bias = torch.randn(96, generator=generator)
    x = torch.randn(3, 256, generator=generator)
    expected = F.linear(x, tensor.dequantize(), bias)
    got = quant.Int4Linear.from_gguf(tensor, bias)(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape  # the fp32 bias promotes the bf16 output
    assert quant.Int4Linear.from_gguf(tensor)(x).dtype == torch.bfloat16
    # bf16 activations, scales and output: ~3 bits fewer than fp32's rounding, relative to the output's range
    assert (got - expected).abs().max() < 1e-2 * expected.abs().max()


def test_fused_int4_linears_equal_the_separate_ones():
    generator = torch.Generator().manual_seed(1)
    parts = [quant.Int4Linear.from_gguf(_gguf_tensor(torch.randn(rows, 64, generator=generator).numpy(), "Q4_1"),
                                        torch.randn(rows, generator=generator)) for rows in (128, 64, 64)]
    x = torch.randn(2, 64, generator=generator)
    assert torch.equal(fuse_linears(parts)(x), torch.cat([p(x) for p in parts], dim=-1))
    with pytest.raises(ValueError, match="multiple of 64"):  # the packing's row tiles cannot be split
        quant.Int4Linear.concat([quant.Int4Linear.from_gguf(_gguf_tensor(np.ones((32, 64), np.float32), "Q4_0"))])
    assert fuse_linears([parts[0], torch.nn.Linear(64, 8)]) is None  # mixed kinds stay separate


def test_rope_row_permutation_moves_whole_rows():
    weight = np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)  # 16 rows: the kernel's least
    tensor = _gguf_tensor(weight, "Q4_1")
    x = torch.randn(1, 64)
    permuted = quant.Int4Linear.from_gguf(tensor, rope_heads=2)(x)
    plain = quant.Int4Linear.from_gguf(tensor)(x)
    # llama.cpp interleaves each head's rotary pairs: rows 0,4,1,5,2,6,3,7 of a head are halves 0..3 | 4..7
    head = [0, 2, 4, 6, 1, 3, 5, 7]
    assert torch.equal(permuted[0], plain[0, head + [8 + i for i in head]])


def test_int4_dequantized_weight_is_the_blocks_in_bf16():
    tensor = _gguf_tensor(np.random.default_rng(3).standard_normal((64, 96)).astype(np.float32), "Q4_1")
    codes, scale, zero = quant.decode_q4_blocks(tensor)
    exact = ((codes.view(64, 3, 32) - 8) * scale[..., None] + zero[..., None]).view(64, 96)
    dequantized = quant.Int4Linear.from_gguf(tensor).dequantized()
    assert dequantized.dtype == torch.bfloat16 and dequantized.shape == (64, 96)
    # the kernel keeps scale and zero in bf16: within two bf16 roundings of the block's exact value
    assert (dequantized.float() - exact).abs().max() <= 2 ** -7 * exact.abs().max()


def test_row_switch_uses_int4_for_few_rows_and_the_packed_gemm_for_many():
    generator = torch.Generator().manual_seed(4)
    tensor = _gguf_tensor(torch.randn(128, 64, generator=generator).numpy(), "Q4_0")
    bias = torch.randn(128, generator=generator)
    int4 = quant.Int4Linear.from_gguf(tensor, bias)
    packed = quant.PackedBF16Linear(int4.dequantized(), bias)
    switch = quant.RowSwitchLinear(int4, packed, max_small_rows=quant.INT4_MAX_ROWS)
    few = torch.randn(quant.INT4_MAX_ROWS, 64, generator=generator)
    many = torch.randn(2, quant.INT4_MAX_ROWS, 64, generator=generator)  # 2 x 4 rows: the GEMM side
    assert torch.equal(switch(few), int4(few))
    assert torch.equal(switch(many), packed(many)) and switch(many).shape == (2, quant.INT4_MAX_ROWS, 128)
    # the two kernels compute the same weights: they agree within bf16 rounding of activations and output
    expected = F.linear(many, tensor.dequantize(), bias)
    for kernel in (int4, packed):
        assert (kernel(many) - expected).abs().max() < 1e-2 * expected.abs().max()


@pytest.mark.skipif(not cpu_has_bf16(), reason="the packed bf16 GEMM runs where bf16 is in hardware")
def test_the_packed_gemm_runs_a_few_row_counts_and_answers_each_row_as_alone():
    """Prompt steps of every length run at a few dozen GEMM shapes (oneDNN keeps per-shape state for good:
    one shape per length grew a server by ~500 MiB); the padding rows never reach the answer."""
    assert len({quant.gemm_rows(count) for count in range(1, 1025)}) <= 40
    assert all(count <= quant.gemm_rows(count) < 2 * count for count in range(1, 1025))
    generator = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(96, 64, generator=generator), torch.randn(96, generator=generator)
    packed = quant.PackedBF16Linear(weight, bias)
    x = torch.randn(100, 64, generator=generator)
    expected = F.linear(x.bfloat16().float(), weight.bfloat16().float(), bias)
    for count in (1, 3, 33, 65, 100):  # padded to 1, 4, 64, 96, 128 rows
        out = packed(x[:count])
        assert out.shape == (count, 96)
        assert (out.float() - expected[:count]).abs().max() < 1e-2 * expected.abs().max()


def test_hybrid_falls_back_to_int4_when_the_bf16_twins_do_not_fit(monkeypatch):
    monkeypatch.setattr("whale.models.loader.physical_memory_bytes", lambda: 2**20)
    loaded = load_model("default", kernels="hybrid")
    assert loaded.kernels == "int4"
    # the default GGUF ties it to a Q8_0 embedding, which both keep in its blocks
    assert isinstance(loaded.model.lm_head, BlockLinear) and isinstance(loaded.model.model.embed_tokens, BlockEmbedding)


def test_auto_picks_hybrid_only_where_bf16_is_in_hardware_and_the_model_is_small(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr("whale.platform.cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert cpu_weight_kernels("auto", None, cpu) == "blocks"
    monkeypatch.setattr("whale.platform.cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert cpu_weight_kernels("auto", None, cpu, params=135_000_000) == "hybrid"
    # a 1.5B model: hybrid's int4 repack and bf16 twins would cost a minute to load and several times the file
    assert cpu_weight_kernels("auto", None, cpu, params=1_800_000_000) == "blocks"
    assert cpu_weight_kernels("hybrid", None, cpu, params=1_800_000_000) == "hybrid"  # asked for by name
    assert cpu_weight_kernels("auto", "float32", cpu) == "dense"  # an explicit dtype means dense in that dtype
    assert cpu_weight_kernels("int4", "float32", cpu) == "int4"
    assert cpu_weight_kernels(None, "auto", torch.device("meta")) == "dense"
    with pytest.raises(InvalidRequestError):
        cpu_weight_kernels("int3", None, cpu)


@pytest.mark.parametrize("kernels", ["int4", "blocks", pytest.param("hybrid", marks=pytest.mark.skipif(
    not cpu_has_bf16(), reason="hybrid is only chosen on CPUs with bf16 in hardware; elsewhere its bf16 GEMM on "
                               "the 135M model takes minutes (the tiny 4-bit GGUF tests cover it on any CPU)"))])
def test_default_model_quantized_logits_agree_with_fp32(default_llm, kernels):
    loaded = load_model("default", kernels=kernels)
    assert loaded.kernels == kernels
    qkv = loaded.model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, {"int4": quant.Int4Linear, "blocks": BlockLinear, "hybrid": quant.RowSwitchLinear}[kernels])
    tokenizer = default_llm.tokenizer
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Write a short story about a whale."}])
    ids = torch.tensor(tokenizer.encode(prompt, add_special_tokens=False))
    logits = {}
    for name, model in (("fp32", default_llm.loaded.model), ("int4", loaded.model)):
        attention = SingleSequenceAttention()
        with torch.inference_mode():  # the prompt, then four decode steps over the cached past
            steps = [model.compute_logits(model(ids[:-4], torch.arange(len(ids) - 4), attention))]
            steps += [model.compute_logits(model(ids[i:i + 1], torch.tensor([i]), attention))
                      for i in range(len(ids) - 4, len(ids))]
        logits[name] = torch.cat(steps)
    reference, ours = logits["fp32"], logits["int4"]
    # Same 4-bit weights; the difference is bf16 activations and scales (hybrid: the prompt runs through the
    # bf16 GEMM twins, the decode steps through int4), or int8 activations (blocks). Measured on the Zen 4 dev
    # box, int4 / hybrid: max |diff| 1.22 / 0.88 on logits up to 38, mean KL 0.0015 / 0.0008, top-1 identical
    # everywhere; blocks on an AVX2 EPYC: max |diff| 1.96, mean KL 0.0049, top-1 identical everywhere.
    kl = (reference.log_softmax(-1).exp() * (reference.log_softmax(-1) - ours.log_softmax(-1))).sum(-1)
    assert kl.mean() < 0.01 and kl.max() < 0.1
    assert (reference - ours).abs().max() < 3.0
    assert (reference.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.95
