"""DeepSeek-V4 (Flash, Pro): sliding-window attention over one shared K=V head, compressed entries (CSA: one per 4
tokens, a lightning indexer choosing which each query reads; HCA: one per 128, all read), attention sinks, a
grouped low-rank output projection, hyper-connection residual streams (`hc_mult` copies of the hidden state
mixed by Sinkhorn-normalised weights) and an MoE whose first layers route by a token-id table.

Parameter names are the released checkpoints' (`layers.{i}.attn.wq_a.weight`, `embed.weight`, `head.weight`,
...); `checkpoint_name` maps transformers' saves (`model.` prefix, `model.embed_tokens`, `model.hc_head.hc_fn`)
onto them.

What the cache holds (`kv_cache_spec`): every layer's window rows (the normalised, rotated K=V of each token);
per compressed layer the inputs its compressor pools (each token's kv and gate projections, the indexer's too on
CSA layers) and the compressed entries, one per `rate` tokens, written when the token closing their window is
computed. A window's entry is pooled from rows in the cache, not from state carried between steps, so chunked
prefill, prefix-cache hits anywhere (mid-window included), preemption and rejected drafts need nothing special.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from whale.cache_spec import V4_LAYER_STORES, KVCacheSpec, deepseek_v4_cache_spec
from whale.config import DeepseekV4Config
from whale.kernels import cpu_ops
from whale.models.deepseek_moe import dispatch_by_expert
from whale.models.layers import RMSNorm, RotaryEmbedding, embedding, linear, rope_inv_freq

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"


def rotate_trailing(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """V4's RoPE: interleaved pairs (2i, 2i+1) of the trailing rope channels, the rest untouched and the channel
    order kept (values carry the rotation too). x [T, ..., D]; cos/sin [T, rope] from RotaryEmbedding (halves
    layout: only the first half is read), broadcast over the middle dims."""
    half = cos.shape[-1] // 2
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    cos, sin = cos[:, :half].reshape(shape), sin[:, :half].reshape(shape)
    nope, rope = x[..., :-2 * half], x[..., -2 * half:]
    even, odd = rope[..., 0::2], rope[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((nope, rotated), dim=-1)


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class Compressor(nn.Module):
    """Pools each window of `rate` tokens into one entry: a softmax over the window's slots, per channel, of the
    gate projection plus a learned per-slot bias (`ape`), weighting the kv projection; then RMSNorm and RoPE at
    the window's first position. `overlap` (CSA): projections twice as wide, the window's entry pooling the
    previous window's first halves with its own second halves (2 * rate slots)."""

    def __init__(self, hidden: int, dim: int, rate: int, overlap: bool, eps: float):
        super().__init__()
        width = 2 * dim if overlap else dim
        self.dim, self.rate, self.overlap = dim, rate, overlap
        self.wkv = linear(hidden, width)
        self.wgate = linear(hidden, width)
        self.ape = nn.Parameter(torch.empty(rate, width, device="meta"))
        self.norm = RMSNorm(dim, eps)

    @property
    def row_width(self) -> int:
        """Values cached per token: its kv and gate projections."""
        return 2 * self.wkv.out_features

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.wkv(x), self.wgate(x)), dim=-1)

    def pool(self, rows: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """rows [W, slots, row_width]: the cached projections of each closing window's tokens (CSA: the previous
        window's, then its own); present [W, slots] False where there is no token (before the first window).
        Returns the entries before RoPE [W, dim]."""
        kv, gate = rows.chunk(2, dim=-1)
        rate = self.rate
        if self.overlap:
            gate = gate + self.ape.repeat(2, 1)
            dim = self.dim
            kv = torch.cat((kv[:, :rate, :dim], kv[:, rate:, dim:]), dim=1)
            gate = torch.cat((gate[:, :rate, :dim], gate[:, rate:, dim:]), dim=1)
        else:
            gate = gate + self.ape
        gate = gate.masked_fill(~present[..., None], float("-inf"))
        kv = kv.masked_fill(~present[..., None], 0.0)
        weights = gate.softmax(dim=1, dtype=torch.float32).to(kv.dtype)
        return self.norm((kv * weights).sum(dim=1))


class Indexer(nn.Module):
    """CSA's lightning indexer: its own compressor (keys of `index_head_dim`, the same windows as the entries)
    and per-head queries from the attention's compressed query; a query scores entry w as
    sum_h w_h * relu(q_h . k_w) / sqrt(dim), w_h from `weights_proj`."""

    def __init__(self, config: DeepseekV4Config):
        super().__init__()
        self.heads, self.dim, self.top_k = config.index_n_heads, config.index_head_dim, config.index_topk
        self.wq_b = linear(config.q_lora_rank, self.heads * self.dim)
        self.weights_proj = linear(config.hidden_size, self.heads)
        self.compressor = Compressor(config.hidden_size, self.dim, config.csa_rate, True, config.rms_norm_eps)


class DeepseekV4Attention(nn.Module):
    def __init__(self, config: DeepseekV4Config, layer: int, cache_layers: dict[str, int]):
        super().__init__()
        hidden, heads, dim = config.hidden_size, config.num_attention_heads, config.head_dim
        self.layer_type = config.layer_types[layer]
        self.rate = config.rate(layer)
        self.cache_layers = cache_layers  # this layer's index in each store it uses
        self.heads, self.dim, self.eps = heads, dim, config.rms_norm_eps
        self.window, self.groups = config.sliding_window, config.o_groups
        self.wq_a = linear(hidden, config.q_lora_rank)
        self.q_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.wq_b = linear(config.q_lora_rank, heads * dim)
        self.wkv = linear(hidden, dim)
        self.norm = RMSNorm(dim, config.rms_norm_eps)
        self.wo_a = linear(heads * dim // config.o_groups, config.o_groups * config.o_lora_rank)
        self.wo_b = linear(config.o_groups * config.o_lora_rank, hidden)
        self.attn_sink = nn.Parameter(torch.empty(heads, device="meta"))
        self.compressor = None
        self.indexer = None
        if self.layer_type != SLIDING:
            self.compressor = Compressor(hidden, dim, self.rate, self.layer_type == CSA, config.rms_norm_eps)
        if self.layer_type == CSA:
            self.indexer = Indexer(config)

    def _compress(self, x: torch.Tensor, attn, name: str, compressor: Compressor, cos_of) -> None:
        """Cache the step's projections; pool, rotate and cache the entry of every window a new token closes."""
        layer = self.cache_layers[name]
        attn.write_rows(f"{name}_rows", layer, compressor.project(x))
        seq, window = attn.closing_windows(self.rate)
        if seq.numel() == 0:
            return
        slots = 2 * self.rate if compressor.overlap else self.rate
        first = window * self.rate - (self.rate if compressor.overlap else 0)
        positions = first[:, None] + torch.arange(slots, device=x.device)
        rows = attn.rows_at(f"{name}_rows", layer, seq, positions)
        entries = compressor.pool(rows, positions >= 0)
        cos, sin = cos_of(window * self.rate)
        attn.write_entries(name, layer, self.rate, seq, window, rotate_trailing(entries, cos, sin))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn, cos_of) -> torch.Tensor:
        tokens = x.shape[0]
        q_latent = self.q_norm(self.wq_a(x))
        q = unweighted_rms_norm(self.wq_b(q_latent).view(tokens, self.heads, self.dim), self.eps)
        q = rotate_trailing(q, cos, sin)
        kv = rotate_trailing(self.norm(self.wkv(x)), cos, sin)
        extra = None
        if self.layer_type == HCA:
            self._compress(x, attn, "hca", self.compressor, cos_of)
            extra = ("hca", self.cache_layers["hca"], *attn.entry_grid("hca", self.rate))
        elif self.layer_type == CSA:
            self._compress(x, attn, "csa", self.compressor, cos_of)
            self._compress(x, attn, "index", self.indexer.compressor, cos_of)
            keys, visible = attn.entries("index", self.cache_layers["index"], self.rate)
            indexer = self.indexer
            q_index = rotate_trailing(indexer.wq_b(q_latent).view(tokens, indexer.heads, indexer.dim), cos, sin)
            head_weights = indexer.weights_proj(x) * indexer.heads ** -0.5
            chosen = attn.top_entries(keys, visible, q_index, head_weights, indexer.dim ** -0.5, indexer.top_k)
            extra = ("csa", self.cache_layers["csa"], attn.entry_grid("csa", self.rate)[0], chosen)
        out = attn.attend_window(self.cache_layers["window"], q, kv, self.dim ** -0.5, self.window,
                                 self.attn_sink, extra)
        out = rotate_trailing(out, cos, -sin)  # values carried the keys' rotation: undo it at the query position
        grouped = out.reshape(tokens, self.groups, -1).transpose(0, 1)  # [groups, T, heads*dim/groups]
        weight = self.wo_a.weight.view(self.groups, -1, grouped.shape[-1])
        projected = torch.bmm(grouped, weight.transpose(1, 2)).transpose(0, 1).reshape(tokens, -1)
        return self.wo_b(projected)


class Expert(nn.Module):
    """SwiGLU with V4's clamps: gate at most `limit`, up within +-limit."""

    def __init__(self, hidden: int, inter: int, limit: float):
        super().__init__()
        self.w1, self.w2, self.w3 = linear(hidden, inter), linear(inter, hidden), linear(hidden, inter)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.w1(x).clamp(max=self.limit)
        return self.w2(F.silu(gate) * self.w3(x).clamp(-self.limit, self.limit))


class Gate(nn.Module):
    """Router: sqrt(softplus) scores in fp32; experts chosen by score + bias, or read from `tid2eid[token]` on
    hash layers; weights the chosen scores normalised, times `routed_scaling_factor`."""

    def __init__(self, config: DeepseekV4Config, hashed: bool):
        super().__init__()
        experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(experts, config.hidden_size, device="meta"))
        if hashed:
            self.tid2eid = nn.Parameter(torch.empty(config.vocab_size, self.top_k, dtype=torch.long, device="meta"),
                                        requires_grad=False)
        else:
            self.bias = nn.Parameter(torch.empty(experts, device="meta"))
        self.hashed = hashed

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.softplus(F.linear(x.float(), self.weight.float())).sqrt()
        if self.hashed:
            ids = self.tid2eid[token_ids].long()
        else:
            ids = (scores + self.bias.float()).topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        return ids, weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * self.scaling


class MoE(nn.Module):
    def __init__(self, config: DeepseekV4Config, hashed: bool):
        super().__init__()
        hidden, inter, limit = config.hidden_size, config.moe_intermediate_size, config.swiglu_limit
        self.gate = Gate(config, hashed)
        self.experts = nn.ModuleList(Expert(hidden, inter, limit) for _ in range(config.n_routed_experts))
        self.shared_experts = Expert(hidden, inter * config.n_shared_experts, limit)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x, token_ids)
        return dispatch_by_expert(x, ids, weights, self.experts) + self.shared_experts(x)


def hyper_weights(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, iters: int,
                  eps: float, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hyper-connection weights from the streams [T, N, D], in fp32: pre [T, N] (collapse), post [T, N] (expand)
    and comb [T, N, N] (stream mixing, Sinkhorn-normalised towards doubly stochastic). One compiled call where the
    CPU kernels serve (fp32 streams), else these ops."""
    ops = cpu_ops() if streams.device.type == "cpu" and streams.dtype == torch.float32 else None
    if ops is not None and fn.dtype == torch.float32:
        pre, post, comb = ops.hyper_weights(streams.contiguous(), fn, base.float(), scale.float(), iters, eps,
                                            norm_eps)
        return pre, post, comb
    n = streams.shape[1]
    mixes = F.linear(unweighted_rms_norm(streams.flatten(1).float(), norm_eps), fn.float())
    pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = base.float().split([n, n, n * n])
    scale = scale.float()
    pre = torch.sigmoid(pre_w * scale[0] + pre_b) + eps
    post = 2 * torch.sigmoid(post_w * scale[1] + post_b)
    comb = torch.softmax(comb_w.view(-1, n, n) * scale[2] + comb_b.view(n, n), dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return pre, post, comb


class DeepseekV4Layer(nn.Module):
    def __init__(self, config: DeepseekV4Config, layer: int, cache_layers: dict[str, int]):
        super().__init__()
        hidden, n = config.hidden_size, config.hc_mult
        self.attn_norm = RMSNorm(hidden, config.rms_norm_eps)
        self.attn = DeepseekV4Attention(config, layer, cache_layers)
        self.ffn_norm = RMSNorm(hidden, config.rms_norm_eps)
        self.ffn = MoE(config, config.mlp_layer_types[layer] == "hash_moe")
        for site in ("attn", "ffn"):
            setattr(self, f"hc_{site}_fn", nn.Parameter(torch.empty((2 + n) * n, n * hidden, device="meta")))
            setattr(self, f"hc_{site}_base", nn.Parameter(torch.empty((2 + n) * n, device="meta")))
            setattr(self, f"hc_{site}_scale", nn.Parameter(torch.empty(3, device="meta")))
        self.iters, self.hc_eps, self.norm_eps = config.hc_sinkhorn_iters, config.hc_eps, config.rms_norm_eps

    def _connect(self, site: str, streams: torch.Tensor, block) -> torch.Tensor:
        """streams' = post * block(collapsed streams) + comb^T streams."""
        pre, post, comb = hyper_weights(streams, getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_base"),
                                        getattr(self, f"hc_{site}_scale"), self.iters, self.hc_eps, self.norm_eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)
        out = block(collapsed)
        dtype = streams.dtype
        return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2),
                                                                               streams)

    def forward(self, streams, token_ids, cos, sin, attn, cos_of) -> torch.Tensor:
        streams = self._connect("attn", streams, lambda h: self.attn(self.attn_norm(h), cos, sin, attn, cos_of))
        return self._connect("ffn", streams, lambda h: self.ffn(self.ffn_norm(h), token_ids))


def cache_spec(c: DeepseekV4Config) -> KVCacheSpec:
    """What the model caches (whale/cache_spec.py), from its config alone."""
    return deepseek_v4_cache_spec(c.layer_types, c.head_dim, c.index_head_dim, c.sliding_window, c.csa_rate,
                                  c.hca_rate)


class DeepseekV4ForCausalLM(nn.Module):
    """forward(flat token ids, positions, cache backend) -> hidden states; logits on demand."""

    fp32_parameter_suffixes = ("ffn.gate.weight", "ffn.gate.bias")

    def __init__(self, config: DeepseekV4Config):
        super().__init__()
        self.config = config
        hidden, n = config.hidden_size, config.hc_mult
        counts = {"window": 0, "csa": 0, "index": 0, "hca": 0}
        layers = []
        for i, layer_type in enumerate(config.layer_types):
            names = ("window", *V4_LAYER_STORES[layer_type])
            layers.append(DeepseekV4Layer(config, i, {name: counts[name] for name in names}))
            counts.update({name: counts[name] + 1 for name in names})
        self.embed = embedding(config.vocab_size, hidden)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.head = linear(hidden, config.vocab_size)
        self.hc_head_fn = nn.Parameter(torch.empty(n, n * hidden, device="meta"))
        self.hc_head_base = nn.Parameter(torch.empty(n, device="meta"))
        self.hc_head_scale = nn.Parameter(torch.empty(1, device="meta"))
        # two RoPE settings: the sliding layers', and the compressed layers' (YaRN frequencies, no cos/sin scaling)
        self.rotary = RotaryEmbedding(rope_inv_freq(config.rope, config.qk_rope_head_dim))
        self.compress_rotary = RotaryEmbedding(rope_inv_freq(config.compress_rope, config.qk_rope_head_dim))

    def kv_cache_spec(self) -> KVCacheSpec:
        return cache_spec(self.config)

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        """The parameter a checkpoint tensor loads into: the released names as they are; transformers' saves
        with their `model.` prefix and renamed root tensors; None for the MTP layers (not run here)."""
        if name.startswith("mtp."):
            return None
        name = name.removeprefix("model.")
        name = {"embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight"}.get(name, name)
        return re.sub(r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1", name)

    def tie_weights(self) -> None:
        """The loader's post-load hook (V4 never ties its head)."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        x = self.embed(input_ids)
        dtype = x.dtype
        main = self.rotary(positions, dtype)
        compressed = self.compress_rotary(positions, dtype)

        def cos_of(entry_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.compress_rotary(entry_positions, dtype)

        streams = x.unsqueeze(1).expand(-1, self.config.hc_mult, -1).contiguous()
        for layer in self.layers:
            cos, sin = main if layer.attn.layer_type == SLIDING else compressed
            streams = layer(streams, input_ids, cos, sin, attn, cos_of)
        flat = unweighted_rms_norm(streams.flatten(1).float(), self.config.rms_norm_eps)
        pre = torch.sigmoid(F.linear(flat, self.hc_head_fn.float()) * self.hc_head_scale.float()
                            + self.hc_head_base.float()) + self.config.hc_eps
        return self.norm((pre.unsqueeze(-1) * streams).sum(dim=1).to(dtype))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).float()
