"""Linears and embeddings computed straight from a GGUF's quantized blocks, as the file stores them.

A Q4_K_M file is mostly Q4_K and Q6_K blocks (Q8_0, Q4_0, Q5_K in others). `BlockLinear` keeps each weight's
bytes where they are, a view of the memory-mapped file (a copy only where rows must move: Llama's permuted
q/k), and multiplies with the compiled `block_linear` (whale/kernels/ggml_blocks.cpp: int8 activations,
integer dot products per block, as llama.cpp computes). Nothing is expanded to floats at load or kept twice:
a model takes about the file's size in memory and starts in the time it takes to read the header.
`BlockEmbedding` decodes only the rows a step looks up.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from whale.kernels import cpu_ops
from whale.weights.gguf import GGUFTensor, unpermute_rope_rows

# ggml type ids of the block formats the compiled kernel computes with (gguf.GGMLQuantizationType)
BLOCK_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}


def has_block_kernel(tensor: GGUFTensor | None) -> bool:
    return tensor is not None and tensor.ggml_type in BLOCK_TYPES and len(tensor.shape) == 2 and cpu_ops() is not None


def block_bytes(tensor: GGUFTensor, rope_heads: int | None = None) -> torch.Tensor:
    """The tensor's blocks as uint8 [rows, bytes a row]: a view of the file's memory map, or (`rope_heads`:
    undo llama.cpp's q/k row permutation for that many heads) a copy with whole rows moved."""
    with warnings.catch_warnings():  # the map is read-only; nothing writes through this view
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(tensor.raw)
    if rope_heads is not None:
        raw = unpermute_rope_rows(raw, rope_heads).contiguous()
    return raw


class BlockLinear(nn.Module):
    """y = x W^T (+ b), W the row-wise stack of `weights` (uint8 [rows, bytes a row] in ggml block `types`): one
    part per checkpoint tensor, so a fused q/k/v may mix Q4_K and Q6_K. Takes fp32 or bf16, answers fp32."""

    def __init__(self, weights: list[torch.Tensor], types: list[int], bias: nn.Parameter | None):
        super().__init__()
        self.weights, self.types = weights, types  # plain attributes: the blocks, not state to save
        self.kernel = cpu_ops().BlockKernel(weights, types)  # what the compiled decode stack calls too
        self.bias = bias
        self.out_features = sum(w.shape[0] for w in weights)

    @classmethod
    def from_gguf(cls, tensor: GGUFTensor, bias: nn.Parameter | None, rope_heads: int | None = None) -> BlockLinear:
        """The tensor's blocks, packed for the kernel where it has a packed layout for them (`pack_rows`: groups
        of 8 rows interleaved; the file's pages are let go as they are packed), else read where the file maps
        them (mapped in now, rather than a page fault at a time)."""
        in_place = rope_heads is None and tensor.mapping is not None
        raw, ggml_type = block_bytes(tensor, rope_heads), BLOCK_TYPES[tensor.ggml_type]
        weight, type_id = cpu_ops().pack_rows(raw, ggml_type, mapped=in_place)
        if type_id == ggml_type and in_place:
            tensor.populate()
        return cls([weight], [type_id], bias)

    @classmethod
    def concat(cls, parts: list[BlockLinear]) -> BlockLinear:
        biases = [p.bias for p in parts]
        if any(b is None for b in biases) != all(b is None for b in biases):
            raise ValueError("BlockLinear parts must all have a bias or none")
        bias = None if biases[0] is None else nn.Parameter(torch.cat([b.data for b in biases]), requires_grad=False)
        return cls([w for p in parts for w in p.weights], [t for p in parts for t in p.types], bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = self.kernel.forward(x.reshape(-1, shape[-1]).contiguous())
        if self.bias is not None:
            out += self.bias
        return out.view(*shape[:-1], self.out_features)


class BlockEmbedding(nn.Module):
    """An embedding table kept in its blocks; a lookup decodes the rows asked for (fp32). Where the table is a
    file's tensor, the rows are read from the file (`os.pread`), not through its memory map: a page fault on the
    map maps in up to 64 KB around it (the kernel's fault-around, from pages the page cache holds), so the
    lookups of a few thousand distinct tokens kept 30-60 MB of a 1.5B model's 131 MB table resident."""

    def __init__(self, tensor: GGUFTensor):
        super().__init__()
        self.weight_bytes, self.type = block_bytes(tensor), BLOCK_TYPES[tensor.ggml_type]
        self.num_embeddings, self.embedding_dim = tensor.shape
        self._file = None if tensor.path is None else open(tensor.path, "rb", buffering=0)
        self._offset = None if tensor.path is None else tensor.file_offset

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).long()
        if self._file is None or flat.numel() == 0:
            rows = cpu_ops().block_rows(self.weight_bytes, self.type, flat, self.embedding_dim)
            return rows.view(*ids.shape, self.embedding_dim)
        unique, inverse = torch.unique(flat, return_inverse=True)
        if unique[0] < 0 or unique[-1] >= self.num_embeddings:
            raise IndexError(f"token ids must be in [0, {self.num_embeddings}), got {unique[[0, -1]].tolist()}")
        width, fd = self.weight_bytes.shape[1], self._file.fileno()
        stored = bytearray(b"".join(os.pread(fd, width, self._offset + i * width) for i in unique.tolist()))
        rows = cpu_ops().block_rows(torch.frombuffer(stored, dtype=torch.uint8).view(-1, width), self.type, inverse,
                                    self.embedding_dim)
        return rows.view(*ids.shape, self.embedding_dim)


class BlockLatentHeads(nn.Module):
    """DeepSeek's kv_b as the absorbed attention uses it, from a GGUF's split attn_k_b [heads, rank, nope] and
    attn_v_b [heads, v, rank] blocks (llama.cpp's converter splits kv_b so): each head's no-rope query into the
    latent space through its own W_UK, each head's attended latent out to values through its W_UV, with the
    compiled `block_heads` (all heads in one parallel pass). In place of a float kv_b read whole at every step
    (8 MB a layer for V2-Lite in fp32, 1.3 MB as Q5_0 + Q4_K)."""

    def __init__(self, k_b: GGUFTensor, v_b: GGUFTensor):
        super().__init__()
        self.k_b, self.k_type = _packed_heads(k_b)
        self.v_b, self.v_type = _packed_heads(v_b)

    @staticmethod
    def takes(k_b: GGUFTensor | None, v_b: GGUFTensor | None) -> bool:
        return all(t is not None and t.ggml_type in BLOCK_TYPES and len(t.shape) == 3 for t in (k_b, v_b)) and (
            cpu_ops() is not None)

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """[T, heads, nope] -> [T, heads, rank] (float32)"""
        return cpu_ops().block_heads(q_nope.float(), self.k_b, self.k_type)

    def expand_values(self, attended: torch.Tensor) -> torch.Tensor:
        """[T, heads, rank] -> [T, heads, v] (float32)"""
        return cpu_ops().block_heads(attended.float(), self.v_b, self.v_type)


def _packed_heads(tensor: GGUFTensor) -> tuple[torch.Tensor, int]:
    """A per-head stack of matrices (uint8 [heads, rows, bytes a row]) packed for the kernel, as `BlockLinear`
    packs one (each head's rows in groups of 8, so no group crosses a head), and its type."""
    raw, ggml_type = block_bytes(tensor), BLOCK_TYPES[tensor.ggml_type]
    heads, rows = raw.shape[:2]
    if rows % 8:
        return raw, ggml_type
    packed, type_id = cpu_ops().pack_rows(raw.reshape(heads * rows, -1), ggml_type, mapped=tensor.mapping is not None)
    return packed.view(heads, rows, -1), type_id
