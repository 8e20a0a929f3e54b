"""Read GGUF files (llama.cpp's format): the header parsed here, the block formats decoded by the `gguf` package.

Tensors stay quantized (`GGUFTensor` keeps the raw blocks and the ggml type) until a model asks for them, so a
quantized kernel can consume the blocks directly; `dequantize()` gives a float tensor in PyTorch's row-major
layout. Names are mapped to the Hugging Face names our models use.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType

from whale.errors import ModelLoadError, UnsupportedModelError

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14; Python names it from 3.13

SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
                   "Q5_K", "Q6_K", "Q8_K"}

# GGUF tensor name (after blk.N.) -> HF name (after model.layers.N.)
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as stored: ggml quantisation type, PyTorch-order shape, raw block bytes (memory-mapped)."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    raw: np.ndarray
    mapping: mmap.mmap | None = field(default=None, repr=False, compare=False)  # the file's map `raw` is a view of
    path: Path | None = field(default=None, repr=False, compare=False)  # the file, where `raw` is a tensor whole

    @property
    def file_offset(self) -> int:
        """Where `raw` starts in the mapped file."""
        return self.raw.ctypes.data - np.frombuffer(self.mapping, np.uint8).ctypes.data

    def populate(self) -> None:
        """Map the bytes into memory now (Linux 5.14+: MADV_POPULATE_READ; elsewhere a read-ahead request), for a
        kernel that computes from the mapping: otherwise each page faults in on its first use, and a MoE model,
        whose tokens reach new experts for hundreds of steps, decodes at a fraction of its speed until every
        expert has been read once."""
        if self.mapping is None:
            return
        start = self.file_offset
        aligned = start - start % mmap.PAGESIZE
        try:
            self.mapping.madvise(MADV_POPULATE_READ, aligned, start + self.raw.nbytes - aligned)
        except (OSError, ValueError):
            self.mapping.madvise(mmap.MADV_WILLNEED, aligned, start + self.raw.nbytes - aligned)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        values = dequantize(self.raw, GGMLQuantizationType[self.ggml_type])
        if not values.flags.writeable:  # F32/F16 come back as views of the read-only memory map
            values = values.copy()
        return torch.from_numpy(np.ascontiguousarray(values)).reshape(self.shape).to(dtype)


def hf_tensor_name(gguf_name: str) -> str | None:
    """Map a GGUF tensor name to the HF name, or None for tensors our models don't use."""
    match = _BLOCK.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        hf = _LAYER_NAMES.get(part)
        return f"model.layers.{layer}.{hf}.{kind}" if hf else None
    base, _, kind = gguf_name.rpartition(".")
    hf = _GLOBAL_NAMES.get(base)
    return f"{hf}.{kind}" if hf else None


# deepseek2 (llama.cpp's arch for DeepSeek V2/V3/R1): per-layer names beyond the shared ones above
_DEEPSEEK2_NAMES = {
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}
_STACKED_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}


def deepseek2_block_tensors(tensors: dict[str, GGUFTensor]) -> dict[str, GGUFTensor]:
    """The matrices of a deepseek2 GGUF a kernel can take as blocks, by HF name: each expert's slice of the
    stacked expert tensors (a view), every other 2-D weight, and a split kv_b's per-head attn_k_b / attn_v_b as
    `self_attn.kv_b_proj.k_b` / `.v_b` (a combined attn_kv_b stays out: the absorbed attention reads it as a
    float matrix)."""
    sources = {}
    for gguf_name, tensor in tensors.items():
        match = _BLOCK.match(gguf_name)
        part = match.group(2) if match else None
        prefix = f"model.layers.{match.group(1)}." if match else ""
        if part in _STACKED_EXPERTS:
            for expert in range(tensor.shape[0]):
                name = f"{prefix}mlp.experts.{expert}.{_STACKED_EXPERTS[part]}.weight"
                sources[name] = GGUFTensor(f"{gguf_name}[{expert}]", tensor.ggml_type, tensor.shape[1:],
                                           tensor.raw[expert], tensor.mapping)
        elif part in _DEEPSEEK2_NAMES and match.group(3) == "weight" and len(tensor.shape) == 2:
            sources[f"{prefix}{_DEEPSEEK2_NAMES[part]}.weight"] = tensor
        elif part in ("attn_k_b", "attn_v_b") and f"blk.{match.group(1)}.attn_kv_b.weight" not in tensors:
            sources[f"{prefix}self_attn.kv_b_proj.{part[5:]}"] = tensor
        elif part not in ("attn_kv_b", "attn_k_b", "attn_v_b") and hf_tensor_name(gguf_name) is not None:
            sources[hf_tensor_name(gguf_name)] = tensor
    return sources


def deepseek2_hf_tensors(tensors: dict[str, GGUFTensor], taken: set[str] = frozenset()
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantised (HF name, tensor) pairs of a deepseek2 GGUF: stacked experts are split per expert,
    `exp_probs_b` is the router's e_score_correction_bias, and newer files' split attn_k_b [heads, rank, nope] /
    attn_v_b [heads, v, rank] are joined back into kv_b_proj (older files store attn_kv_b as is). Names in
    `taken` (kernels hold their blocks) are skipped unread."""
    split_kv: dict[str, dict[str, torch.Tensor]] = {}
    for gguf_name, tensor in tensors.items():
        match = _BLOCK.match(gguf_name)
        part = match.group(2) if match else None
        prefix = f"model.layers.{match.group(1)}." if match else ""
        if part in _STACKED_EXPERTS and f"{prefix}mlp.experts.0.{_STACKED_EXPERTS[part]}.weight" in taken:
            continue
        if part in _STACKED_EXPERTS:
            for expert, weight in enumerate(tensor.dequantize()):
                yield f"{prefix}mlp.experts.{expert}.{_STACKED_EXPERTS[part]}.weight", weight
        elif part == "exp_probs_b":
            yield f"{prefix}mlp.gate.e_score_correction_bias", tensor.dequantize()
        elif part in ("attn_k_b", "attn_v_b") and f"blk.{match.group(1)}.attn_kv_b.weight" not in tensors:
            if f"{prefix}self_attn.kv_b_proj.weight" in taken:
                continue
            pair = split_kv.setdefault(prefix, {})
            pair[part] = tensor.dequantize()
            if len(pair) == 2:
                del split_kv[prefix]
                joined = torch.cat((pair["attn_k_b"].transpose(1, 2), pair["attn_v_b"]), dim=1)
                yield f"{prefix}self_attn.kv_b_proj.weight", joined.reshape(-1, joined.shape[-1])
        elif part in _DEEPSEEK2_NAMES:
            name = f"{prefix}{_DEEPSEEK2_NAMES[part]}.{match.group(3)}"
            if name not in taken:
                yield name, tensor.dequantize()
        else:
            name = hf_tensor_name(gguf_name)
            if name is not None and name not in taken:
                yield name, tensor.dequantize()


# GGUF metadata value types (gguf.GGUFValueType): struct format of each scalar type
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_LENGTH = struct.Struct("<Q")  # a string's byte count
# tensor types stored as plain numbers; the rest are blocks of bytes (GGUFReader's convention)
_PLAIN_TENSORS = {"F32": np.float32, "F16": np.float16}


class _Truncated(Exception):
    """The file ends before what its header describes."""


class _Cursor:
    """Reads GGUF's little-endian header fields in order from a buffer."""

    def __init__(self, buffer: Any):
        self.buffer, self.offset = buffer, 0

    def need(self, size: int) -> None:
        if self.offset + size > len(self.buffer):
            raise _Truncated(f"the file ends inside its header ({len(self.buffer):,} bytes)")

    def scalar(self, fmt: str) -> Any:
        self.need(struct.calcsize(fmt))
        value = struct.unpack_from(fmt, self.buffer, self.offset)[0]
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        self.need(length)
        value = bytes(self.buffer[self.offset:self.offset + length]).decode("utf-8", errors="replace")
        self.offset += length
        return value

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row (a vocabulary's tokens and merges: ~300k in a Qwen2 file) in one tight loop."""
        view, offset, end, unpack = memoryview(self.buffer), self.offset, len(self.buffer), _LENGTH.unpack_from
        values = []
        for _ in range(count):
            if offset + 8 > end:
                raise _Truncated(f"the file ends inside its header ({end:,} bytes)")
            (length,) = unpack(view, offset)
            offset += 8
            if offset + length > end:
                raise _Truncated(f"the file ends inside its header ({end:,} bytes)")
            values.append(str(view[offset:offset + length], "utf-8", "replace"))
            offset += length
        self.offset = offset
        return values

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.scalar("<I"), self.scalar("<Q")
            if item_kind in _SCALARS and item_kind != 7:  # numbers: one vectorised read
                dtype = np.dtype(_SCALARS[item_kind])
                self.need(dtype.itemsize * count)
                values = np.frombuffer(self.buffer, dtype, count, self.offset)
                self.offset += dtype.itemsize * count
                return values.tolist()
            if item_kind == _STRING:
                return self.strings(count)
            return [self.value(item_kind) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {kind}")
        return self.scalar(_SCALARS[kind])


class GGUFCheckpoint:
    """A GGUF file: its metadata as a dict and its tensors by GGUF name, memory-mapped, not yet decoded.

    The header is parsed here rather than by gguf.GGUFReader, which builds a numpy view per metadata item
    (~2.5 s for the default model's 100k vocabulary strings, most of a cold start)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as file:
                self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            data = np.frombuffer(self._map, np.uint8)
            self.metadata, infos, data_start = _read_header(data)
            self.tensors: dict[str, GGUFTensor] = {
                name: _tensor(self.path, data, self._map, name, dims, type_id, data_start + offset)
                for name, dims, type_id, offset in infos}
        except _Truncated as exc:
            raise ModelLoadError(f"{self.path} is truncated: {exc}; an interrupted download or copy? Fetch the "
                                 "file again") from exc
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read GGUF file {self.path}: {exc}") from exc

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]



def _read_header(data: np.ndarray) -> tuple[dict[str, Any], list[tuple[str, list[int], int, int]], int]:
    """(metadata, tensor infos (name, dims fastest-first, ggml type, offset in the data section), where the data
    section starts)."""
    cursor = _Cursor(data)
    if bytes(data[:4]) != b"GGUF":
        raise ValueError("not a GGUF file (bad magic)")
    cursor.offset = 4
    version = cursor.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
    tensor_count, kv_count = cursor.scalar("<Q"), cursor.scalar("<Q")
    metadata = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalar("<I"))
    infos = []
    for _ in range(tensor_count):
        name, n_dims = cursor.string(), cursor.scalar("<I")
        dims = [cursor.scalar("<Q") for _ in range(n_dims)]
        infos.append((name, dims, cursor.scalar("<I"), cursor.scalar("<Q")))
    alignment = int(metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
    return metadata, infos, -(-cursor.offset // alignment) * alignment


def _tensor(path: Path, data: np.ndarray, mapping: mmap.mmap, name: str, dims: list[int], type_id: int,
            start: int) -> GGUFTensor:
    try:
        type_name = GGMLQuantizationType(type_id).name
    except ValueError:
        type_name = f"type {type_id}"
    if type_name not in SUPPORTED_TYPES:
        raise UnsupportedModelError(f"{path.name}: tensor {name} uses ggml type {type_name}, which whale does "
                                    f"not decode (supported: {sorted(SUPPORTED_TYPES)})")
    shape = tuple(int(d) for d in reversed(dims))  # GGUF lists dimensions fastest-first; PyTorch slowest-first
    if type_name in _PLAIN_TENSORS:
        dtype, layout = np.dtype(_PLAIN_TENSORS[type_name]), shape
    else:  # blocks: [..., bytes per row]
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
        dtype, layout = np.dtype(np.uint8), (*shape[:-1], shape[-1] // block * block_bytes)
    end = start + math.prod(layout) * dtype.itemsize
    if end > len(data):
        raise _Truncated(f"tensor {name} ends at byte {end:,}, the file at {len(data):,}")
    raw = np.ndarray(layout, dtype, data, start)
    return GGUFTensor(name, type_name, shape, raw, mapping, path)


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation for Llama: GGUF stores rotary pairs interleaved (Meta's
    layout), our attention rotates halves (the HF layout)."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))
