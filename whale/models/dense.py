"""Dense decoders: Llama (llama3 RoPE scaling included), Qwen2 (qkv bias), Qwen3 (q/k RMSNorm).

These serve the embedded default model (SmolLM2, Llama architecture) and the R1 distills. Parameter names
equal the Hugging Face ones, so a checkpoint's state dict loads without renaming.
"""

from __future__ import annotations

import torch
from torch import nn

from whale.cache_spec import KVCacheSpec
from whale.config import DenseConfig
from whale.models.decode_stack import CompiledDecode
from whale.models.dense_stack import build_decode_stack
from whale.models.layers import (
    AttentionBackend,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    embedding,
    fuse_linears,
    linear,
    rope_inv_freq,
    rotate_leading_heads,
    signed_rotary_tables,
)


class DenseAttention(nn.Module):
    def __init__(self, config: DenseConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        hidden = config.hidden_size
        self.q_proj = linear(hidden, self.num_heads * self.head_dim, config.attention_bias)
        self.k_proj = linear(hidden, self.num_kv_heads * self.head_dim, config.attention_bias)
        self.v_proj = linear(hidden, self.num_kv_heads * self.head_dim, config.attention_bias)
        self.o_proj = linear(self.num_heads * self.head_dim, hidden, config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.qkv_proj: nn.Module | None = None

    def fuse(self) -> None:
        """After loading: one qkv_proj instead of q_proj, k_proj, v_proj (HF names then no longer exist)."""
        self.qkv_proj = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        if self.qkv_proj is not None:
            del self.q_proj, self.k_proj, self.v_proj

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        if self.qkv_proj is None:  # before fuse_projections(): the HF-named modules
            return torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)
        return self.qkv_proj(x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                attn: AttentionBackend) -> torch.Tensor:
        """cos/signed_sin: `signed_rotary_tables` of this step's positions."""
        tokens, heads, kv_heads = x.shape[0], self.num_heads, self.num_kv_heads
        # in the residual stream's dtype (a weight-only linear answers in bf16): rotary and the cache want it
        qkv = self._qkv(x).to(cos.dtype).view(tokens, heads + 2 * kv_heads, self.head_dim)
        if self.q_norm is not None:
            qkv = torch.cat((self.q_norm(qkv[:, :heads]), self.k_norm(qkv[:, heads:heads + kv_heads]),
                             qkv[:, heads + kv_heads:]), dim=1)
        qkv = rotate_leading_heads(qkv, heads + kv_heads, cos, signed_sin)  # q and k together, one call a layer
        q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
        out = attn.attend(self.layer_idx, q, k, v, self.scale)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))


class DenseDecoderLayer(nn.Module):
    def __init__(self, config: DenseConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DenseAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.mlp_bias)

    def forward(self, residual: torch.Tensor, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionBackend, next_norm: RMSNorm) -> torch.Tensor:
        """`normed` is input_layernorm(residual); adds this layer's attention and MLP to `residual` in place and
        returns next_norm(residual) (the next layer's input norm, or the final one): each residual add is fused
        with the norm that follows it."""
        normed = self.post_attention_layernorm.add_and_norm(residual, self.self_attn(normed, cos, sin, attn))
        return next_norm.add_and_norm(residual, self.mlp(normed))


class DenseBody(nn.Module):
    """`model.*` in HF naming: embeddings, layers, final norm."""

    def __init__(self, config: DenseConfig):
        super().__init__()
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DenseDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DenseForCausalLM(nn.Module):
    """forward(flat token ids, their positions, attention backend) -> hidden states; logits on demand."""

    def __init__(self, config: DenseConfig):
        super().__init__()
        self.config = config
        self.model = DenseBody(config)
        self.lm_head = linear(config.hidden_size, config.vocab_size)
        self.rotary = RotaryEmbedding(rope_inv_freq(config.rope, config.head_dim))
        self.compiled_decode = CompiledDecode(build_decode_stack)  # dense_stack.py

    def kv_cache_spec(self) -> KVCacheSpec:
        c = self.config
        return KVCacheSpec("mha", c.num_hidden_layers, c.num_key_value_heads, c.head_dim)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):  # not a kernel over blocks
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse_projections(self) -> None:
        """Post-load hook: q/k/v and gate/up each become one matmul (fewer calls, one pass over x)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        residual = self.model.embed_tokens(input_ids)
        cos, sin = signed_rotary_tables(*self.rotary(positions, residual.dtype))
        layers = self.model.layers
        normed = layers[0].input_layernorm(residual)
        stack_inputs = self.compiled_decode.inputs(self, attn, residual)
        if stack_inputs is not None:
            return self.compiled_decode.stack.forward(residual, normed, cos, sin, *stack_inputs)
        for layer, after in zip(layers, [*layers[1:], None], strict=True):
            normed = layer(residual, normed, cos, sin, attn,
                           self.model.norm if after is None else after.input_layernorm)
        return normed

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
