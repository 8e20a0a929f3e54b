"""Weight-only quantized linears for CPU decode, built straight from a GGUF's blocks.

Single-stream decode reads every weight once per token, so its speed is the bytes read. `Int4Linear` keeps
llama.cpp's 4-bit blocks (Q4_0/Q4_1: 32 weights, a scale and a minimum) in the layout of PyTorch's
`_weight_int4pack_mm_for_cpu`, which computes (q - 8) * scale + zero per group of 32; both block types map onto
it without requantizing. The output projection keeps its Q8_0 blocks too (`Q8Linear`, a compiled fp32 kernel),
or is stored in fp16 (`HalfLinear`). The 4-bit and fp16 kernels take bf16 activations, which is only fast on
CPUs with AVX-512 bf16 (`whale.platform.cpu_weight_kernels` decides).

Those kernels read few bytes but redo their dequantisation for every row, so they lose to a bf16 GEMM once a
step carries more than a few rows (batched decode, prefill). `RowSwitchLinear` keeps both for one weight and
picks per call by the number of rows: the "hybrid" kernels (bench/kernels.py has the crossover figures).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from whale.kernels import cpu_ops
from whale.models.layers import in_prompt_step
from whale.platform import onednn_packs_bf16
from whale.weights.gguf import GGUFTensor, hf_tensor_name, unpermute_rope_rows

# Most rows each weight-only kernel takes before the packed bf16 GEMM is faster (bench/kernels.py on the Zen 4
# dev box, 30 layers of SmolLM2's shapes: int4 7.4 ms vs bf16 10.8 ms at 4 rows, 12.4 vs 11.4 at 6; the 49152x576
# lm_head: Q8_0 1.2 ms, fp16 1.6 ms, bf16 1.5 ms at 1 row; Q8_0 2.4, fp16 3.1, bf16 1.8 at 2 rows).
INT4_MAX_ROWS = 4
OUTPUT_MAX_ROWS = 1  # Q8Linear / HalfLinear: the output projection (and a mixed model's fp16 leftovers)

GROUP_SIZE = 32  # weights per Q4_0/Q4_1 block
# oneDNN keeps state per GEMM shape for the life of the process (~1 MiB each, never freed): with a row count per
# prompt length, a server's memory grew by ~500 MiB over 600 random-length requests. Row counts are rounded up
# to a power of two, then to a multiple of GEMM_ROW_STEP, so a few dozen shapes serve every length.
GEMM_ROW_STEP = 32
PACK_ROWS = 64  # the CPU packing interleaves rows in tiles of 64: only whole tiles can be concatenated
INT4_TYPES = ("Q4_0", "Q4_1")
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}  # fp16 scale (+ fp16 min for Q4_1) + 16 bytes of nibbles
_Q8_0_BLOCK_BYTES = 34  # fp16 scale + 32 int8 codes


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


class Q8Linear(nn.Module):
    """A linear over llama.cpp's Q8_0 blocks as stored (int8 codes, one scale per 32 weights), computed in fp32
    by the compiled kernel: a byte a weight for the vocabulary-sized output projection, which is often Q8_0 or
    tied to a Q8_0 embedding (1.2 ms vs 1.6 ms for its fp16 copy at one row, bench/kernels.py)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("codes", codes)  # [N, K] int8
        self.register_buffer("scales", scales)  # [N, K/32] fp32
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.out_features = codes.shape[0]

    @classmethod
    def from_gguf(cls, tensor: GGUFTensor, bias: torch.Tensor | None = None) -> Q8Linear:
        rows, cols = tensor.shape
        blocks = np.ascontiguousarray(tensor.raw).reshape(rows, cols // GROUP_SIZE, _Q8_0_BLOCK_BYTES)
        scales = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0]).float()
        codes = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(rows, cols)
        return cls(codes, scales, bias)

    def dequantized(self) -> torch.Tensor:
        return (self.codes.view(self.out_features, -1, GROUP_SIZE).float() * self.scales[..., None]).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = cpu_ops().q8_0_linear(x.reshape(-1, shape[-1]).float().contiguous(), self.codes, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).view(*shape[:-1], self.out_features)


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
    """Give every Int4Linear, HalfLinear and Q8Linear of a loaded (and fused) model a packed bf16 twin for calls
    with many rows (`gemm_twin_bytes` says what they cost)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Int4Linear):
            max_rows = INT4_MAX_ROWS
        elif isinstance(module, (HalfLinear, Q8Linear)):
            max_rows = OUTPUT_MAX_ROWS
        else:
            continue
        bias = None if module.bias is None else module.bias.detach()
        large = PackedBF16Linear(module.dequantized(), bias)
        _replace(model, name, RowSwitchLinear(module, large, max_rows))


def gemm_twin_bytes(model: nn.Module) -> int:
    """Bytes `add_gemm_kernels` would add: two per weight of every Int4Linear, HalfLinear and Q8Linear."""
    sizes = {Int4Linear: lambda m: m.out_features * m.packed.shape[1] * 2, HalfLinear: lambda m: m.weight.numel(),
             Q8Linear: lambda m: m.codes.numel()}
    return sum(2 * sizes[type(m)](m) for m in model.modules() if type(m) in sizes)


def quantize_gguf_linears(model: nn.Module, tensors: dict[str, GGUFTensor],
                          rope_heads: dict[str, int]) -> int:
    """Swap the loaded model's linears for weight-only kernels: every one the GGUF stores in 4-bit blocks becomes
    an Int4Linear of those very blocks; the output projection (read every token, often Q8_0 or tied to a Q8_0
    embedding) becomes a Q8Linear of its blocks where the compiled kernels are built, else fp16; in a model with
    4-bit linears, the linears stored otherwise (a mixed-type GGUF, rows the packing cannot tile) become fp16.
    `rope_heads`: module-name suffix -> heads whose rows llama.cpp permuted. Returns how many linears became
    Int4Linear."""
    sources = {hf_tensor_name(name): tensor for name, tensor in tensors.items()}
    if "lm_head.weight" not in sources and getattr(model.config, "tie_word_embeddings", False):
        sources["lm_head.weight"] = sources.get("model.embed_tokens.weight")
    swapped = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        tensor = sources.get(f"{name}.weight")
        bias = None if module.bias is None else module.bias.detach()
        if tensor is not None and tensor.ggml_type in INT4_TYPES and tensor.shape[0] % PACK_ROWS == 0:
            heads = next((h for suffix, h in rope_heads.items() if name.endswith(suffix)), None)
            replacement: nn.Module = Int4Linear.from_gguf(tensor, bias, heads)
            swapped += 1
        elif name == "lm_head" and tensor is not None and tensor.ggml_type == "Q8_0" and cpu_ops() is not None:
            replacement = Q8Linear.from_gguf(tensor, bias)
        elif name == "lm_head":
            replacement = HalfLinear(module.weight.detach(), bias)
        else:
            continue
        _replace(model, name, replacement)
    if swapped:  # linears left dense would receive the bf16 activations the 4-bit ones hand on: fp16 takes both
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear):
                bias = None if module.bias is None else module.bias.detach()
                _replace(model, name, HalfLinear(module.weight.detach(), bias))
    return swapped


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent), attribute, module)
