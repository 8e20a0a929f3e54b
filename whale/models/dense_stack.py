"""The compiled decode path of dense models with 4-bit weights: every layer of a step in one C++ call
(`DenseDecodeStack` in whale/kernels/cpu_ops.cpp) instead of a Python loop over ~25 eager ops a layer.

It serves decode steps (a few new tokens per sequence: what the paged cache's compiled attention takes) on CPU,
for Llama-, Qwen2- and Qwen3-shaped layers (Qwen2's fp32 q/k/v biases, Qwen3's q/k norms) whose linears are all 4-bit:
Int4Linear for steps of up to INT4_MAX_ROWS tokens, and with the hybrid kernels' packed bf16 twins for bigger
batches too. Anything else runs the Python layers, which compute the same thing (tests/reference/test_dense_gguf.py
compares the two)."""

from __future__ import annotations

import torch
from torch import nn

from whale.kernels import cpu_ops
from whale.models.quant import INT4_MAX_ROWS, Int4Linear, PackedBF16Linear, RowSwitchLinear

ABSENT = torch.empty(0)  # the stack's list holds this where a layer has no such tensor (twin, bias, norms)


def _kernels(linear: nn.Module, with_bias: bool = False) -> tuple[Int4Linear, PackedBF16Linear | None] | None:
    """(the 4-bit kernel, its oneDNN-packed bf16 twin if any) of a linear the stack can run, else None; a bias only
    `with_bias` (the fused q/k/v projection, which the stack adds it to)."""
    small, large = (linear.small, linear.large) if isinstance(linear, RowSwitchLinear) else (linear, None)
    if not isinstance(small, Int4Linear):
        return None
    if not with_bias and (small.bias is not None or getattr(large, "bias", None) is not None):
        return None
    packed = isinstance(large, PackedBF16Linear) and large.packed is not None  # not where oneDNN cannot pack bf16
    return small, large if packed else None


class DecodeStack:
    """The compiled stack and the most tokens a step may carry through it (None: any number)."""

    def __init__(self, compiled, max_tokens: int | None):
        self.compiled, self.max_tokens = compiled, max_tokens

    def serves(self, tokens: int) -> bool:
        return self.max_tokens is None or tokens <= self.max_tokens

    def forward(self, *inputs) -> torch.Tensor:
        return self.compiled.forward(*inputs)


def build_decode_stack(model: nn.Module) -> DecodeStack | None:
    """The compiled stack for a loaded, fused DenseForCausalLM, or None where it cannot serve the model."""
    ops, config = cpu_ops(), model.config
    if ops is None:
        return None
    layers = model.model.layers
    weights, every_twin = [], True
    for index, layer in enumerate(layers):
        attention, mlp = layer.self_attn, layer.mlp
        if attention.qkv_proj is None or mlp.gate_up_proj is None:
            return None
        qkv_bias = ABSENT
        for linear in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj):
            kernels = _kernels(linear, with_bias=linear is attention.qkv_proj)
            if kernels is None:
                return None
            int4, twin = kernels
            if linear is attention.qkv_proj and int4.bias is not None:
                if int4.bias.dtype != torch.float32:  # the stack adds it in fp32, as Python does an fp32 bias
                    return None
                qkv_bias = int4.bias.detach()  # the twin holds the same values (add_gemm_kernels)
            every_twin = every_twin and twin is not None
            weights += [int4.packed, int4.scale_zero, ABSENT if twin is None else twin.packed]
        following = layers[index + 1].input_layernorm if index + 1 < len(layers) else model.model.norm
        weights += [layer.post_attention_layernorm.weight.detach(), following.weight.detach(), qkv_bias]
        norms = (attention.q_norm, attention.k_norm) if attention.q_norm is not None else ()  # Qwen3's
        weights += [n.weight.detach() for n in norms] or [ABSENT, ABSENT]
    head = layers[0].self_attn
    compiled = ops.DenseDecodeStack(weights, head.num_heads, head.num_kv_heads, head.head_dim, config.rms_norm_eps,
                                    head.scale, INT4_MAX_ROWS)
    return DecodeStack(compiled, None if every_twin else INT4_MAX_ROWS)
