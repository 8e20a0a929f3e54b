"""The compiled decode path of dense models with 4-bit weights: every layer of a step in one C++ call
(`DenseDecodeStack` in whale/kernels/cpu_ops.cpp) instead of a Python loop over ~25 eager ops a layer.

It serves steps of a few tokens (decode; the weight-only kernels' side of the hybrid switch) on CPU when the
attention backend is the paged cache with its compiled kernel, for Llama/Qwen2-shaped layers without biases or
q/k norms whose linears are all Int4Linear. Anything else runs the Python layers, which compute the same thing
(tests/test_cpu_kernels.py compares the two)."""

from __future__ import annotations

from torch import nn

from whale.kernels import cpu_ops
from whale.models.quant import INT4_MAX_ROWS, Int4Linear, RowSwitchLinear

MAX_TOKENS = INT4_MAX_ROWS  # above this the hybrid linears switch to the bf16 GEMM, which the stack lacks


def _int4(linear: nn.Module) -> Int4Linear | None:
    kernel = linear.small if isinstance(linear, RowSwitchLinear) else linear
    return kernel if isinstance(kernel, Int4Linear) and kernel.bias is None else None


def build_decode_stack(model: nn.Module):
    """The compiled stack for a loaded, fused DenseForCausalLM, or None where it cannot serve the model."""
    ops, config = cpu_ops(), model.config
    if ops is None or config.qk_norm:
        return None
    layers = model.model.layers
    weights = []
    for index, layer in enumerate(layers):
        attention, mlp = layer.self_attn, layer.mlp
        if attention.qkv_proj is None or mlp.gate_up_proj is None:
            return None
        for linear in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj):
            kernel = _int4(linear)
            if kernel is None:
                return None
            weights += [kernel.packed, kernel.scale_zero]
        following = layers[index + 1].input_layernorm if index + 1 < len(layers) else model.model.norm
        weights += [layer.post_attention_layernorm.weight.detach(), following.weight.detach()]
    head = layers[0].self_attn
    return ops.DenseDecodeStack(weights, head.num_heads, head.num_kv_heads, head.head_dim, config.rms_norm_eps,
                                head.scale)
