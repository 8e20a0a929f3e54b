"""The paged KV cache's storage and the attention backends that read it.

Storage is one tensor per kind per layer over all block slots: dense models store K and V per KV head; MLA
models store one latent row per token (kv_lora_rank + qk_rope_head_dim values: the normalised c_kv and the
rotated shared k_pe), and V3.2 adds its indexer keys. A step's layout (`StepLayout`) says, for each sequence in
the flat batch, where its new tokens are written and which slots make up its context; attention gathers each
sequence's context into a padded [batch, context, ...] grid with one index_select and masks what a token must
not see. No per-sequence Python loop runs inside a layer.
"""

from __future__ import annotations

import mmap
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from whale.cache_spec import CacheStore, KVCacheSpec
from whale.engine.kv_cache import BlockManager, PooledBlockManager, WindowedBlockManager
from whale.errors import UnsupportedModelError
from whale.kernels import cpu_ops
from whale.models.layers import in_prompt_step

# Steps whose sequences add at most this many tokens each (decode, short drafts) read K/V straight from the
# blocks with the compiled kernel; longer chunks (prefill) gather the context once and run SDPA's tiled GEMMs.
KERNEL_MAX_NEW_TOKENS = 8


@dataclass(frozen=True)
class StepLayout:
    """Where each flat token of a step sits in the padded grid, where its k/v go, what context it sees."""

    starts: tuple[int, ...]  # tokens of each sequence already cached before the step
    counts: tuple[int, ...]  # new tokens of each sequence
    slot_mapping: torch.Tensor  # [T] storage row of each new token
    context_index: torch.Tensor  # [B, S_max] storage row of each context position (0 where padded)
    token_seq: torch.Tensor  # [T] sequence of each flat token
    token_row: torch.Tensor  # [T] its row among its sequence's new tokens
    token_len: torch.Tensor  # [T] context positions the token sees, its own included
    causal: torch.Tensor  # [B, max_new, S_max] bool: the context position is visible to the token
    uniform: bool  # every sequence has the same number of new tokens: padding is a plain reshape
    pools: dict[str, StepLayout] | None = None  # the same step over each block pool's tables (several pools)

    @property
    def batch(self) -> int:
        return len(self.counts)

    @property
    def max_new(self) -> int:
        return self.causal.shape[1]

    @classmethod
    def build(cls, block_tables: Sequence[Sequence[int]], starts: Sequence[int], counts: Sequence[int],
              block_size: int, device: torch.device) -> StepLayout:
        batch = len(counts)
        counts_t = torch.tensor(counts, device=device)
        starts_t = torch.tensor(starts, device=device)
        token_seq = torch.repeat_interleave(torch.arange(batch, device=device), counts_t)
        first = torch.cumsum(counts_t, 0) - counts_t
        token_row = torch.arange(int(counts_t.sum()), device=device) - first[token_seq]
        max_new = max(counts)
        max_context = max(s + c for s, c in zip(starts, counts, strict=True))
        width = max(len(t) for t in block_tables)
        # a released block (RELEASED, -1) reads block 0: only positions a step never reads are released
        tables = torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables], device=device).clamp(min=0)
        positions = torch.arange(max_context, device=device)
        blocks = positions // block_size
        blocks = torch.minimum(blocks, torch.tensor(width - 1, device=device))
        context_index = tables[:, blocks] * block_size + positions % block_size
        valid = positions[None, :] < (starts_t + counts_t)[:, None]
        context_index = torch.where(valid, context_index, torch.zeros_like(context_index))
        slot_mapping = context_index[token_seq, starts_t[token_seq] + token_row]
        query_pos = starts_t[:, None] + torch.arange(max_new, device=device)[None, :]
        causal = positions[None, None, :] <= query_pos[:, :, None]
        token_len = starts_t[token_seq] + token_row + 1
        return cls(tuple(starts), tuple(counts), slot_mapping, context_index, token_seq, token_row, token_len,
                   causal, uniform=len(set(counts)) == 1)


class PagedKVCache:
    """Block storage plus the attention backend methods models call (`attend` for dense models,
    `attend_latent` / `select_topk` for MLA and DSA).

    The engine sets each step's layout from its requests' block tables (`set_layout`). Scripts and tests can
    instead name sequences by slot: `begin_step(slots, new_token_counts)` allocates blocks itself."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", enable_prefix_caching: bool = True,
                 num_window_blocks: int = 0, max_num_seqs: int = 1):
        self.spec, self.dtype, self.device = spec, dtype, torch.device(device)
        self.block_size = block_size
        main = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.pool_of = {s.name: spec.pool(s, block_size) for s in _cache_stores(spec)}
        others: dict[str, BlockManager] = {}
        for store in _cache_stores(spec):
            pool, size = self.pool_of[store.name], spec.pool_block_size(store, block_size)
            if pool == "main" or pool in others:
                continue
            if pool == "window":  # per-token stores, blocks released once out of the window
                blocks = max(num_window_blocks, spec.window_blocks(block_size))
                others[pool] = WindowedBlockManager(blocks, block_size, spec.retain, enable_prefix_caching)
            else:  # larger blocks, one row each: the main pool's tokens, and a block begun per sequence
                others[pool] = BlockManager(-(-num_blocks * block_size // size) + max_num_seqs, size,
                                            enable_prefix_caching)
        self.blocks: BlockManager | PooledBlockManager = PooledBlockManager(main, others) if others else main
        self.pools: dict[str, BlockManager] = getattr(self.blocks, "pools", {"main": main})
        # zeros, not empty: padded context positions are read (then masked) and must not hold NaNs. A store of
        # rate m keeps ceil(block size / m) rows a block of its pool (entry w in the block of token w*m)
        self.stores = {}
        for store in _cache_stores(spec):
            pool = self.pools[self.pool_of[store.name]]
            rows = pool.num_blocks * store.rows_per_block(pool.block_size)
            self.stores[store.name] = _zeros((store.layers, rows, *store.shape), dtype, self.device)
        self.layout: StepLayout | None = None
        self._slot_lengths: dict[Hashable, int] = {}
        self._slot_step: list[tuple[Hashable, int]] = []

    def footprint(self) -> tuple[float, float]:
        """What the storage lays out: bytes one more token of a sequence costs in the pools that grow with it, and
        the bytes of the blocks a sequence holds in the windowed pool (its window and one new token)."""
        per_token = per_sequence = 0.0
        for name, store in self.stores.items():
            pool = self.pools[self.pool_of[name]]
            block = store.numel() * store.element_size() / pool.num_blocks
            if self.pool_of[name] == "window":
                per_sequence += block * self.spec.window_blocks(self.block_size)
            else:
                per_token += block / pool.block_size
        return per_token, per_sequence

    def bytes_written(self) -> int:
        """Cache bytes of every block handed out at least once (on CPU, what the storage has made resident)."""
        written = 0
        for name, store in self.stores.items():
            pool = self.pools[self.pool_of[name]]
            written += store.numel() * store.element_size() // pool.num_blocks * pool.blocks_written
        return written

    def build_layout(self, seq_ids: Sequence[Hashable], starts: Sequence[int], counts: Sequence[int]) -> StepLayout:
        """The step's layout from the sequences' block tables in every pool."""
        layouts = {name: StepLayout.build([pool.block_table(s) for s in seq_ids], starts, counts, pool.block_size,
                                          self.device) for name, pool in self.pools.items()}
        return replace(layouts["main"], pools=layouts) if len(layouts) > 1 else layouts["main"]

    def _layout_of(self, name: str) -> StepLayout:
        """The layout that addresses store `name`: its pool's."""
        pool = self.pool_of[name]
        return self.layout if pool == "main" else self.layout.pools[pool]

    def bytes_per_token(self) -> float:
        """Cache bytes one more token of a sequence costs across all layers (the windowed stores aside)."""
        return self.spec.bytes_per_token(next(iter(self.stores.values())).element_size(), self.block_size)

    @property
    def num_tokens_capacity(self) -> int:
        return self.blocks.num_blocks * self.block_size

    def set_layout(self, layout: StepLayout | None) -> None:
        self.layout = layout

    # -- the slot API: sequences named by the caller, blocks allocated here (no prefix caching) --------------
    def begin_step(self, slots: Sequence[Hashable], new_tokens: Sequence[int]) -> None:
        starts = [self._slot_lengths.setdefault(slot, 0) for slot in slots]
        for slot, start, count in zip(slots, starts, new_tokens, strict=True):
            if not self.blocks.grow(slot, start + count):
                raise MemoryError(f"KV cache full: {self.num_tokens_capacity} tokens")
        self._slot_step = list(zip(slots, [s + c for s, c in zip(starts, new_tokens, strict=True)], strict=True))
        self.layout = self.build_layout(slots, starts, new_tokens)

    def end_step(self) -> None:
        for slot, length in self._slot_step:
            self._slot_lengths[slot] = length
            if isinstance(self.pools.get("window"), WindowedBlockManager):
                self.pools["window"].release_old(slot, length)
        self._slot_step = []
        self.layout = None

    def free(self, slot: Hashable) -> None:
        self.blocks.free(slot)
        self._slot_lengths.pop(slot, None)

    # -- attention ------------------------------------------------------------------------------------------
    def _write_and_gather(self, name: str, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """Store the step's new rows [T, ...]; return each sequence's whole context, padded: [B, S_max, ...]."""
        store = self.stores[name][layer]
        store[self.layout.slot_mapping] = rows.to(store.dtype)
        index = self.layout.context_index
        return store.index_select(0, index.reshape(-1)).view(*index.shape, *store.shape[1:])

    def _pad_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] flat tokens -> [B, max_new, ...]."""
        layout = self.layout
        if layout.uniform:
            return x.view(layout.batch, layout.max_new, *x.shape[1:])
        padded = x.new_zeros(layout.batch, layout.max_new, *x.shape[1:])
        padded[layout.token_seq, layout.token_row] = x
        return padded

    def _unpad_tokens(self, x: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        if layout.uniform:
            return x.reshape(-1, *x.shape[2:])
        return x[layout.token_seq, layout.token_row]

    def _paged_kernel(self):
        """The compiled paged-attention kernel when it serves this step, else None."""
        if (self.device.type != "cpu" or self.dtype != torch.float32
                or self.layout.max_new > KERNEL_MAX_NEW_TOKENS or in_prompt_step()):
            return None
        ops = cpu_ops()
        return None if ops is None else ops.paged_attention

    def kernel_inputs(self) -> tuple[torch.Tensor, ...] | None:
        """For a compiled model path that runs attention itself (whale/models/dense_stack.py, deepseek_stack.py):
        every layer's storage (K and V; MLA's latents) and this step's layout, or None where the compiled kernel
        does not serve this step."""
        if self.spec.kind not in ("mha", "mla") or self._paged_kernel() is None:
            return None
        layout = self.layout
        stores = (self.stores["k"], self.stores["v"]) if self.spec.kind == "mha" else (self.stores["latent"],)
        return (*stores, layout.slot_mapping, layout.context_index, layout.token_seq, layout.token_len)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Dense (GQA/MHA) attention: q [T, Hq, D], new k/v [T, Hkv, D] -> [T, Hq, D]."""
        kernel = self._paged_kernel()
        if kernel is not None and q.dtype == torch.float32:
            layout = self.layout
            return kernel(q, k, v, self.stores["k"][layer], self.stores["v"][layer], layout.slot_mapping,
                          layout.context_index, layout.token_seq, layout.token_len, scale)
        keys = self._write_and_gather("k", layer, k).transpose(1, 2)  # [B, Hkv, S, D]
        values = self._write_and_gather("v", layer, v).transpose(1, 2)
        query = self._pad_tokens(q).transpose(1, 2)  # [B, Hq, Tn, D]
        if in_prompt_step():
            out = self._position_tiled_sdpa(query, keys, values, scale)
        else:
            mask = None if self.layout.max_new == 1 and self.layout.batch == 1 else self.layout.causal[:, None]
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        return self._unpad_tokens(out.transpose(1, 2))

    def _position_tiled_sdpa(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                             scale: float) -> torch.Tensor:
        """SDPA over query tiles cut at the cache's block boundaries (absolute positions), each against the
        context its last row sees. SDPA's result for a row depends on which other rows and keys share its call;
        with both fixed by position, a prompt token whose prefix came from the prefix cache (a whole number of
        blocks) is computed exactly as it was without, whatever else the step holds."""
        out = torch.empty_like(query)
        size = self.block_size
        for seq, (start, count) in enumerate(zip(self.layout.starts, self.layout.counts, strict=True)):
            row = 0
            while row < count:
                end = min(count, row + size - (start + row) % size)
                seen = start + end  # context positions the tile's last row sees
                out[seq:seq + 1, :, row:end] = F.scaled_dot_product_attention(
                    query[seq:seq + 1, :, row:end], keys[seq:seq + 1, :, :seen], values[seq:seq + 1, :, :seen],
                    attn_mask=self.layout.causal[seq:seq + 1, None, row:end, :seen], scale=scale, enable_gqa=True)
                row = end
        return out

    def attend_latent(self, layer: int, q_latent: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                      k_pe: torch.Tensor, scale: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Absorbed MLA. q_latent [T, H, R] is q_nope already multiplied by W_UK; q_pe [T, H, P] and k_pe [T, P]
        are rotated; latent [T, R] is the normalised c_kv. Stores [latent | k_pe] and returns, per head, the
        attention-weighted sum of the cached latents [T, H, R] (the caller applies W_UV). `allowed` [T, S_max]
        restricts each token to selected context positions (DSA)."""
        rank = latent.shape[-1]
        new_rows, queries = torch.cat((latent, k_pe), dim=-1), torch.cat((q_latent, q_pe), dim=-1)
        kernel = self._paged_kernel()
        if kernel is not None and allowed is None and queries.dtype == torch.float32:
            # MQA over the latent rows: one KV head whose keys are [latent | k_pe] and whose values are the same
            # rows (the k_pe columns of the result are dropped): the compiled kernel reads them in place
            layout, store, row = self.layout, self.stores["latent"][layer].unsqueeze(1), new_rows.unsqueeze(1)
            out = kernel(queries, row, row, store, store, layout.slot_mapping, layout.context_index,
                         layout.token_seq, layout.token_len, scale)
            return out[..., :rank].contiguous()
        context = self._write_and_gather("latent", layer, new_rows)
        query = self._pad_tokens(queries)  # [B, Tn, H, R+P]
        batch, rows, heads, width = query.shape
        scores = torch.matmul(query.reshape(batch, rows * heads, width), context.transpose(1, 2)) * scale
        mask = self.layout.causal if allowed is None else self.layout.causal & self._pad_tokens(allowed)
        scores = scores.view(batch, rows, heads, -1).masked_fill(~mask[:, :, None, :], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        out = torch.matmul(probs.view(batch, rows * heads, -1), context[..., :rank])
        return self._unpad_tokens(out.view(batch, rows, heads, rank))

    def select_topk(self, layer: int, q_index: torch.Tensor, head_weights: torch.Tensor, k_index: torch.Tensor,
                    scale: float, top_k: int) -> torch.Tensor:
        """DSA lightning indexer. Stores the new indexer keys k_index [T, D]; scores every visible context
        position t for each token as sum_h w_h * relu(scale * q_h . k_t) (q_index [T, Hi, D], head_weights
        [T, Hi]) and returns the top-k positions as a bool mask [T, S_max]."""
        causal = self.layout.causal
        keys = self._write_and_gather("index", layer, k_index).float()  # [B, S, D]
        query = self._pad_tokens(q_index.float())  # [B, Tn, Hi, D]
        batch, rows, heads, dim = query.shape
        scores = torch.relu(torch.matmul(query.reshape(batch, rows * heads, dim), keys.transpose(1, 2)) * scale)
        weights = self._pad_tokens(head_weights.float())  # [B, Tn, Hi]
        index = torch.matmul(weights.unsqueeze(-2), scores.view(batch, rows, heads, -1)).squeeze(-2)
        index = index.masked_fill(~causal, float("-inf"))
        chosen = index.topk(min(top_k, causal.shape[-1]), dim=-1).indices
        selected = torch.zeros_like(causal).scatter_(-1, chosen, True)
        return self._unpad_tokens(selected)

    # -- rows by store, windows and compressed entries (DeepSeek-V4) ------------------------------------------
    def write_rows(self, name: str, layer: int, rows: torch.Tensor) -> None:
        """Store the step's new tokens' rows [T, ...] of a per-token store."""
        store = self.stores[name][layer]
        store[self._layout_of(name).slot_mapping] = rows.to(store.dtype)

    def rows_at(self, name: str, layer: int, seq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rows of a per-token store at context `positions` [W, n] of sequences `seq` [W] (a position below 0
        reads position 0: the caller masks it)."""
        slots = self._layout_of(name).context_index[seq[:, None], positions.clamp(min=0)]
        return self.stores[name][layer][slots]

    def closing_windows(self, rate: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows of `rate` tokens whose last token is computed in this step: (sequence, window index) each
        [W]. Window w of a sequence holds its tokens w*rate .. w*rate + rate - 1."""
        seq, window = [], []
        for index, (start, count) in enumerate(zip(self.layout.starts, self.layout.counts, strict=True)):
            closing = range(start // rate, (start + count) // rate)
            seq += [index] * len(closing)
            window += closing
        device = self.layout.context_index.device
        return torch.tensor(seq, dtype=torch.long, device=device), torch.tensor(window, dtype=torch.long, device=device)

    def _entry_rows(self, name: str, rate: int, seq: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """Where entry `window` of each sequence lives in store `name` of `rate`: in its pool's block of the
        window's first token."""
        size = self.pools[self.pool_of[name]].block_size
        slots = self._layout_of(name).context_index[seq, window * rate]
        return slots // size * -(-size // rate) + slots % size // rate

    def write_entries(self, name: str, layer: int, rate: int, seq: torch.Tensor, window: torch.Tensor,
                      rows: torch.Tensor) -> None:
        store = self.stores[name][layer]
        store[self._entry_rows(name, rate, seq, window)] = rows.to(store.dtype)

    def entry_grid(self, name: str, rate: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each sequence's closed entries of store `name` live, padded: rows [B, E]; and which each new token
        may read [T, E] (entry w once its window has closed: w < (position + 1) // rate)."""
        layout = self.layout
        totals = [(s + c) // rate for s, c in zip(layout.starts, layout.counts, strict=True)]
        width = max(totals)
        device = layout.context_index.device
        window = torch.arange(width, device=device)
        seq = torch.arange(layout.batch, device=device)[:, None].expand(-1, width)
        closed = window[None, :] < torch.tensor(totals, device=device)[:, None]
        rows = self._entry_rows(name, rate, seq.reshape(-1), torch.where(closed, window, 0).reshape(-1))
        position = torch.tensor(layout.starts, device=device)[layout.token_seq] + layout.token_row
        return rows.view(layout.batch, width), window[None, :] < ((position + 1) // rate)[:, None]

    def entries(self, name: str, layer: int, rate: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every closed entry of each sequence, padded: [B, E, ...], and which each new token may read [T, E]."""
        rows, visible = self.entry_grid(name, rate)
        return self.stores[name][layer][rows], visible

    def top_entries(self, keys: torch.Tensor, visible: torch.Tensor, q_index: torch.Tensor,
                    head_weights: torch.Tensor, scale: float, top_k: int) -> torch.Tensor:
        """The lightning indexer's choice: of the entries each token may read, the `top_k` whose keys (keys [B, E,
        D]) score highest as sum_h w_h * relu(scale * q_h . k) (q_index [T, H, D], head_weights [T, H]); [T, E]."""
        if keys.shape[1] == 0:
            return visible
        scores = torch.relu(torch.einsum("bthd,bed->bthe", self._pad_tokens(q_index.float()), keys.float()) * scale)
        index = torch.einsum("bth,bthe->bte", self._pad_tokens(head_weights.float()), scores)
        index = self._unpad_tokens(index).masked_fill(~visible, float("-inf"))
        chosen = index.topk(min(top_k, index.shape[-1]), dim=-1).indices
        return torch.zeros_like(visible).scatter_(-1, chosen, True) & visible

    def attend_window(self, layer: int, q: torch.Tensor, kv: torch.Tensor, scale: float, window: int,
                      sinks: torch.Tensor, extra: tuple[str, int, torch.Tensor, torch.Tensor] | None = None
                      ) -> torch.Tensor:
        """One shared head whose keys are its values (kv [T, D], stored in the "window" store), each token reading
        the last `window` positions up to its own, plus the `extra` entries it may read (store name, its layer, the
        entries' rows as `entry_grid` gives them [B, E], and which each token reads [T, E]); a per-head sink logit
        (sinks [H]) joins the softmax
        and takes no value. q [T, H, D] -> [T, H, D]. Decode steps gather each token's entries; prompt steps
        read every entry of the sequence, masked (a step of many tokens shares them)."""
        layout = self._layout_of("window")
        store = self.stores["window"][layer]
        store[layout.slot_mapping] = kv.to(store.dtype)
        device = q.device
        starts = torch.tensor(layout.starts, device=device)
        ends = starts + torch.tensor(layout.counts, device=device)
        first = (starts - window + 1).clamp(min=0)
        span = int((ends - first).max())
        positions = first[:, None] + torch.arange(span, device=device)[None, :]  # [B, span]
        in_context = positions < ends[:, None]
        keys = store[layout.context_index[torch.arange(layout.batch, device=device)[:, None],
                                          torch.where(in_context, positions, 0)]].to(q.dtype)  # [B, span, D]
        query_pos = starts[layout.token_seq] + layout.token_row  # [T]
        key_pos = positions[layout.token_seq]  # [T, span]
        in_window = (key_pos <= query_pos[:, None]) & (key_pos > query_pos[:, None] - window)
        masks = [in_context[layout.token_seq] & in_window]
        logits = [self._unpad_tokens(torch.einsum("bthd,bsd->bths", self._pad_tokens(q), keys))]
        values: list[tuple[str, torch.Tensor]] = [("sequence", keys)]
        if extra is not None and extra[3].shape[-1]:
            name, store_layer, rows, readable = extra
            entries = self.stores[name][store_layer]
            if in_prompt_step():
                grid = entries[rows].to(q.dtype)  # [B, E, D]
                logits.append(self._unpad_tokens(torch.einsum("bthd,bed->bthe", self._pad_tokens(q), grid)))
                masks.append(readable)
                values.append(("sequence", grid))
            else:
                picks = readable.float().topk(int(readable.sum(-1).max()), dim=-1).indices  # what it reads, first
                chosen = entries[rows[layout.token_seq].gather(-1, picks)].to(q.dtype)  # [T, k, D]
                logits.append(torch.einsum("thd,tkd->thk", q, chosen))
                masks.append(readable.gather(-1, picks))
                values.append(("token", chosen))
        widths = [m.shape[-1] for m in masks]
        combined = torch.cat(logits, dim=-1) * scale
        combined = combined.masked_fill(~torch.cat(masks, dim=-1)[:, None, :], float("-inf"))
        sink = sinks.to(combined.dtype).view(1, -1, 1).expand(combined.shape[0], -1, 1)
        probs = torch.softmax(torch.cat((combined, sink), dim=-1).float(), dim=-1)[..., :-1].to(q.dtype)
        out = torch.zeros_like(q)
        for part, (kind, rows_of) in zip(probs.split(widths, dim=-1), values, strict=True):
            if kind == "sequence":
                out += self._unpad_tokens(torch.einsum("bths,bsd->bthd", self._pad_tokens(part), rows_of))
            else:
                out += torch.einsum("thk,tkd->thd", part, rows_of)
        return out


def _cache_stores(spec: KVCacheSpec) -> tuple[CacheStore, ...]:
    try:
        return spec.cache_stores()
    except ValueError as exc:
        raise UnsupportedModelError(str(exc)) from None


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros that cost memory only where written: on CPU an anonymous private mapping, whose pages the OS maps
    in, zeroed, 4 KiB at a time on first write, with huge pages refused (numpy's calloc asks for them: a token's
    row made 2 MiB of every layer's storage resident, 224 MiB of a 1.5B model's cache in two steps); `torch.zeros`
    writes every byte, so a cache sized for a long context would be resident from the start."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        pages.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(shape)


DEFAULT_KV_CACHE_BYTES = 512 * 2**20
MAX_DEFAULT_TOKENS = 65536


def create_cache(spec: KVCacheSpec, dtype: torch.dtype, device: torch.device | str = "cpu",
                 num_blocks: int | None = None, block_size: int = 16, memory_bytes: int = DEFAULT_KV_CACHE_BYTES,
                 enable_prefix_caching: bool = True, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 1024) -> PagedKVCache:
    """A paged cache for the model's spec: `num_blocks` blocks, or as many as fit in `memory_bytes` (at most
    65,536 tokens, so tiny models do not allocate what they never use). A spec with windowed stores first gets
    their pool: every running sequence's window, twice over (released blocks stay prefix hits a while), and one
    step's tokens, within half the budget (at least one sequence's window and a whole step: with less, sequences
    wait or are preempted, not refused)."""
    element = torch.tensor([], dtype=dtype).element_size()
    window_blocks = 0
    if spec.retain:
        block_bytes = spec.block_bytes(block_size, element, windowed=True)
        wanted = 2 * max_num_seqs * spec.window_blocks(block_size) + -(-max_num_batched_tokens // block_size)
        least = spec.window_blocks(block_size, max_num_batched_tokens)  # one sequence and a whole step
        window_blocks = max(least, min(wanted, memory_bytes // 2 // block_bytes))  # at most half the budget
        memory_bytes = max(0, memory_bytes - window_blocks * block_bytes)
    if num_blocks is None:
        tokens = min(int(memory_bytes // spec.bytes_per_token(element, block_size)), MAX_DEFAULT_TOKENS)
        num_blocks = max(1, tokens // block_size)
    return PagedKVCache(spec, num_blocks, block_size, dtype, device, enable_prefix_caching, window_blocks,
                        max_num_seqs)
