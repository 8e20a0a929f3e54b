"""DeepSeek V2 / V2-Lite / V3 / R1 / V3.1 / V3.2 (and Prover-V2): Multi-head Latent Attention over a latent
cache, DeepSeekMoE, the V3.2 sparse-attention indexer and the multi-token-prediction (MTP) draft layers.

MLA runs in the absorbed form for every token: q_nope is folded through W_UK into the kv_lora_rank-wide latent
space, attention runs against the cached latents [c_kv | k_pe], and W_UV is applied to the attended latent. The
cache therefore holds kv_lora_rank + qk_rope_head_dim values per token per layer (576 on V3). Parameter names
are Hugging Face's, so a checkpoint's state dict loads as is.
"""

from __future__ import annotations

import torch
from torch import nn

from whale.cache_spec import KVCacheSpec
from whale.config import DeepseekConfig
from whale.models.decode_stack import CompiledDecode
from whale.models.deepseek_dsa import DeepseekIndexer
from whale.models.deepseek_moe import DeepseekMoE
from whale.models.deepseek_stack import build_deepseek_decode_stack
from whale.models.gguf_blocks import BlockLatentHeads
from whale.models.layers import (
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    apply_rotary,
    embedding,
    linear,
    rope_inv_freq,
    yarn_attention_factor,
    yarn_softmax_scale,
)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs (2i, 2i+1), as DeepSeek's checkpoints lay out their rope dims. The result lists
    the rotated even members, then the odd ones: q and k get the same order, so every dot product is the one of
    the interleaved rotation. x [T, heads, D]; cos/sin [T, D] in halves layout (only the first half is read)."""
    half = x.shape[-1] // 2
    cos, sin = cos[:, None, :half], sin[:, None, :half]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)


class DeepseekAttention(nn.Module):
    """MLA. `cache_layer` is the layer's row in the latent cache (MTP layers use their own small cache)."""

    def __init__(self, config: DeepseekConfig, cache_layer: int):
        super().__init__()
        self.cache_layer = cache_layer
        self.num_heads = config.num_attention_heads
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_rank = config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        hidden, heads, bias = config.hidden_size, self.num_heads, config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = linear(hidden, heads * config.qk_head_dim)
        else:
            self.q_a_proj = linear(hidden, self.q_lora_rank, bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, 1e-6)
            self.q_b_proj = linear(self.q_lora_rank, heads * config.qk_head_dim)
        self.kv_a_proj_with_mqa = linear(hidden, self.kv_rank + self.rope, bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, 1e-6)
        self.kv_b_proj = linear(self.kv_rank, heads * (self.nope + self.v_dim))
        self.o_proj = linear(heads * self.v_dim, hidden, bias)
        self.scale = yarn_softmax_scale(config.rope, config.qk_head_dim)
        self.rotate = rotate_pairs if config.rope_interleave else apply_rotary
        self.indexer = DeepseekIndexer(config) if config.index_topk else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn) -> torch.Tensor:
        tokens, heads = x.shape[0], self.num_heads
        if self.q_lora_rank is None:
            q_latent_in, q = None, self.q_proj(x)
        else:
            q_latent_in = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_latent_in)
        q_nope, q_pe = q.view(tokens, heads, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        q_pe = self.rotate(q_pe, cos, sin)
        k_pe = self.rotate(k_pe.unsqueeze(1), cos, sin).squeeze(1)
        if isinstance(self.kv_b_proj, BlockLatentHeads):
            q_absorbed = self.kv_b_proj.absorb_query(q_nope)
        else:
            w_kv = self.kv_b_proj.weight.view(heads, self.nope + self.v_dim, self.kv_rank)
            q_absorbed = torch.einsum("thn,hnr->thr", q_nope, w_kv[:, :self.nope])  # q_nope through W_UK
        allowed = None
        if self.indexer is not None:
            allowed = self.indexer(x, q_latent_in, cos, sin, attn, self.cache_layer)
        attended = attn.attend_latent(self.cache_layer, q_absorbed, q_pe, c_kv, k_pe, self.scale, allowed)
        if isinstance(self.kv_b_proj, BlockLatentHeads):
            out = self.kv_b_proj.expand_values(attended)
        else:
            out = torch.einsum("thr,hvr->thv", attended, w_kv[:, self.nope:])  # W_UV after attention
        return self.o_proj(out.reshape(tokens, heads * self.v_dim))


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, config: DeepseekConfig, layer_idx: int, cache_layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DeepseekAttention(config, cache_layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            self.mlp = DeepseekMoE(config)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    """`shared_head.norm`; the head itself is the main lm_head (the checkpoint's copy is the same matrix)."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekMTPLayer(DeepseekDecoderLayer):
    """Layer `num_hidden_layers + depth`: combines the previous depth's hidden state with the embedding of the
    next token, runs one decoder layer, and predicts one token further."""

    def __init__(self, config: DeepseekConfig, depth: int):
        super().__init__(config, config.num_hidden_layers + depth, cache_layer=depth)
        hidden = config.hidden_size
        self.enorm = RMSNorm(hidden, config.rms_norm_eps)
        self.hnorm = RMSNorm(hidden, config.rms_norm_eps)
        self.eh_proj = linear(2 * hidden, hidden)
        self.shared_head = SharedHead(config)


class DeepseekBody(nn.Module):
    """`model.*`: embeddings, the main layers followed by the MTP layers, final norm."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        main = [DeepseekDecoderLayer(config, i, i) for i in range(config.num_hidden_layers)]
        mtp = [DeepseekMTPLayer(config, d) for d in range(config.num_nextn_predict_layers)]
        self.layers = nn.ModuleList(main + mtp)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekForCausalLM(nn.Module):
    """forward(flat token ids, positions, latent-cache backend) -> hidden states; logits on demand; and the MTP
    draft step for speculative decoding."""

    # the router stays fp32 whatever the compute dtype (the bias decides expert choice)
    fp32_parameter_suffixes = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.config = config
        self.model = DeepseekBody(config)
        self.lm_head = linear(config.hidden_size, config.vocab_size)
        inv_freq = rope_inv_freq(config.rope, config.qk_rope_head_dim)
        self.rotary = RotaryEmbedding(inv_freq, yarn_attention_factor(config.rope))
        self.compiled_decode = CompiledDecode(build_deepseek_decode_stack)  # deepseek_stack.py

    @property
    def num_mtp_layers(self) -> int:
        return len(self.model.layers) - self.config.num_hidden_layers

    def _spec(self, layers: int) -> KVCacheSpec:
        c = self.config
        return KVCacheSpec("mla", layers, 1, c.kv_lora_rank + c.qk_rope_head_dim, rope_dim=c.qk_rope_head_dim,
                           indexer_dim=c.index_head_dim if c.index_topk else 0)

    def kv_cache_spec(self) -> KVCacheSpec:
        return self._spec(self.config.num_hidden_layers)

    def mtp_kv_cache_spec(self) -> KVCacheSpec:
        """The MTP layers' own latent cache (one layer per depth), used by `draft_hidden`."""
        return self._spec(self.num_mtp_layers)

    def tie_weights(self) -> None:
        """The loader's post-load hook: tie the head if the config says so, pack the experts (float ones; experts
        computed from a GGUF's blocks run in one compiled call a layer instead)."""
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.model.embed_tokens.weight
        for layer in self.model.layers:
            if isinstance(layer.mlp, DeepseekMoE) and isinstance(layer.mlp.experts[0].gate_proj, nn.Linear):
                layer.mlp.pack_experts()
            elif isinstance(layer.mlp, DeepseekMoE):
                layer.mlp.use_block_experts()

    def drop_unloaded(self, missing: list[str]) -> list[str]:
        """Give up the MTP layers when the checkpoint lacks them (GGUF, transformers' own saves); returns the
        names still missing."""
        first_mtp = self.config.num_hidden_layers
        mtp_prefixes = tuple(f"model.layers.{i}." for i in range(first_mtp, len(self.model.layers)))
        if any(name.startswith(mtp_prefixes) for name in missing):
            del self.model.layers[first_mtp:]
            return [name for name in missing if not name.startswith(mtp_prefixes)]
        return missing

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        stack_inputs = self.compiled_decode.inputs(self, attn, x)
        if stack_inputs is not None:
            return self.compiled_decode.stack.forward(x, cos, sin, *stack_inputs)
        for layer in self.model.layers[:self.config.num_hidden_layers]:
            x = layer(x, cos, sin, attn)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def draft_hidden(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, attn,
                     depth: int = 0) -> torch.Tensor:
        """One MTP step. `hidden` [N, H]: the main model's output (final-normed, as `forward` returns) at
        positions `positions`, or the previous depth's draft hidden; `next_ids` [N]: the token at position + 1.
        `attn` is a cache built from `mtp_kv_cache_spec()`. Returns the draft hidden state for
        `compute_draft_logits` (logits for the token at position + 2 + depth) or the next depth."""
        layer: DeepseekMTPLayer = self.model.layers[self.config.num_hidden_layers + depth]
        embedded = layer.enorm(self.model.embed_tokens(next_ids))
        x = layer.eh_proj(torch.cat((embedded, layer.hnorm(hidden)), dim=-1))
        cos, sin = self.rotary(positions, x.dtype)
        return layer(x, cos, sin, attn)

    def compute_draft_logits(self, draft_hidden: torch.Tensor, depth: int = 0) -> torch.Tensor:
        layer: DeepseekMTPLayer = self.model.layers[self.config.num_hidden_layers + depth]
        return self.lm_head(layer.shared_head.norm(draft_hidden)).float()
