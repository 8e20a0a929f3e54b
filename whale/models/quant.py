"""Weight-only quantized linears for CPU decode, built straight from a GGUF's blocks.

Single-stream decode reads every weight once per token, so its speed is the bytes read. `Int4Linear` keeps
llama.cpp's 4-bit blocks (Q4_0/Q4_1: 32 weights, a scale and a minimum) in the layout of PyTorch's
`_weight_int4pack_mm_for_cpu`, which computes (q - 8) * scale + zero per group of 32; both block types map onto
it without requantizing. Weights in other block formats (a Q8_0 output projection, K-quants) run from their
blocks (`whale.models.gguf_blocks.BlockLinear`); the rest in fp16 (`HalfLinear`). The 4-bit and fp16 kernels
take bf16 activations, which is only fast on CPUs with AVX-512 bf16 (`whale.platform.cpu_weight_kernels`
decides).

Those kernels read few bytes but redo their dequantisation for every row, so they lose to a bf16 GEMM once a
step carries more than a few rows (batched decode, prefill). `RowSwitchLinear` keeps both for one weight and
picks per call by the number of rows: the "hybrid" kernels (bench/kernels.py has the crossover figures).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from whale.models.gguf_blocks import BlockEmbedding, BlockLatentHeads, BlockLinear, has_block_kernel
from whale.models.layers import in_prompt_step
from whale.platform import onednn_packs_bf16
from whale.weights.gguf import (
    GGUFCheckpoint,
    GGUFTensor,
    deepseek2_block_tensors,
    hf_tensor_name,
    unpermute_rope_rows,
)

# Most rows each weight-only kernel takes before the packed bf16 GEMM is faster (bench/kernels.py on the Zen 4
# dev box, 30 layers of SmolLM2's shapes: int4 7.4 ms vs bf16 10.8 ms at 4 rows, 12.4 vs 11.4 at 6; the 49152x576
# lm_head: fp16 1.6 ms, bf16 1.5 ms at 1 row; fp16 3.1, bf16 1.8 at 2 rows).
INT4_MAX_ROWS = 4
OUTPUT_MAX_ROWS = 1  # HalfLinear: an fp16 output projection (and a mixed model's fp16 leftovers)

GROUP_SIZE = 32  # weights per Q4_0/Q4_1 block
# oneDNN keeps state per GEMM shape for the life of the process (~1 MiB each, never freed): with a row count per
# prompt length, a server's memory grew by ~500 MiB over 600 random-length requests. Row counts are rounded up
# to a power of two, then to a multiple of GEMM_ROW_STEP, so a few dozen shapes serve every length.
GEMM_ROW_STEP = 32
PACK_ROWS = 64  # the CPU packing interleaves rows in tiles of 64: only whole tiles can be concatenated
INT4_TYPES = ("Q4_0", "Q4_1")
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}  # fp16 scale (+ fp16 min for Q4_1) + 16 bytes of nibbles


def decode_q4_blocks(tensor: GGUFTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int32 [N, K] in 0..15, scale fp32 [N, K/32], zero fp32 [N, K/32]) with
    weight = (code - 8) * scale + zero, exactly what the block stores."""
    rows, cols = tensor.shape
    blocks = np.ascontiguousarray(tensor.raw).reshape(rows, cols // GROUP_SIZE, _BLOCK_BYTES[tensor.ggml_type])
    scale = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0]).float()
    if tensor.ggml_type == "Q4_1":  # weight = code * d + m
        minimum = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0]).float()
        zero = minimum + 8 * scale
    else:  # Q4_0: weight = (code - 8) * d
        zero = torch.zeros_like(scale)
    nibbles = torch.from_numpy(blocks[..., -16:].copy())
    # a block's first 16 weights sit in the low nibbles, the next 16 in the high ones
    codes = torch.cat((nibbles & 0x0F, nibbles >> 4), dim=-1).reshape(rows, cols).to(torch.int32)
    return codes, scale, zero


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W in packed 4-bit groups of 32; activations run in bf16 and the output stays bf16
    (the next kernel reads it as it is: the fused norm and SwiGLU take bf16, attention casts once)."""

    def __init__(self, packed: torch.Tensor, scale_zero: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("packed", packed)  # [N, K/2] uint8, the kernel's layout
        self.register_buffer("scale_zero", scale_zero)  # [K/32, N, 2] bf16
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features = packed.shape[0]

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   bias: torch.Tensor | None = None) -> Int4Linear:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        scale_zero = torch.stack((scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()
        return cls(packed, scale_zero, bias)

    @classmethod
    def from_gguf(cls, tensor: GGUFTensor, bias: torch.Tensor | None = None,
                  rope_heads: int | None = None) -> Int4Linear:
        """`rope_heads`: undo llama.cpp's q/k row permutation for that many heads (whole rows move)."""
        codes, scale, zero = decode_q4_blocks(tensor)
        if rope_heads is not None:
            codes, scale, zero = (unpermute_rope_rows(t, rope_heads) for t in (codes, scale, zero))
        return cls.from_codes(codes, scale, zero, bias)

    @classmethod
    def concat(cls, parts: list[Int4Linear]) -> Int4Linear:
        """One linear computing all `parts` (rows stacked); packed tiles of PACK_ROWS rows concatenate as they are."""
        if any(p.out_features % PACK_ROWS for p in parts):
            raise ValueError(f"Int4Linear rows must be a multiple of {PACK_ROWS} to be fused")
        biases = [p.bias for p in parts]
        bias = None if biases[0] is None else torch.cat([b.data for b in biases])
        return cls(torch.cat([p.packed for p in parts]), torch.cat([p.scale_zero for p in parts], dim=1), bias)

    def dequantized(self) -> torch.Tensor:
        """The weight [N, K] as the kernel computes with it: the kernel applied to the identity."""
        identity = torch.eye(self.packed.shape[1] * 2, dtype=torch.bfloat16)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(identity, self.packed, GROUP_SIZE, self.scale_zero).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.packed,
                                                          GROUP_SIZE, self.scale_zero)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*shape[:-1], self.out_features)


class HalfLinear(nn.Module):
    """A linear whose weight is stored in fp16 (half the bytes of fp32); computes in fp16 and answers in the
    input's dtype, fp32 or bf16. Used for an output projection in neither 4-bit nor Q8_0 blocks, and for the
    linears of a 4-bit model that the int4 kernel cannot take; rounding a Q8_0 / K-quant weight to fp16 changes
    it by at most 2^-11 of its value, far below the block's own quantisation step."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight.to(torch.float16), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(torch.float16), requires_grad=False)

    @classmethod
    def concat(cls, parts: list[HalfLinear]) -> HalfLinear:
        bias = None if parts[0].bias is None else torch.cat([p.bias.data for p in parts])
        return cls(torch.cat([p.weight.data for p in parts]), bias)

    def dequantized(self) -> torch.Tensor:
        return self.weight.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.float16), self.weight, self.bias).to(x.dtype)


class PackedBF16Linear(nn.Module):
    """A bf16 linear whose weight oneDNN reorders once into its GEMM's blocked layout (`F.linear` on a plain
    bf16 weight reorders it on every call: ~1.7x slower at 16 rows). Computes in bf16 and answers in bf16, as
    Int4Linear does, so both sides of a RowSwitchLinear hand the same dtype on. Where oneDNN cannot pack bf16
    (AVX2-only CPUs, which `auto` never gives this kernel: bf16 is not in their hardware), the plain bf16 weight
    goes through `F.linear`: slow, but the same numbers, so an explicit `kernels="hybrid"` runs anywhere."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features = weight.shape[0]
        # an opaque oneDNN tensor: a plain attribute, not a buffer (state_dict and .to() cannot handle it)
        self.packed = self.weight = None
        if onednn_packs_bf16():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16))
        else:
            self.weight = weight.to(torch.bfloat16)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        count = rows.shape[0]
        padded = gemm_rows(count)
        if padded != count:
            rows = F.pad(rows, (0, 0, 0, padded - count))
        if self.packed is not None:
            out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, None, "none", [], "")[:count]
        else:
            out = F.linear(rows, self.weight)[:count]
        if self.bias is not None:
            out = out + self.bias
        return out.view(*shape[:-1], self.out_features)


def gemm_rows(count: int) -> int:
    """The row count a GEMM of `count` rows runs at (GEMM_ROW_STEP says why)."""
    if count <= GEMM_ROW_STEP:
        return 1 << (count - 1).bit_length()
    return -(-count // GEMM_ROW_STEP) * GEMM_ROW_STEP


class RowSwitchLinear(nn.Module):
    """One weight behind two kernels: `small` (weight-only, bound by bytes read) for calls of up to
    `max_small_rows` rows, `large` (packed bf16 GEMM, bound by compute) above."""

    def __init__(self, small: nn.Module, large: nn.Module, max_small_rows: int):
        super().__init__()
        self.small, self.large, self.max_small_rows = small, large, max_small_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        return self.small(x) if rows <= self.max_small_rows and not in_prompt_step() else self.large(x)


def add_gemm_kernels(model: nn.Module) -> None:
    """Give every Int4Linear and HalfLinear of a loaded (and fused) model a packed bf16 twin for calls with many
    rows (`gemm_twin_bytes` says what they cost); BlockLinears compute any number of rows themselves."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Int4Linear):
            max_rows = INT4_MAX_ROWS
        elif isinstance(module, HalfLinear):
            max_rows = OUTPUT_MAX_ROWS
        else:
            continue
        bias = None if module.bias is None else module.bias.detach()
        large = PackedBF16Linear(module.dequantized(), bias)
        _replace(model, name, RowSwitchLinear(module, large, max_rows))


def gemm_twin_bytes(model: nn.Module) -> int:
    """Bytes `add_gemm_kernels` would add: two per weight of every Int4Linear and HalfLinear."""
    sizes = {Int4Linear: lambda m: m.out_features * m.packed.shape[1] * 2, HalfLinear: lambda m: m.weight.numel()}
    return sum(2 * sizes[type(m)](m) for m in model.modules() if type(m) in sizes)


def quantize_gguf_linears(model: nn.Module, sources: dict[str, GGUFTensor], rope_heads: dict[str, int],
                          kernels: str) -> set[str]:
    """Before loading (the model still on the meta device), give each linear a kernel over its GGUF blocks:
    `kernels` "int4"/"hybrid": Int4Linear for Q4_0/Q4_1 weights; every other block type with a compiled kernel
    (and every 4-bit one under "blocks") a BlockLinear of the file's bytes, the embedding table a BlockEmbedding.
    Under int4/hybrid, linears in no block format become fp16 (HalfLinear: they receive the bf16 activations the
    4-bit kernels hand on); under "blocks" they stay in the compute dtype. `rope_heads`: module-name suffix ->
    heads whose rows llama.cpp permuted. `sources`: the GGUF's tensors by HF name (`gguf_block_sources`).
    Returns the HF names of the tensors the kernels took, which the loader then neither reads nor expands."""
    sources = dict(sources)
    tied = getattr(model.config, "tie_word_embeddings", False)
    if "lm_head.weight" not in sources and tied:
        sources["lm_head.weight"] = sources.get("model.embed_tokens.weight")
    taken: set[str] = set()
    embedding = sources.get("model.embed_tokens.weight")
    if has_block_kernel(embedding):
        model.model.embed_tokens = BlockEmbedding(embedding)
        taken.add("model.embed_tokens.weight")
    for name, module in list(model.named_modules()):  # DeepSeek's kv_b, split per head by llama.cpp
        k_b, v_b = sources.get(f"{name}.kv_b_proj.k_b"), sources.get(f"{name}.kv_b_proj.v_b")
        if isinstance(getattr(module, "kv_b_proj", None), nn.Linear) and BlockLatentHeads.takes(k_b, v_b):
            module.kv_b_proj = BlockLatentHeads(k_b, v_b)
            taken.add(f"{name}.kv_b_proj.weight")
    leftovers = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        tensor = sources.get(f"{name}.weight")
        heads = next((h for suffix, h in rope_heads.items() if name.endswith(suffix)), None)
        if (kernels != "blocks" and tensor is not None and tensor.ggml_type in INT4_TYPES
                and tensor.shape[0] % PACK_ROWS == 0):
            replacement: nn.Module = Int4Linear.from_gguf(tensor, module.bias, heads)
        elif has_block_kernel(tensor):
            replacement = BlockLinear.from_gguf(tensor, module.bias, heads)
        else:
            leftovers.append(name)
            continue
        _replace(model, name, replacement)
        taken.add(f"{name}.weight")
    if not any(isinstance(m, Int4Linear) for m in model.modules()):
        return taken  # nothing hands bf16 on: the rest load as they are, in the compute dtype
    for name in leftovers:  # the 4-bit kernels hand bf16 on, which fp16 takes
        tensor, bias = sources.get(f"{name}.weight"), sources.get(f"{name}.bias")
        if tensor is None:
            continue  # the loader reports it missing
        weight = tensor.dequantize()
        heads = next((h for suffix, h in rope_heads.items() if name.endswith(suffix)), None)
        if heads is not None:
            weight = unpermute_rope_rows(weight, heads)
        _replace(model, name, HalfLinear(weight, None if bias is None else bias.dequantize()))
        taken.update({f"{name}.weight", f"{name}.bias"})
    return taken


def gguf_block_sources(checkpoint: GGUFCheckpoint) -> dict[str, GGUFTensor]:
    """A GGUF's tensors by the HF name of the parameter each one becomes (deepseek2: each expert's slice of the
    stacked experts; kv_b stays out, the attention reads it as floats)."""
    if checkpoint.architecture == "deepseek2":
        return deepseek2_block_tensors(checkpoint.tensors)
    return {hf_tensor_name(name): tensor for name, tensor in checkpoint.tensors.items()}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent), attribute, module)
