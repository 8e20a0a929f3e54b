"""The compiled decode path of dense models with quantized weights: every layer of a step in one C++ call
(`DenseDecodeStack` in whale/kernels/cpu_ops.cpp) instead of a Python loop over ~25 eager ops a layer.

It serves decode steps (a few new tokens per sequence: what the paged cache's compiled attention takes) on CPU,
for Llama-, Qwen2- and Qwen3-shaped layers (Qwen2's fp32 q/k/v biases, Qwen3's q/k norms) whose linears all
have a compiled kernel (`LinearKernel` in cpu_ops.cpp): Int4Linear for steps of up to INT4_MAX_ROWS tokens (with
the hybrid kernels' packed bf16 twins for bigger batches too), BlockLinear (GGUF blocks) for any step. Anything
else runs the Python layers, which compute the same thing (tests/reference/test_dense_gguf.py compares the two)."""

from __future__ import annotations

import torch
from torch import nn

from whale.kernels import cpu_ops
from whale.models.decode_stack import ABSENT, DecodeStack
from whale.models.gguf_blocks import BlockLinear
from whale.models.quant import INT4_MAX_ROWS, Int4Linear, PackedBF16Linear, RowSwitchLinear


def _kernel(ops, linear: nn.Module, with_bias: bool = False):
    """The compiled kernel of a linear the stack can run (4-bit groups, with the hybrid kernels' packed bf16 twin
    if any, or GGUF blocks), else None; a bias only `with_bias` (the fused q/k/v projection, which the stack adds
    it to)."""
    if isinstance(linear, BlockLinear):
        return linear.kernel if with_bias or linear.bias is None else None
    small, large = (linear.small, linear.large) if isinstance(linear, RowSwitchLinear) else (linear, None)
    if not isinstance(small, Int4Linear):
        return None
    if not with_bias and (small.bias is not None or getattr(large, "bias", None) is not None):
        return None
    packed = isinstance(large, PackedBF16Linear) and large.packed is not None  # not where oneDNN cannot pack bf16
    # without a twin, a call of more rows than INT4_MAX_ROWS fails: DecodeStack.serves keeps such steps out
    return ops.Int4Kernel(small.packed, small.scale_zero, large.packed if packed else ABSENT, INT4_MAX_ROWS)


def _bias(linear: nn.Module) -> torch.Tensor | None:
    small = linear.small if isinstance(linear, RowSwitchLinear) else linear
    return None if small.bias is None else small.bias.detach()


def build_decode_stack(model: nn.Module) -> DecodeStack | None:
    """The compiled stack for a loaded, fused DenseForCausalLM, or None where it cannot serve the model."""
    ops, config = cpu_ops(), model.config
    if ops is None:
        return None
    layers = model.model.layers
    kernels, tensors, any_rows = [], [], True
    for index, layer in enumerate(layers):
        attention, mlp = layer.self_attn, layer.mlp
        if attention.qkv_proj is None or mlp.gate_up_proj is None:
            return None
        for linear in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj):
            kernel = _kernel(ops, linear, with_bias=linear is attention.qkv_proj)
            if kernel is None:
                return None
            kernels.append(kernel)
            twin = getattr(linear, "large", None)
            any_rows = any_rows and (isinstance(linear, BlockLinear) or getattr(twin, "packed", None) is not None)
        qkv_bias = _bias(attention.qkv_proj)
        if qkv_bias is not None and qkv_bias.dtype != torch.float32:  # the stack adds it in fp32, as Python does
            return None
        following = layers[index + 1].input_layernorm if index + 1 < len(layers) else model.model.norm
        tensors += [layer.post_attention_layernorm.weight.detach(), following.weight.detach(),
                    ABSENT if qkv_bias is None else qkv_bias]
        norms = (attention.q_norm, attention.k_norm) if attention.q_norm is not None else ()  # Qwen3's
        tensors += [n.weight.detach() for n in norms] or [ABSENT, ABSENT]
    head = layers[0].self_attn
    compiled = ops.DenseDecodeStack(kernels, tensors, head.num_heads, head.num_kv_heads, head.head_dim,
                                    config.rms_norm_eps, head.scale)
    return DecodeStack(compiled, None if any_rows else INT4_MAX_ROWS)
