"""The linear kernels whale chooses between on CPU, timed at the default model's shapes for 1 to 32 rows: where
the 4-bit weight-only kernel stops beating the packed bf16 GEMM (`quant.INT4_MAX_ROWS`), how the kernels over
the GGUF's own blocks compare (Q4_1 layers, the Q8_0 output projection), and which output projection kernel wins
at each row count (`quant.OUTPUT_MAX_ROWS`). Fresh random weights, 30 layers' worth so
they do not stay in cache; best of several runs.

    .venv/bin/python bench/kernels.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from whale.models import quant
from whale.models.gguf_blocks import BLOCK_TYPES, BlockLinear

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # SmolLM2-135M: fused qkv, o, gate_up, down
LAYERS = 30
VOCAB, HIDDEN = 49152, 576
ROWS = (1, 2, 4, 6, 8, 16, 32)


def best_ms(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def random_int4(rows: int, cols: int) -> quant.Int4Linear:
    codes = torch.randint(0, 16, (rows, cols), dtype=torch.int32)
    scale = torch.rand(rows, cols // quant.GROUP_SIZE) * 0.01
    return quant.Int4Linear.from_codes(codes, scale, torch.zeros_like(scale))


def random_blocks(rows: int, cols: int, ggml_type: str) -> BlockLinear:
    """Random codes in Q4_1 (d, m, 16 bytes of nibbles) or Q8_0 (d, 32 int8) blocks with small fp16 scales."""
    size, scales = {"Q4_1": (20, 2), "Q8_0": (34, 1)}[ggml_type]
    blocks = np.random.default_rng(rows + cols).integers(0, 256, (rows, cols // 32, size), dtype=np.uint8)
    blocks[..., :2 * scales] = np.full((rows, cols // 32, scales), 0.01, np.float16).view(np.uint8)
    return BlockLinear([torch.from_numpy(blocks.reshape(rows, -1))], [BLOCK_TYPES[ggml_type]], None)


def time_layers(kernels, shapes, inputs: dict[int, torch.Tensor]) -> float:
    return best_ms(lambda: [kernel(inputs[k]) for kernel, (_, k) in zip(kernels, shapes, strict=True)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [shape for _ in range(LAYERS) for shape in LAYER_SHAPES]
    int4 = [random_int4(n, k) for n, k in shapes]
    packed = [quant.PackedBF16Linear(m.dequantized(), None) for m in int4]
    dense = [m.dequantized().float() for m in int4]
    blocks = [random_blocks(n, k, "Q4_1") for n, k in shapes]
    q8 = random_blocks(VOCAB, HIDDEN, "Q8_0")
    head = torch.randn(VOCAB, HIDDEN) * 0.02
    half, head_bf16 = quant.HalfLinear(head, None), quant.PackedBF16Linear(head, None)
    print(f"\n{args.threads} threads; layers: {LAYERS} x (qkv, o, gate_up, down) of SmolLM2-135M, ms per pass; "
          f"output projection {VOCAB}x{HIDDEN}, ms")
    print("| rows | layers int4 | layers Q4_1 blocks | layers packed bf16 | layers fp32 | head Q8_0 blocks | head fp16 "
          "| head packed bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for rows in ROWS:
        inputs = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k in {k for _, k in LAYER_SHAPES}}
        figures = [time_layers(int4, shapes, inputs), time_layers(blocks, shapes, inputs),
                   time_layers(packed, shapes, inputs),
                   time_layers([partial(F.linear, weight=w) for w in dense], shapes,
                               {k: v.float() for k, v in inputs.items()})]
        head_x = torch.randn(rows, HIDDEN)
        figures += [best_ms(partial(kernel, head_x)) for kernel in (q8, half, head_bf16)]
        print(f"| {rows} | " + " | ".join(f"{f:.2f}" for f in figures) + " |")

if __name__ == "__main__":
    main()
