"""The matmul and row lookup straight from ggml's quantized blocks (whale/kernels/ggml_blocks.cpp), against the
`gguf` package's own dequantisation in float64.

The blocks are random bytes (with sane fp16 scales), so every code, scale and min bit pattern of each format
occurs. The row lookup must reproduce the dequantised values exactly. The matmul quantizes the activations to
int8 (a scale per 32 values, per 256 for the K-quants), so it may differ from the exact product by what that
rounding moves: each activation by at most half its block's step, i.e. |error| <= sum_j |w_j| * step_j / 2,
computed here per output in float64 (plus a float32 accumulation allowance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from random_blocks import random_blocks, round_activations

from whale.kernels import cpu_ops

pytestmark = pytest.mark.skipif(cpu_ops() is None, reason="the compiled CPU kernels are not built here")

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
# every matmul test runs on the blocks as stored and in the layout `pack_rows` gives them (8 rows interleaved)
LAYOUTS = [(t, layout) for layout in ("stored", "packed") for t in TYPES]


def weight_for(blocks: np.ndarray, ggml_type: str, layout: str) -> tuple[torch.Tensor, int]:
    """The blocks and their type code as block_linear takes them: as stored, or packed by `pack_rows`."""
    stored, code = torch.from_numpy(blocks), GGMLQuantizationType[ggml_type].value
    if layout == "stored":
        return stored, code
    packed, packed_code = cpu_ops().pack_rows(stored, code)
    assert packed_code != code and packed.shape[0] == stored.shape[0] and packed.shape[1] >= stored.shape[1]
    return packed, packed_code


def reference_weight(blocks: np.ndarray, ggml_type: str, cols: int) -> np.ndarray:
    return dequantize(blocks, GGMLQuantizationType[ggml_type]).reshape(blocks.shape[0], cols).astype(np.float64)


def rounding_bound(x: torch.Tensor, weight: np.ndarray, block: int) -> np.ndarray:
    """Per output: sum_j |w_j| * step_j / 2, step = the activation block's amax / 127."""
    x64 = x.double().numpy()
    steps = np.abs(x64).reshape(x64.shape[0], -1, block).max(-1) / 127
    per_value = np.repeat(steps, block, axis=1) / 2
    return per_value @ np.abs(weight).T


@pytest.mark.parametrize("ggml_type", TYPES)
def test_block_rows_are_the_dequantized_values(ggml_type):
    cols = 512
    blocks = random_blocks(ggml_type, 40, cols)
    ids = torch.tensor([0, 39, 7, 7, 20])
    rows = cpu_ops().block_rows(torch.from_numpy(blocks), GGMLQuantizationType[ggml_type].value, ids, cols)
    expected = reference_weight(blocks, ggml_type, cols)[ids.numpy()]
    assert np.array_equal(rows.numpy(), expected.astype(np.float32))


@pytest.mark.parametrize(("ggml_type", "layout"), LAYOUTS)
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_block_linear_is_the_exact_product_up_to_the_activations_rounding(ggml_type, layout, rows):
    cols, out = 768, 72  # 72 output columns: two threads split a packed group of 8 between them
    blocks = random_blocks(ggml_type, out, cols, seed=rows)
    weight = reference_weight(blocks, ggml_type, cols)
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, cols, generator=generator) * torch.rand(rows, 1, generator=generator) * 4
    x[:, 5] *= 30  # an outlier channel, as real activations have
    got = cpu_ops().block_linear(x, *map(list, zip(weight_for(blocks, ggml_type, layout), strict=True)))
    exact = x.double().numpy() @ weight.T
    block = 256 if ggml_type.endswith("_K") else 32
    allowance = rounding_bound(x, weight, block) + 1e-5 * (np.abs(x.double().numpy()) @ np.abs(weight).T)
    error = np.abs(got.double().numpy() - exact)
    worst = error.argmax()
    assert (error <= allowance).all(), f"worst error {error.flat[worst]:.3g}, allowed {allowance.flat[worst]:.3g}"
    # and the rounding is real but small: the kernel is not the float product by accident nor far from it
    assert np.median(error / allowance) < 0.5


@pytest.mark.parametrize(("ggml_type", "layout"), LAYOUTS)
def test_block_linear_is_exact_on_the_rounded_activations(ggml_type, layout):
    """The rounding above is all there is: with the activations rounded as the kernel rounds them, the product
    is exact up to float32 accumulation (the integer dot products are exact)."""
    cols, out = 512, 64
    blocks = random_blocks(ggml_type, out, cols, seed=1)
    weight = reference_weight(blocks, ggml_type, cols)
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(3))
    got = cpu_ops().block_linear(x, *map(list, zip(weight_for(blocks, ggml_type, layout), strict=True)))
    rounded = round_activations(x, 256 if ggml_type.endswith("_K") else 32).double().numpy()
    scale = np.abs(x.double().numpy()) @ np.abs(weight).T
    assert (np.abs(got.double().numpy() - rounded @ weight.T) / scale).max() < 1e-6


@pytest.mark.parametrize("parts", [[("Q4_K", 64, "stored"), ("Q6_K", 32, "stored"), ("Q4_K", 32, "stored")],
                                   [("Q4_0", 40, "packed"), ("Q4_0", 4, "stored"), ("Q4_0", 24, "packed")]])
def test_block_linear_takes_bf16_activations_and_stacked_parts_of_different_types(parts):
    """A Q4_K_M file's q, v, k projections fused; packed parts beside one that is not (at an odd column)."""
    cols = 512
    weights = [weight_for(random_blocks(t, n, cols, seed=i), t, layout) for i, (t, n, layout) in enumerate(parts)]
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    fused = cpu_ops().block_linear(x, [w for w, _ in weights], [t for _, t in weights])
    separate = [cpu_ops().block_linear(x, [w], [t]) for w, t in weights]
    assert fused.dtype == torch.float32 and fused.shape == (5, sum(n for _, n, _ in parts))
    assert torch.equal(fused, torch.cat(separate, dim=1))


@pytest.mark.parametrize(("ggml_type", "layout"), LAYOUTS)
def test_block_linear_rows_are_independent_of_the_batch(ggml_type, layout):
    """A row's result does not depend on the rows computed with it (greedy replies alone and batched agree).
    30 rows of 8192 take the many-row path over two passes of the activations (24 rows a pass: 192 KiB of codes),
    tiles of 4 and single rows; 47 weight rows as stored (pairs of them and one alone), 48 packed."""
    cols = 8192
    blocks, code = weight_for(random_blocks(ggml_type, 47 if layout == "stored" else 48, cols), ggml_type, layout)
    x = torch.randn(30, cols, generator=torch.Generator().manual_seed(2))
    batch = cpu_ops().block_linear(x, [blocks], [code])
    for row in range(30):
        assert torch.equal(cpu_ops().block_linear(x[row:row + 1], [blocks], [code])[0], batch[row])


@pytest.mark.parametrize("layout", ["stored", "packed"])
@pytest.mark.parametrize("ggml_type", ["Q5_0", "Q4_K"])  # V2-Lite Q4_K_M's attn_k_b and attn_v_b
def test_block_heads_multiplies_each_head_by_its_own_matrix(ggml_type, layout):
    """DeepSeek's absorbed attention: head h of x through matrix h only, exact on the rounded activations."""
    heads, rows, cols = 3, 40, 256
    blocks = [random_blocks(ggml_type, rows, cols, seed=h) for h in range(heads)]
    per_head = [weight_for(b, ggml_type, layout) for b in blocks]
    x = torch.randn(2, heads, cols, generator=torch.Generator().manual_seed(5))
    got = cpu_ops().block_heads(x, torch.stack([w for w, _ in per_head]), per_head[0][1])
    assert got.shape == (2, heads, rows)
    block = 256 if ggml_type.endswith("_K") else 32
    for h in range(heads):
        weight = reference_weight(blocks[h], ggml_type, cols)
        exact = round_activations(x[:, h], block).double().numpy() @ weight.T
        scale = np.abs(x[:, h].double().numpy()) @ np.abs(weight).T
        assert (np.abs(got[:, h].double().numpy() - exact) / scale).max() < 1e-6


def test_block_linear_refuses_rows_that_do_not_hold_the_blocks():
    blocks = torch.from_numpy(random_blocks("Q4_K", 8, 512))
    with pytest.raises(RuntimeError, match="bytes"):
        cpu_ops().block_linear(torch.randn(1, 256), [blocks], [12])
    with pytest.raises(RuntimeError, match="no kernel"):
        cpu_ops().block_linear(torch.randn(1, 512), [blocks], [10])  # Q2_K


@pytest.mark.parametrize(("ggml_type", "rows"), [("Q4_0", 44), ("Q5_1", 12)])
def test_pack_rows_leaves_what_it_has_no_layout_for(ggml_type, rows):
    """Rows not in whole groups of 8 come back as they are."""
    blocks, code = torch.from_numpy(random_blocks(ggml_type, rows, 256)), GGMLQuantizationType[ggml_type].value
    packed, packed_code = cpu_ops().pack_rows(blocks, code)
    assert packed_code == code and torch.equal(packed, blocks)
    with pytest.raises(RuntimeError, match="packed"):
        cpu_ops().block_rows(cpu_ops().pack_rows(torch.from_numpy(random_blocks("Q4_0", 8, 256)), 2)[0], 258,
                             torch.tensor([0]), 256)
