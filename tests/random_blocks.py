"""Random ggml blocks: random bytes (every code, scale and min bit pattern of the format) whose fp16 scales are
replaced by values of a chosen magnitude (random bytes would include NaN and infinities); and the rounding the
block kernels apply to their activations, for references that mirror it."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# byte offsets of each block's fp16 scales (d, and m / dmin where the format has one)
_SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2),
                  "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(ggml_type: str, rows: int, cols: int, seed: int = 0,
                  magnitude: tuple[float, ...] | None = None) -> np.ndarray:
    """uint8 [rows, bytes a row]. Each fp16 scale field is 0.5-2x its `magnitude` entry (d, then m / dmin), or
    (None) 10^-3 to 10^-1.5 varying per row; Q4_1/Q5_1 minimums are negative one time in five."""
    values, size = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, cols // values, size), dtype=np.uint8)
    for field, offset in enumerate(_SCALE_OFFSETS[ggml_type]):
        level = magnitude[field] if magnitude is not None else 10 ** rng.uniform(-3, -1.5, (rows, 1))
        scale = rng.uniform(0.5, 2.0, (rows, cols // values)) * level
        sign = np.where(rng.random((rows, cols // values)) < 0.2, -1, 1) if ggml_type in ("Q4_1", "Q5_1") else 1
        blocks[..., offset:offset + 2] = (scale * sign).astype(np.float16)[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def round_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as the block kernels compute with it: int8 codes, one fp32 scale (amax / 127) per `block` values along
    the last dimension (32, or 256 for the K-quants), rounded half to even; in x's dtype."""
    groups = x.float().unflatten(-1, (-1, block))
    amax = groups.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return ((groups * inverse).round() * (amax / 127)).flatten(-2).to(x.dtype)
