"""Dense GGUF files written the way llama.cpp's converter writes them (q/k rows permuted for Llama, Llama-3.1
RoPE scaling as a `rope_freqs` tensor, Qwen2 biases), from tiny transformers checkpoints, loaded by whale:
the same logits as transformers on the original checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from dense_checkpoints import VOCAB, tiny_dense_checkpoint
from random_blocks import random_blocks, round_activations

from whale import LLM, SamplingParams
from whale.models.gguf_blocks import BlockEmbedding, BlockLinear
from whale.platform import onednn_packs_bf16

_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}  # Qwen3's


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rotary halves become interleaved pairs."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _llama3_rope_factors(config) -> np.ndarray:
    """The divisors llama.cpp's converter writes as rope_freqs for Llama-3.1 scaling (its formula)."""
    rope = config.rope_parameters
    base, dim = rope["rope_theta"], config.head_dim
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_dense_gguf(reference, path: Path, arch: str, layer_type: str = "F32",
                     sampling: dict[str, float] | None = None, chat_template: str | None = None,
                     blocks: dict[str, str] | None = None) -> dict[str, tuple[np.ndarray, object]]:
    """`layer_type`: the ggml type of the layers' matrices (Q4_0 where a row splits into 32-weight blocks).
    `sampling`: general.sampling.* values (temp, top_p, top_k, ...), written by gguf's own add_sampling_*.
    `blocks`: HF parameter-name suffix -> ggml type: those matrices become random blocks of that type in the file,
    and the reference's weights are set to exactly their dequantised values (returned: `_random_block_weights`)."""
    config = reference.config
    raw = _random_block_weights(reference, blocks or {})
    writer = gguf.GGUFWriter(str(path), arch)
    for name, value in (sampling or {}).items():
        getattr(writer, f"add_sampling_{name}")(value)
    if chat_template:
        writer.add_chat_template(chat_template)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    writer.add_token_types([1] * VOCAB)
    writer.add_token_merges([])
    writer.add_eos_token_id(2)
    if arch == "llama" and config.rope_parameters.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(config))
    for name, tensor in reference.state_dict().items():
        value = tensor.numpy().astype(np.float32)
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = config.num_attention_heads if "q_proj" in module else config.num_key_value_heads
                value = _permute(value, heads)
            if name in raw:
                stored = _permute(raw[name][0], heads) if module in ("self_attn.q_proj", "self_attn.k_proj") and \
                    arch == "llama" else raw[name][0]
                writer.add_tensor(f"blk.{layer}.{_NAMES[module]}.{kind}", stored, raw_dtype=raw[name][1])
            elif layer_type != "F32" and value.ndim == 2 and value.shape[1] % 32 == 0:
                quant_type = gguf.GGMLQuantizationType[layer_type]
                writer.add_tensor(f"blk.{layer}.{_NAMES[module]}.{kind}", gguf.quants.quantize(value, quant_type),
                                  raw_dtype=quant_type)
            else:
                writer.add_tensor(f"blk.{layer}.{_NAMES[module]}.{kind}", value)
        else:
            short = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
            if name in raw:
                writer.add_tensor(short, raw[name][0], raw_dtype=raw[name][1])
            else:
                writer.add_tensor(short, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return raw


# scale magnitudes that give weights of a trained model's size (about a hundredth) and roughly zero mean: a tiny
# random model with larger weights is chaotic, a one-code difference in rounding then moves later logits a lot
_MAGNITUDES = {"Q4_K": (1e-4, 7.5e-4), "Q5_K": (2.5e-5, 3.75e-4), "Q6_K": (1e-5,), "Q8_0": (2.5e-4,),
               "Q4_0": (2.5e-3,)}


def _random_block_weights(reference, blocks: dict[str, str]) -> dict[str, tuple[np.ndarray, object]]:
    """{parameter name: (blocks in the file's row order before any permutation, ggml type)} for every matrix whose
    name ends with a `blocks` suffix; the reference's parameter is set to the blocks' dequantised values."""
    chosen = {}
    params = dict(reference.named_parameters())
    for index, (name, param) in enumerate(params.items()):
        ggml_type = next((t for suffix, t in blocks.items() if name.endswith(suffix)), None)
        if ggml_type is None or param.ndim != 2:
            continue
        rows, cols = param.shape
        data = random_blocks(ggml_type, rows, cols, seed=index, magnitude=_MAGNITUDES[ggml_type])
        quant_type = gguf.GGMLQuantizationType[ggml_type]
        with torch.no_grad():
            param.copy_(torch.from_numpy(gguf.quants.dequantize(data, quant_type).reshape(rows, cols).copy()))
        chosen[name] = (data, quant_type)
    return chosen


@pytest.mark.parametrize("kind, arch", [("llama3", "llama"), ("qwen2", "qwen2")])
def test_gguf_written_like_llama_cpp_loads_with_the_same_logits(tmp_path, kind, arch):
    _, reference = tiny_dense_checkpoint(kind, tmp_path / "hf")
    path = tmp_path / f"{kind}.gguf"
    write_dense_gguf(reference, path, arch)
    llm = LLM(str(path), dtype="float32")
    assert llm.loaded.files.format == "gguf"
    prompt = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                                     logprobs=1))[0].outputs[0]
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        ref_logprobs = reference(ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    # llama3 scaling changes the low frequencies at every position: a loader ignoring rope_freqs fails here
    assert out.token_ids == ref_logprobs.argmax(-1).tolist()
    ours = torch.tensor([step[token] for step, token in zip(out.logprobs, out.token_ids, strict=True)])
    theirs = ref_logprobs.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("kernels", ["int4", "hybrid"])
def test_a_4bit_gguf_with_layers_the_int4_kernel_cannot_take(tmp_path, kernels):
    """The tiny model's k/v (32 rows) and gate/up (96 rows) do not tile into the int4 packing's 64-row groups,
    so they stay in another kernel beside the 4-bit q/o/down: a mixed model, as llama.cpp's mixes are. It must
    generate for one sequence and for a batch, close to the same file computed in fp32."""
    _, reference = tiny_dense_checkpoint("llama", tmp_path / "hf")
    path = tmp_path / "q4.gguf"
    write_dense_gguf(reference, path, "llama", layer_type="Q4_0")
    exact, quantized = LLM(str(path), dtype="float32"), LLM(str(path), kernels=kernels)
    assert quantized.loaded.kernels == kernels
    generator = torch.Generator().manual_seed(4)
    prompts = [{"prompt_token_ids": torch.randint(3, VOCAB, (n,), generator=generator).tolist()} for n in (9, 14)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    for batch in (prompts[:1], prompts):
        ours, theirs = quantized.generate(batch, params), exact.generate(batch, params)
        for a, b in zip(ours, theirs, strict=True):
            assert a.outputs[0].finish_reason == "length"
            # the first token's logprob: same 4-bit weights, bf16 activations against fp32
            first, token = a.outputs[0].logprobs[0], b.outputs[0].token_ids[0]
            assert abs(first.get(token, -100.0) - b.outputs[0].logprobs[0][token]) < 0.1


# every linear's rows tile the int4 packing (64-row groups) and split into 32-weight blocks: fully 4-bit
FULLY_4BIT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)


_NO_BF16_PACKING = pytest.mark.skipif(
    not onednn_packs_bf16(), reason="the stack's bf16 GEMM side needs oneDNN's bf16 packing (AVX-512 BW/VL/DQ or "
    "AVX-NE-CONVERT); without it the stack serves steps of up to INT4_MAX_ROWS tokens only")


@pytest.mark.parametrize("kernels, batch", [("hybrid", 2), pytest.param("hybrid", 6, marks=_NO_BF16_PACKING),
                                            ("blocks", 2), ("blocks", 6)])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_the_compiled_layer_stack_equals_the_python_layers(tmp_path, kernels, batch, kind):
    """whale/models/dense_stack.py against the Python layer loop over the same kernels, on a fully 4-bit Q4_0
    model (Llama; Qwen2, whose q/k/v biases the stack adds; Qwen3, whose q/k norms it applies): with the hybrid
    kernels, decode steps of 2 tokens run the stack's int4 side, steps of 6 its bf16 GEMM side; with the block
    kernels, both run from the file's Q4_0 blocks. Bit-identical, so the greedy tokens and their logprobs are
    equal."""
    # Qwen3's config sets head_dim apart from hidden / heads: here the same, so every row count tiles the packing
    sizes = FULLY_4BIT | ({"head_dim": 16} if kind == "qwen3" else {})
    _, reference = tiny_dense_checkpoint(kind, tmp_path / "hf", **sizes)
    path = tmp_path / "q4.gguf"
    write_dense_gguf(reference, path, kind, layer_type="Q4_0")
    llm = LLM(str(path), kernels=kernels, enable_prefix_caching=False)
    assert llm.loaded.kernels == kernels
    generator = torch.Generator().manual_seed(5)
    prompts = [{"prompt_token_ids": torch.randint(3, VOCAB, (n,), generator=generator).tolist()}
               for n in range(3, 3 + batch)]  # 3 to 8 tokens: the prompts go through the paged kernel too
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    stacked = [o.outputs[0] for o in llm.generate(prompts, params)]
    model = llm.loaded.model
    assert model.compiled_decode.stack is not None and model.compiled_decode.stack.serves(batch)
    model.compiled_decode.stack = None  # the Python layers from here on
    layered = [o.outputs[0] for o in llm.generate(prompts, params)]
    assert [o.token_ids for o in stacked] == [o.token_ids for o in layered]
    assert [o.logprobs for o in stacked] == [o.logprobs for o in layered]


# a Q4_K_M file's mix: Q4_K mostly, Q6_K for v, down and the output projection (llama.cpp's choice)
Q4_K_M = {"q_proj.weight": "Q4_K", "k_proj.weight": "Q4_K", "v_proj.weight": "Q6_K", "o_proj.weight": "Q4_K",
          "gate_proj.weight": "Q4_K", "up_proj.weight": "Q4_K", "down_proj.weight": "Q6_K",
          "embed_tokens.weight": "Q4_K", "lm_head.weight": "Q6_K"}
K_QUANT_SIZES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                     tie_word_embeddings=False)


def _round_activations_as_the_kernels_do(reference, raw: dict[str, tuple[np.ndarray, object]]) -> None:
    """Hooks that give each of the reference's block-typed linears its input as the block kernels see it: int8
    codes, one fp32 scale (amax / 127) per 32 values, per 256 for the K-quants, rounded half to even."""
    def hook(block):
        return lambda _module, args: round_activations(args[0], block)

    for name, module in reference.named_modules():
        entry = raw.get(f"{name}.weight")
        if entry is not None and isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(hook(256 if entry[1].name.endswith("_K") else 32))


@pytest.mark.parametrize("kind, arch, mix", [("qwen2", "qwen2", Q4_K_M), ("llama", "llama", Q4_K_M),
                                             ("qwen3", "qwen3", {**Q4_K_M, "down_proj.weight": "Q5_K",
                                                                  "q_proj.weight": "Q8_0"})])
def test_a_k_quant_gguf_computes_from_its_blocks_with_the_references_logits(tmp_path, kind, arch, mix):
    """Random K-quant blocks in the file, their exact dequantised values in transformers' model: whale computes
    from the blocks (nothing expanded to floats). The kernels round each linear's input to int8 codes; with that
    same rounding applied to the reference's linears, the logprobs agree to float32 accumulation at most
    positions; where the two float32 computations put an activation on opposite sides of a rounding tie, a code
    moves by one and the positions after it by up to about a hundredth (the rounding itself moves them by a few
    hundredths here: llama.cpp's arithmetic, and its figure)."""
    sizes = K_QUANT_SIZES | ({"head_dim": 64} if kind == "qwen3" else {})
    _, reference = tiny_dense_checkpoint(kind, tmp_path / "hf", **sizes)
    path = tmp_path / "q4_k_m.gguf"
    raw = write_dense_gguf(reference, path, arch, blocks=mix)
    llm = LLM(str(path), enable_prefix_caching=False)
    model = llm.loaded.model
    assert llm.loaded.kernels == "blocks"
    assert isinstance(model.model.embed_tokens, BlockEmbedding) and isinstance(model.lm_head, BlockLinear)
    layer = model.model.layers[0]
    assert all(isinstance(m, BlockLinear) for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                   layer.mlp.gate_up_proj, layer.mlp.down_proj))
    floats = sum(p.numel() for p in model.parameters())  # norms and biases only
    assert floats < 0.02 * sum(p.numel() for p in reference.parameters())
    generator = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (7, 30)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],  # a batch: decode steps of 2 rows
                        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1))

    def reference_logprobs(prompt: list[int], tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
        return logits.log_softmax(-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]

    exact = [reference_logprobs(p, o.outputs[0].token_ids) for p, o in zip(prompts, outs, strict=True)]
    _round_activations_as_the_kernels_do(reference, raw)
    for prompt, out, unrounded in zip(prompts, outs, exact, strict=True):
        tokens = out.outputs[0].token_ids
        ours = torch.tensor([step[t] for step, t in zip(out.outputs[0].logprobs, tokens, strict=True)])
        rounded = (ours - reference_logprobs(prompt, tokens)).abs()
        assert rounded.median() < 1e-4 and rounded.max() < 0.03, rounded
        assert 1e-4 < (ours - unrounded).abs().max() < 0.1  # the rounding is there, and small
