"""Where and in what precision to compute, chosen at run time from the machine."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from whale.errors import InvalidRequestError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


WEIGHT_KERNELS = ("dense", "int4", "hybrid", "blocks")
# `auto` takes hybrid only for models up to this many parameters: beyond, its int4 repack and bf16 GEMM twins cost
# more than they give (R1-Distill-Qwen-1.5B Q4_0 on an AVX-512-bf16 EPYC: 79 s to load and 5.1 GiB resident for a
# 0.99 GiB file, decode 0.78x llama.cpp; from its blocks: ~1 s and ~1.5x the file)
HYBRID_MAX_PARAMS = 600_000_000
# bf16 dot products in hardware: where the int4 weight-only kernel (bf16 activations) beats fp32 at batch 1
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_weight_kernels(requested: str | None, dtype: str | torch.dtype | None, device: torch.device,
                       params: int = 0) -> str:
    """Which linear kernels a CPU model runs: "blocks" (straight from a GGUF's quantized blocks, every llama.cpp
    block type from Q4_0 to Q6_K, int8 activations: whale.models.gguf_blocks), "int4" (Q4_0/Q4_1 blocks repacked
    for ATen's 4-bit kernel, bf16 activations; other block types as "blocks"), "hybrid" (int4 for calls of a few
    rows, a packed bf16 GEMM for more: batches, prefill) or "dense" (the compute dtype). `auto`, when the dtype
    was left to us: hybrid where the CPU does bf16 in hardware and the model has at most HYBRID_MAX_PARAMS
    `params`, else blocks (on an AVX2-only EPYC the default
    model decodes at ~54 tok/s from its blocks, ~50 through int4, 11 in fp32; bf16 GEMM twins would be hundreds
    of times slower there). A checkpoint without GGUF blocks runs dense whatever is picked here (the loader
    requantizes nothing)."""
    if requested not in (None, "auto", *WEIGHT_KERNELS):
        raise InvalidRequestError(f"weight kernels {requested!r} are not one of: auto, {', '.join(WEIGHT_KERNELS)}")
    if requested not in (None, "auto"):
        return requested
    if device.type != "cpu" or dtype not in (None, "auto"):
        return "dense"
    return "hybrid" if cpu_has_bf16() and params <= HYBRID_MAX_PARAMS else "blocks"


def cpu_has_bf16() -> bool:
    """bf16 dot products in hardware (AVX-512 bf16 or AMX): without them a bf16 GEMM is hundreds of times
    slower than fp32."""
    return bool(cpu_flags() & _BF16_FLAGS)


@functools.cache
def onednn_packs_bf16() -> bool:
    """Whether oneDNN can pack a bf16 weight for its GEMM on this CPU (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT;
    asked of oneDNN itself, once)."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16))
    except RuntimeError:
        return False
    return True


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on (None: CUDA where torch has it, else the CPU), refusing one this torch cannot use
    with what to do instead."""
    if device is None:
        return default_device()
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise InvalidRequestError(f"unknown device {str(device)!r}: use cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise InvalidRequestError(
            f"device {str(device)!r}: this torch ({torch.__version__}, {build}) sees no CUDA GPU; run on "
            "--device cpu, or install a CUDA build (e.g. TORCH_SPEC=\"torch==2.13.0 --index-url "
            "https://download.pytorch.org/whl/cu128\" make install)")
    if chosen.type not in ("cpu", "cuda"):
        raise InvalidRequestError(f"device {str(device)!r} is not supported: use cpu, cuda or cuda:N")
    return chosen


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto`/None: bf16 on CUDA, fp32 on CPU (bf16 matmul is hundreds of times slower on AVX2-only CPUs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InvalidRequestError(f"dtype {dtype!r} is not one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
