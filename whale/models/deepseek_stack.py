"""The compiled decode path of DeepSeek models (MLA + MoE) computed from a GGUF's blocks: every layer of a step in
one C++ call (`DeepseekDecodeStack` in whale/kernels/deepseek_stack.cpp) instead of a Python loop over ~40 eager
ops a layer. It is DeepseekForCausalLM.forward written out op for op over the same kernels, so the two agree bit
for bit (tests/reference/test_deepseek_gguf.py runs both).

It serves decode steps on CPU (what the paged cache's compiled attention takes) of models whose linears are all
`BlockLinear`s without biases, whose kv_b is split per head in blocks (`BlockLatentHeads`) and whose MoE layers run
their experts compiled (`BlockExperts`): a deepseek2 GGUF in any block type. V3.2's sparse-attention indexer runs
in Python (no stack)."""

from __future__ import annotations

import torch
from torch import nn

from whale.kernels import cpu_ops
from whale.models.decode_stack import ABSENT, DecodeStack
from whale.models.deepseek_moe import DeepseekMoE
from whale.models.gguf_blocks import BlockLatentHeads, BlockLinear

TOPK_METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}


def _shape(ops, config, scale: float):
    shape = ops.DeepseekShape()
    shape.heads, shape.kv_lora_rank = config.num_attention_heads, config.kv_lora_rank
    shape.qk_nope_head_dim, shape.qk_rope_head_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
    shape.v_head_dim, shape.q_lora_rank = config.v_head_dim, config.q_lora_rank or 0
    shape.rms_norm_eps, shape.scale, shape.rope_interleave = config.rms_norm_eps, scale, config.rope_interleave
    shape.num_experts_per_tok, shape.topk_method = config.num_experts_per_tok, TOPK_METHODS[config.topk_method]
    shape.n_group, shape.topk_group = config.n_group, config.topk_group
    shape.sigmoid, shape.norm_topk_prob = config.scoring_func == "sigmoid", bool(config.norm_topk_prob)
    shape.routed_scaling_factor = config.routed_scaling_factor
    return shape


def _blocks(*linears: nn.Module) -> bool:
    return all(isinstance(m, BlockLinear) and m.bias is None for m in linears)


def _kernel(*linears: BlockLinear):
    """One kernel over the linears' rows stacked (they read the same input): their parts side by side."""
    return BlockLinear.concat(list(linears)).kernel


def build_deepseek_decode_stack(model: nn.Module) -> DecodeStack | None:
    """The compiled stack for a loaded DeepseekForCausalLM, or None where it cannot serve the model."""
    ops, config = cpu_ops(), model.config
    if ops is None or config.index_topk:
        return None
    linears, experts, tensors, head_types = [], [], [], []
    layers = model.model.layers[:config.num_hidden_layers]
    for layer in layers:
        attention, mlp = layer.self_attn, layer.mlp
        heads = attention.kv_b_proj
        first = attention.q_proj if attention.q_lora_rank is None else attention.q_a_proj
        q_b = None if attention.q_lora_rank is None else attention.q_b_proj
        optional = [] if q_b is None else [q_b]
        if not isinstance(heads, BlockLatentHeads) or not _blocks(first, attention.kv_a_proj_with_mqa,
                                                                   attention.o_proj, *optional):
            return None
        linears += [_kernel(first, attention.kv_a_proj_with_mqa), None if q_b is None else q_b.kernel,
                    attention.o_proj.kernel]
        if isinstance(mlp, DeepseekMoE):
            if mlp.block_experts is None:
                return None
            gate = mlp.gate
            bias = getattr(gate, "e_score_correction_bias", None)
            linears += [None, None]
            experts.append(mlp.block_experts)
            router = [gate.weight.detach(), ABSENT if bias is None else bias.detach()]
        else:
            if not _blocks(mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                return None
            linears += [_kernel(mlp.gate_proj, mlp.up_proj), mlp.down_proj.kernel]
            experts.append(None)
            router = [ABSENT, ABSENT]
        q_norm = ABSENT if q_b is None else attention.q_a_layernorm.weight.detach()
        tensors += [layer.input_layernorm.weight.detach(), q_norm, attention.kv_a_layernorm.weight.detach(),
                    layer.post_attention_layernorm.weight.detach(), heads.k_b, heads.v_b, *router]
        head_types += [heads.k_type, heads.v_type]
    if any(t.numel() and t.dtype != torch.float32 for t in tensors if t.dtype != torch.uint8):
        return None  # norms and router in fp32, as the Python layers compute them in a float32 model
    compiled = ops.DeepseekDecodeStack(_shape(ops, config, layers[0].self_attn.scale), linears, experts, tensors,
                                       head_types, model.model.norm.weight.detach())
    return DecodeStack(compiled, None)
