"""Block-scaled low-precision checkpoints, dequantised exactly at load.

DeepSeek V3/R1/V3.1/V3.2: e4m3 weights with a float32 `<name>_scale_inv` per block of `weight_block_size`
(128 x 128): W[i, j] = fp8[i, j] * scale_inv[i // 128, j // 128]. Edge blocks are partial when a dimension is
not a multiple of the block size; the scale grid is ceil(rows / 128) x ceil(cols / 128) and the expansion is
cropped to the weight's shape.

DeepSeek-V4: the scale is `<module>.scale`, a power of two (e8m0: float8_e8m0fnu, or a byte b meaning
2^(b - 127)); dense linears are e4m3 in 128 x 128 blocks, routed experts FP4 (e2m1, two per int8 byte, the low
nibble first) with a scale per 32 values of a row. The block is read off the scale grid.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from whale.errors import ModelLoadError

SCALE_SUFFIXES = ("_scale_inv", ".scale")  # weight name + suffix (V3), module name + suffix (V4)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [rows, cols / 2] of two e2m1 codes a byte (low nibble: even column) -> float32 [rows, cols]."""
    codes = packed.contiguous().view(torch.uint8)
    table = torch.tensor(E2M1_VALUES)
    pairs = torch.stack((table[(codes & 0xF).long()], table[(codes >> 4).long()]), dim=-1)
    return pairs.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def _scales(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype == torch.uint8:  # e8m0 exponents stored as bytes
        return torch.exp2(scale.float() - 127.0)
    return scale.float()


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 [rows, cols] (or packed FP4, int8 [rows, cols / 2]) x scales -> `dtype` [rows, cols]. The scale grid
    is ceil(rows / b0) x ceil(cols / b1) for `block`, or divides the weight evenly into blocks of its own size."""
    values = unpack_fp4(weight) if weight.dtype == torch.int8 else weight.float()
    rows, cols = values.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_inv.shape) != grid:
        if scale_inv.dim() != 2 or rows % scale_inv.shape[0] or cols % scale_inv.shape[1]:
            raise ModelLoadError(f"scale grid {tuple(scale_inv.shape)} does not fit a {rows}x{cols} weight in "
                                 f"{block[0]}x{block[1]} blocks (expected {grid}) nor divide it evenly")
        block = (rows // scale_inv.shape[0], cols // scale_inv.shape[1])
    scales = _scales(scale_inv).repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (values * scales).to(dtype)


def weight_block_size(model_dir: Path) -> tuple[int, int]:
    """quantization_config.weight_block_size from config.json; 128 x 128 when absent."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return (128, 128)
    block = (config.get("quantization_config") or {}).get("weight_block_size") or (128, 128)
    return (int(block[0]), int(block[1]))


def _weight_name(scale_name: str) -> str | None:
    if scale_name.endswith("_scale_inv"):
        return scale_name[:-len("_scale_inv")]
    if scale_name.endswith(".scale"):
        return scale_name[:-len(".scale")] + ".weight"
    return None


def dequantize_stream(tensors: Iterator[tuple[str, torch.Tensor]],
                      block: tuple[int, int] = (128, 128)) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass tensors through, replacing each FP8 / FP4 weight and its scale by the dequantised fp32 weight. A
    weight or scale waits only until its partner arrives (in DeepSeek's shards they sit side by side)."""
    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        target = _weight_name(name)
        if target is not None:
            if target in weights:
                yield target, dequantize_blocks(weights.pop(target), tensor, block)
            else:
                scales[target] = tensor
        elif tensor.dtype in FP8_DTYPES or (tensor.dtype == torch.int8 and name.endswith(".weight")):
            if name in scales:
                yield name, dequantize_blocks(tensor, scales.pop(name), block)
            else:
                weights[name] = tensor
        else:
            yield name, tensor
    if weights or scales:
        unpaired = sorted(weights) + [f"the scale of {n}" for n in scales]
        raise ModelLoadError(f"FP8 / FP4 weights without their scale (or the reverse): {unpaired[:3]}")
