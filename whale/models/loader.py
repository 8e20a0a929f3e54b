"""Load a resolved model: config, tokenizer and weights (safetensors or GGUF) into one of our modules."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from whale.config import ModelConfig, gguf_to_hf_config, load_hf_config, parse_hf_config
from whale.errors import ModelLoadError
from whale.generation_defaults import gguf_generation_config
from whale.hub import DEFAULT_GENERATION_CONFIG, DEFAULT_GENERATION_SOURCE, DEFAULT_MODEL, ModelFiles, resolve_model
from whale.models import build_model
from whale.models.quant import (
    Int4Linear,
    add_gemm_kernels,
    gemm_twin_bytes,
    gguf_block_sources,
    quantize_gguf_linears,
)
from whale.platform import cpu_weight_kernels, physical_memory_bytes, resolve_device, resolve_dtype
from whale.tokenizer import Tokenizer
from whale.weights import fp8
from whale.weights import safetensors as st
from whale.weights.gguf import GGUFCheckpoint, deepseek2_hf_tensors, hf_tensor_name, unpermute_rope_rows

HYBRID_MEMORY_SHARE = 0.25  # most of the machine's memory the hybrid kernels' bf16 twins may take


@dataclass
class LoadedModel:
    files: ModelFiles
    config: ModelConfig
    tokenizer: Tokenizer
    model: nn.Module | None  # None: loaded without weights (load_model(weights=False))
    dtype: torch.dtype
    device: torch.device
    # "int4" / "hybrid": linears run weight-only 4-bit kernels (whale.models.quant); "blocks": straight from the
    # GGUF's blocks (whale.models.gguf_blocks); "none": no weights
    kernels: str = "dense"
    generation_config: dict[str, Any] = field(default_factory=dict)  # generation_config.json fields
    generation_config_source: str = ""  # the file (or card) they came from


def _progress(total: int, description: str) -> tqdm:
    return tqdm(total=total, desc=description, unit="tensor", disable=not sys.stderr.isatty(), leave=False)


def _gguf_tensors(checkpoint: GGUFCheckpoint, config: ModelConfig,
                  taken: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float tensor) of every GGUF tensor but those `taken` by block kernels, which stay unread."""
    # llama.cpp permutes Llama's q/k rows into interleaved rotary pairs; our attention wants halves.
    permuted = {"self_attn.q_proj.weight": config.num_attention_heads,
                "self_attn.k_proj.weight": config.num_key_value_heads}
    if checkpoint.architecture == "deepseek2":
        yield from deepseek2_hf_tensors(checkpoint.tensors, taken)
        return
    for gguf_name, tensor in checkpoint.tensors.items():
        name = hf_tensor_name(gguf_name)
        if name is None or name in taken:
            continue
        weight = tensor.dequantize()
        suffix = name.split(".", 3)[-1]
        if config.architecture == "llama" and suffix in permuted:
            weight = unpermute_rope_rows(weight, permuted[suffix])
        yield name, weight


def _materialize(model: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], total: int,
                 dtype: torch.dtype, device: torch.device, source: Path) -> None:
    expected = {name: p for name, p in model.named_parameters() if p.is_meta}  # not what kernels already hold
    fp32_suffixes = tuple(getattr(model, "fp32_parameter_suffixes", ()))
    rename = getattr(model, "checkpoint_name", lambda name: name)  # names that differ between a family's writers
    state: dict[str, torch.Tensor] = {}
    with _progress(total, f"loading {source.name}") as bar:
        for name, tensor in tensors:
            bar.update(1)
            name = rename(name)
            if name not in expected:
                continue  # e.g. rotary inv_freq buffers some checkpoints carry
            if tensor.shape != expected[name].shape:
                raise ModelLoadError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                                     f"the config implies {tuple(expected[name].shape)}")
            keep_fp32 = name.endswith(fp32_suffixes)  # e.g. MoE routers, which must choose in fp32
            target = expected[name].dtype if not expected[name].is_floating_point() else (
                torch.float32 if keep_fp32 else dtype)  # integer tables (V4's tid2eid) stay integers
            state[name] = tensor.to(device=device, dtype=target)
    if getattr(model.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    if missing and hasattr(model, "drop_unloaded"):  # optional parts (MTP layers) the checkpoint lacks
        missing = model.drop_unloaded(missing)
    if missing:
        raise ModelLoadError(f"{source}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()


def _kernels_in(model: nn.Module, requested: str) -> str:
    """What the quantized linears run: the requested int4/hybrid where some took the 4-bit kernel, else blocks."""
    return requested if any(isinstance(m, Int4Linear) for m in model.modules()) else "blocks"


def load_model(reference: str, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None, kernels: str | None = "auto",
               weights: bool = True) -> LoadedModel:
    """Resolve `reference` and load it, computing in `dtype` (auto: fp32 on CPU, bf16 on CUDA). `kernels`
    (auto, dense, int4, hybrid, blocks) picks the linears' kernels; see `whale.platform.cpu_weight_kernels`.
    Without `weights`: the config, tokenizer and sampling defaults only (`model` is None), for a server whose
    engine runs elsewhere."""
    files = resolve_model(reference, weights=weights)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    taken: set[str] = set()
    params = 0
    if files.format == "gguf":
        checkpoint = GGUFCheckpoint(files.path)
        params = sum(math.prod(tensor.shape) for tensor in checkpoint.tensors.values())
        config = parse_hf_config(gguf_to_hf_config(checkpoint.metadata))
        config = dataclasses.replace(config, tie_word_embeddings="output.weight" not in checkpoint.tensors)
        tokenizer = Tokenizer.from_gguf_metadata(checkpoint.metadata)
        generation_config, generation_source = gguf_generation_config(checkpoint.metadata), "the GGUF's metadata"
        if not generation_config and reference == DEFAULT_MODEL:
            generation_config, generation_source = DEFAULT_GENERATION_CONFIG, DEFAULT_GENERATION_SOURCE
    else:
        config = load_hf_config(files.path)
        tokenizer = Tokenizer.from_hf_dir(files.path)
        generation_source = "generation_config.json"
        path = files.path / generation_source
        generation_config = json.loads(path.read_text()) if path.is_file() else {}
    kernels = cpu_weight_kernels(kernels, dtype, device, params)
    if not weights:
        return LoadedModel(files, config, tokenizer, None, torch_dtype, device, "none", generation_config,
                           generation_source)
    if files.format == "hf":
        tensors, total = st.iter_tensors(files.path), st.count_tensors(files.path)
        tensors = fp8.dequantize_stream(tensors, fp8.weight_block_size(files.path))
    model = build_model(config)
    if kernels != "dense" and files.format == "gguf":  # the kernels take their tensors' blocks, nothing expanded
        rope_heads = {"self_attn.q_proj": config.num_attention_heads,
                      "self_attn.k_proj": config.num_key_value_heads} if config.architecture == "llama" else {}
        if checkpoint.architecture == "deepseek2":
            kernels = "blocks"  # the int4 repacking serves the dense layers' shapes only
        sources = gguf_block_sources(checkpoint)
        taken = quantize_gguf_linears(model, sources, rope_heads, kernels)
        kernels = _kernels_in(model, kernels) if taken else "dense"
    else:
        kernels = "dense"  # only GGUF blocks are taken as they are; nothing else is requantized
    if files.format == "gguf":
        tensors, total = _gguf_tensors(checkpoint, config, taken), len(checkpoint.tensors) - len(taken)
    _materialize(model, tensors, total, torch_dtype, device, files.path)
    if files.format == "gguf" and "rope_freqs.weight" in checkpoint.tensors:
        # llama.cpp stores Llama-3.1's frequency scaling as per-frequency divisors instead of config fields
        model.rotary.inv_freq /= checkpoint.tensors["rope_freqs.weight"].dequantize()
    model.to(device).eval()  # buffers such as rotary frequencies
    if hasattr(model, "fuse_projections"):
        model.fuse_projections()
    if kernels == "hybrid":
        if gemm_twin_bytes(model) <= physical_memory_bytes() * HYBRID_MEMORY_SHARE:
            add_gemm_kernels(model)
        else:  # a bf16 twin of every weight would crowd out the KV cache: 4-bit kernels at every batch size
            kernels = "int4"
    return LoadedModel(files, config, tokenizer, model, torch_dtype, device, kernels, generation_config,
                       generation_source)
