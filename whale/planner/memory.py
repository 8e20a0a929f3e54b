"""Bytes: weights per storage format (with their scales), KV cache per token, and the runtime overhead.

Every figure is computed from shapes, so a test can re-derive it by hand:
- bf16: 2 bytes a weight.
- fp8: 1 byte a weight + one fp32 scale per 128x128 block (DeepSeek's `weight_scale_inv` layout).
- int8: 1 byte a weight + one fp32 scale per output row (channel-wise W8A8).
- int4: 4 bits a weight + per 128-weight group an fp16 scale and a 4-bit zero point (AWQ / GPTQ style).
- q4_k_m: llama.cpp GGUF Q4_K (144 bytes per 256 weights, 4.5 bits, 6-bit sub-block scales inside) with half
  of the layers' down projections and the output head in Q6_K (210 bytes per 256, 6.5625 bits); norms f32.
- fp4: DeepSeek-V4's release: routed experts in MXFP4 (4 bits + an 8-bit scale per 32 weights), the other
  linear weights fp8 as above.
Unquantized tensors (embedding, norms, router gates) stay bf16 except in GGUF.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from whale.cache_spec import V4_LAYER_STORES, deepseek_v4_cache_spec
from whale.config import v4_layer_types
from whale.errors import InvalidRequestError
from whale.planner.catalog import ModelSpec
from whale.planner.params import TensorGroup

WEIGHT_FORMATS = ("bf16", "fp8", "int8", "int4", "q4_k_m", "fp4")
KV_DTYPES = {"bf16": 2, "fp8": 1}
GIB = 1024**3

# Runtime overhead, stated rather than a flat percentage of the model:
MEMORY_UTILIZATION = 0.90  # vLLM's default --gpu-memory-utilization: 10% stays free for the CUDA context,
#                            NCCL buffers and allocator fragmentation
CUDA_GRAPH_BYTES = 1 * GIB  # captured decode graphs and their memory pool
PREFILL_CHUNK_TOKENS = 8192  # activations of one chunked-prefill step (vLLM's default token budget)
MAX_BATCH_LOGITS = 256  # fp32 logits for this many sampled sequences


def _blocks(n: int, size: int) -> int:
    return -(-n // size)


def _fp8_bytes(g: TensorGroup) -> int:
    return g.count * (g.rows * g.cols + _blocks(g.rows, 128) * _blocks(g.cols, 128) * 4)


def _kquant_bytes(g: TensorGroup) -> int:
    q6 = g.count // 2 if g.down_proj else 0
    row_blocks = g.rows * _blocks(g.cols, 256)
    return q6 * row_blocks * 210 + (g.count - q6) * row_blocks * 144


def _quantized_bytes(g: TensorGroup, fmt: str) -> int:
    if fmt == "bf16":
        return g.params * 2
    if fmt == "int8":
        return g.count * (g.rows * g.cols + g.rows * 4)
    if fmt == "int4":
        groups = g.rows * _blocks(g.cols, 128)
        return g.count * (g.rows * g.cols // 2 + groups * 2 + _blocks(groups, 2))
    if fmt == "q4_k_m":
        return _kquant_bytes(g)
    if fmt == "fp4" and g.component == "routed_experts":
        return g.count * (g.rows * g.cols // 2 + g.rows * _blocks(g.cols, 32))
    return _fp8_bytes(g)  # fp8, and fp4's non-expert weights


def tensor_bytes(g: TensorGroup, fmt: str) -> int:
    """Bytes of one tensor group stored in `fmt`."""
    if fmt not in WEIGHT_FORMATS:
        raise InvalidRequestError(f"unknown weight format {fmt!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    if g.quantized:
        return _quantized_bytes(g, fmt)
    if fmt == "q4_k_m":
        if g.component == "embedding":
            return g.rows * _blocks(g.cols, 256) * 144 * g.count
        if g.component == "lm_head":
            return g.rows * _blocks(g.cols, 256) * 210 * g.count
        return g.params * 4  # GGUF keeps norms and small vectors in f32
    return g.params * 2


def weight_bytes(groups: list[TensorGroup], fmt: str, include_mtp: bool = False) -> int:
    return sum(tensor_bytes(g, fmt) for g in groups if include_mtp or not g.mtp)


# --- KV cache ---------------------------------------------------------------------------------------------

INDEXER_KEY_BYTES = 128 + 4  # V3.2: per token per layer one fp8 128-dim key + its fp32 scale


@dataclass(frozen=True)
class KVShape:
    """KV cache of one token in every layer, and what a sequence holds regardless of its length.

    `layer_bytes` lists each layer's bytes per token (V4's compressed layers differ, and may be fractional:
    one 512-wide row per 4 or per 128 tokens). `replicated` is true when every tensor-parallel rank holds the
    whole entry (MLA's latent, V4's single KV head); otherwise KV heads are split across ranks.
    """

    layer_bytes: tuple[float, ...]
    sequence_bytes: int  # V4's raw sliding window, per sequence
    replicated: bool
    kv_heads: int

    @property
    def token_bytes(self) -> float:
        return sum(self.layer_bytes)

    def per_gpu_token_bytes(self, tp: int, pp: int) -> float:
        """Per token on the most loaded GPU: its pipeline stage's layers, its share of the KV heads."""
        stage = _blocks(len(self.layer_bytes), pp)
        heaviest = max(sum(self.layer_bytes[i:i + stage]) for i in range(0, len(self.layer_bytes), stage))
        if self.replicated:
            return heaviest
        return heaviest * max(1, self.kv_heads // tp) / self.kv_heads

    def per_gpu_sequence_bytes(self, pp: int) -> float:
        return self.sequence_bytes / pp


V4_RATES = (4, 128)  # tokens per compressed row of CSA and HCA layers (the released models')
ENGINE_BLOCK_SIZE = 16  # whale's paged cache block (EngineConfig.block_size)


def kv_shape(s: ModelSpec, kv_dtype: str = "bf16", include_mtp: bool = False) -> KVShape:
    """MLA: kv_lora_rank + qk_rope_head_dim values a layer (never the per-head K/V), plus V3.2's indexer key.
    GQA/MHA: 2 x kv_heads x head_dim a layer. V4: whale's cache spec (`whale.cache_spec`), as the engine's
    allocator counts it: a compressed row of head_dim (plus the indexer's key on ratio-4 layers) every `ratio`
    tokens; per sequence the windowed pool's blocks (every layer's window rows and the compressor inputs)."""
    if kv_dtype not in KV_DTYPES:
        raise InvalidRequestError(f"unknown KV cache dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
    width = KV_DTYPES[kv_dtype]
    layers = s.num_layers + (s.mtp_layers if include_mtp and s.is_moe else 0)
    if s.attention == "mla":
        assert s.kv_lora_rank is not None
        per_layer = (s.kv_lora_rank + s.qk_rope_head_dim) * width + (INDEXER_KEY_BYTES if s.index_n_heads else 0)
        return KVShape((per_layer,) * layers, 0, replicated=True, kv_heads=1)
    if s.attention == "compressed":
        ratios = list(s.compress_ratios) + [V4_RATES[0]] * (layers - len(s.compress_ratios))  # MTP layers: CSA
        types = v4_layer_types(ratios, *V4_RATES)
        spec = deepseek_v4_cache_spec(types, s.head_dim, s.index_head_dim, s.sliding_window, *V4_RATES)
        stores = {store.name: store for store in spec.stores}
        per_layer_c = tuple(sum(math.prod(stores[name].shape) * width / stores[name].rate
                                for name in V4_LAYER_STORES[t]) for t in types)
        return KVShape(per_layer_c, spec.window_bytes(ENGINE_BLOCK_SIZE, width), replicated=True, kv_heads=1)
    per_layer = 2 * s.num_kv_heads * s.head_dim * width
    return KVShape((per_layer,) * layers, 0, replicated=False, kv_heads=s.num_kv_heads)


def activation_bytes(s: ModelSpec, ffn_shards: int) -> int:
    """Peak activations of one prefill chunk: residual stream and attention buffers (4 x hidden) plus the
    gate/up outputs of the widest MLP a token passes through, in bf16; and fp32 logits of a full batch."""
    if s.is_moe:
        ffn = max(s.intermediate_size, (s.experts_per_token + s.n_shared_experts) * s.moe_intermediate_size)
    else:
        ffn = s.intermediate_size
    per_token = 4 * s.hidden_size + 2 * _blocks(ffn, ffn_shards)
    return PREFILL_CHUNK_TOKENS * per_token * 2 + MAX_BATCH_LOGITS * s.vocab_size * 4
