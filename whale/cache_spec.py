"""What a model caches per token, without torch: the engine's paged cache is built from a `KVCacheSpec`, and the
planner (`whale plan`, which never imports torch) prices a deployment from the same spec.

A spec is a list of stores (`CacheStore`): rows of `shape` values in some of the layers, one row per token or
one per `rate` tokens (a compressed entry). A spec with `retain` > 0 keeps its per-token stores only for the
last `retain` tokens before each step (the engine's windowed block pool): they cost a sequence a bounded
amount, its compressed stores grow with its length."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CacheStore:
    """One kind of cached row: `shape` values each, in `layers` layers (counted in the store's own order), one
    row per `rate` tokens (a compressed entry per `rate` tokens; 1: a row per token)."""

    name: str
    layers: int
    shape: tuple[int, ...]
    rate: int = 1

    @property
    def row_values(self) -> int:
        return self.layers * math.prod(self.shape)

    def rows_per_block(self, block_size: int) -> int:
        """Rows a block of `block_size` tokens holds: an entry per `rate` tokens, in the block of its first one."""
        return -(-block_size // self.rate)


@dataclass(frozen=True)
class KVCacheSpec:
    """What a model stores per token per layer; the engine builds the matching cache from it.
    kind "mha": separate K and V of `num_kv_heads` x `head_dim` (dense models).
    kind "mla": one latent row of `head_dim` = kv_lora_rank + `rope_dim` values (DeepSeek), plus an
    `indexer_dim`-wide key for DeepSeek Sparse Attention when non-zero (V3.2).
    kind "stores": the `stores` the model lists, each with its own layers, width and rate (DeepSeek-V4's
    window rows, compressor inputs and compressed entries per layer type); `retain`: see the module."""

    kind: str
    num_layers: int
    num_kv_heads: int = 1
    head_dim: int = 0
    rope_dim: int = 0
    indexer_dim: int = 0
    stores: tuple[CacheStore, ...] = ()
    retain: int = 0

    def cache_stores(self) -> tuple[CacheStore, ...]:
        if self.kind == "stores":
            return self.stores
        if self.kind == "mha":
            shape = (self.num_kv_heads, self.head_dim)
            return CacheStore("k", self.num_layers, shape), CacheStore("v", self.num_layers, shape)
        if self.kind == "mla":
            latent = CacheStore("latent", self.num_layers, (self.head_dim,))
            if self.indexer_dim:
                return latent, CacheStore("index", self.num_layers, (self.indexer_dim,))
            return (latent,)
        raise ValueError(f"no KV cache for kind {self.kind!r}")

    def windowed(self, store: CacheStore) -> bool:
        """Whether `store` lives in the windowed pool (per-token rows read only near each step)."""
        return self.retain > 0 and store.rate == 1

    def pool(self, store: CacheStore, block_size: int) -> str:
        """The block pool `store` lives in: "window" (the windowed pool), "rate<m>" (blocks of m tokens, for a
        store with a row per m tokens, m a multiple of the block size: one row a block, none wasted) or "main"."""
        if self.windowed(store):
            return "window"
        if store.rate > block_size and store.rate % block_size == 0:
            return f"rate{store.rate}"
        return "main"

    def pool_block_size(self, store: CacheStore, block_size: int) -> int:
        return store.rate if self.pool(store, block_size).startswith("rate") else block_size

    def block_bytes(self, block_size: int, element_size: int, windowed: bool = False) -> int:
        """Bytes of one block of the main pool (or of the windowed pool) across all its stores and layers."""
        pool = "window" if windowed else "main"
        return sum(s.row_values * s.rows_per_block(block_size) * element_size
                   for s in self.cache_stores() if self.pool(s, block_size) == pool)

    def bytes_per_token(self, element_size: int, block_size: int = 16) -> float:
        """Cache bytes one more token of a sequence costs across all layers, as the pools allocate them (a
        compressed store's row shared by `rate` tokens); the windowed stores cost a sequence `window_bytes`."""
        total = 0.0
        for store in self.cache_stores():
            if not self.windowed(store):
                size = self.pool_block_size(store, block_size)
                total += store.row_values * element_size * store.rows_per_block(size) / size
        return total

    def window_blocks(self, block_size: int, step_tokens: int = 1) -> int:
        """Windowed-pool blocks a sequence holds during a step of `step_tokens` new tokens: those covering the
        `retain` tokens before the step (which may start mid-block) and the step's own."""
        if not self.retain:
            return 0
        return -(-(self.retain + step_tokens) // block_size) + 1

    def window_bytes(self, block_size: int, element_size: int, step_tokens: int = 1) -> int:
        """What the windowed stores cost one sequence, whatever its length."""
        return self.window_blocks(block_size, step_tokens) * self.block_bytes(block_size, element_size, True)


V4_LAYER_STORES = {"sliding_attention": (), "compressed_sparse_attention": ("csa", "index"),
                   "heavily_compressed_attention": ("hca",)}


def deepseek_v4_cache_spec(layer_types: tuple[str, ...], head_dim: int, index_head_dim: int, sliding_window: int,
                           csa_rate: int, hca_rate: int) -> KVCacheSpec:
    """DeepSeek-V4: every layer's window rows (its K=V, `head_dim`); a CSA layer's compressor inputs (kv and gate
    projections, two halves each: 4 x head_dim) and its indexer's (4 x index_head_dim), an entry of head_dim and
    an indexer key per `csa_rate` tokens; an HCA layer's compressor inputs (2 x head_dim) and an entry per
    `hca_rate` tokens. A step reads per-token rows back to the start of the oldest window it may close or
    attend: `retain` = the longest of the sliding window, an HCA window and two CSA windows, less one."""
    count = {name: sum(name in V4_LAYER_STORES[t] for t in layer_types) for name in ("csa", "index", "hca")}
    stores = [CacheStore("window", len(layer_types), (head_dim,))]
    if count["csa"]:
        stores += [CacheStore("csa_rows", count["csa"], (4 * head_dim,)),
                   CacheStore("index_rows", count["index"], (4 * index_head_dim,)),
                   CacheStore("csa", count["csa"], (head_dim,), csa_rate),
                   CacheStore("index", count["index"], (index_head_dim,), csa_rate)]
    if count["hca"]:
        stores += [CacheStore("hca_rows", count["hca"], (2 * head_dim,)),
                   CacheStore("hca", count["hca"], (head_dim,), hca_rate)]
    retain = max(sliding_window, hca_rate if count["hca"] else 0, 2 * csa_rate if count["csa"] else 0) - 1
    return KVCacheSpec("stores", len(layer_types), stores=tuple(stores), retain=retain)
