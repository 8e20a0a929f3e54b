"""GGUF tensors written with the `gguf` package, read back by whale: shapes in PyTorch order and values equal
to an independent float64 decoding of each block format."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from whale.errors import ModelLoadError
from whale.weights.gguf import GGUFCheckpoint, hf_tensor_name, unpermute_rope_rows

T = gguf.GGMLQuantizationType
ROWS, COLS = 6, 512


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float64)


def _decode_q8_0(blocks: np.ndarray) -> np.ndarray:  # 2-byte fp16 scale + 32 int8
    return _f16(blocks[:, :2]) * blocks[:, 2:].view(np.int8).astype(np.float64)


def _decode_q4_0(blocks: np.ndarray) -> np.ndarray:  # fp16 scale + 16 bytes: low nibbles first, minus 8
    q = np.concatenate([blocks[:, 2:] & 0xF, blocks[:, 2:] >> 4], axis=1).astype(np.float64)
    return _f16(blocks[:, :2]) * (q - 8)


def _decode_q4_1(blocks: np.ndarray) -> np.ndarray:  # fp16 scale, fp16 min, 16 bytes of nibbles
    q = np.concatenate([blocks[:, 4:] & 0xF, blocks[:, 4:] >> 4], axis=1).astype(np.float64)
    return _f16(blocks[:, :2]) * q + _f16(blocks[:, 2:4])


def _decode_q4_k(blocks: np.ndarray) -> np.ndarray:
    """144 bytes per 256 values: d, dmin (fp16), 12 bytes of 6-bit scales/mins, 128 bytes of nibbles."""
    out = np.zeros((len(blocks), 256))
    for b, block in enumerate(blocks):
        d, dmin = _f16(block[0:2])[0], _f16(block[2:4])[0]
        s, qs = block[4:16].astype(np.int64), block[16:144].astype(np.int64)
        scales, mins = [], []
        for j in range(8):
            if j < 4:
                scales.append(s[j] & 63), mins.append(s[j + 4] & 63)
            else:
                scales.append((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4))
                mins.append((s[j + 4] >> 4) | ((s[j] >> 6) << 4))
        for chunk in range(4):
            q = qs[32 * chunk:32 * chunk + 32]
            lo, hi = 2 * chunk, 2 * chunk + 1
            out[b, 64 * chunk:64 * chunk + 32] = d * scales[lo] * (q & 0xF) - dmin * mins[lo]
            out[b, 64 * chunk + 32:64 * chunk + 64] = d * scales[hi] * (q >> 4) - dmin * mins[hi]
    return out


def _decode_q6_k(blocks: np.ndarray) -> np.ndarray:
    """210 bytes per 256 values: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, fp16 d."""
    out = np.zeros((len(blocks), 256))
    for b, block in enumerate(blocks):
        ql, qh = block[0:128].astype(np.int64), block[128:192].astype(np.int64)
        sc, d = block[192:208].view(np.int8).astype(np.float64), _f16(block[208:210])[0]
        for half in range(2):
            l_, h_, s_, y = ql[64 * half:], qh[32 * half:], sc[8 * half:], 128 * half
            for i in range(32):
                group = i // 16
                q1 = ((l_[i] & 0xF) | ((h_[i] & 3) << 4)) - 32
                q2 = ((l_[i + 32] & 0xF) | (((h_[i] >> 2) & 3) << 4)) - 32
                q3 = ((l_[i] >> 4) | (((h_[i] >> 4) & 3) << 4)) - 32
                q4 = ((l_[i + 32] >> 4) | (((h_[i] >> 6) & 3) << 4)) - 32
                out[b, y + i] = d * s_[group] * q1
                out[b, y + i + 32] = d * s_[group + 2] * q2
                out[b, y + i + 64] = d * s_[group + 4] * q3
                out[b, y + i + 96] = d * s_[group + 6] * q4
    return out


def _random_k_blocks(rng: np.random.Generator, block_bytes: int, scale_offsets: list[int]) -> np.ndarray:
    """Random K-quant blocks with sane fp16 scales (random bytes there could be inf/nan)."""
    blocks = rng.integers(0, 256, size=(ROWS * COLS // 256, block_bytes), dtype=np.uint8)
    for offset in scale_offsets:
        scales = rng.uniform(0.001, 0.05, size=len(blocks)).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks


DECODERS = {"Q8_0": (_decode_q8_0, 34), "Q4_0": (_decode_q4_0, 18), "Q4_1": (_decode_q4_1, 20),
            "Q4_K": (_decode_q4_k, 144), "Q6_K": (_decode_q6_k, 210)}


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """One tensor per format: the simple ones quantised by gguf from known values, K-quants as random blocks."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    path = tmp_path_factory.mktemp("gguf") / "formats.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    stored = {"F32": values, "F16": values.astype(np.float16), "BF16": gguf.quants.quantize(values, T.BF16)}
    for name in ("Q8_0", "Q4_0", "Q4_1"):
        stored[name] = gguf.quants.quantize(values, T[name])
    stored["Q4_K"] = _random_k_blocks(rng, 144, [0, 2]).reshape(ROWS, -1)
    stored["Q6_K"] = _random_k_blocks(rng, 210, [208]).reshape(ROWS, -1)
    for name, data in stored.items():
        writer.add_tensor(f"t.{name}", data, raw_dtype=None if name in ("F32", "F16") else T[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, values, stored


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_dequantized_tensor_has_torch_shape_and_exact_values(gguf_file, kind):
    path, values, stored = gguf_file
    tensor = GGUFCheckpoint(path).tensors[f"t.{kind}"]
    assert tensor.ggml_type == kind and tensor.shape == (ROWS, COLS)
    ours = tensor.dequantize().double().numpy()
    if kind in DECODERS:  # independent float64 decoding of the raw blocks
        decode, block_bytes = DECODERS[kind]
        expected = decode(stored[kind].reshape(-1, block_bytes)).reshape(ROWS, COLS)
        np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_allclose(ours, values, atol={"F32": 0, "F16": 1e-3, "BF16": 1e-2}[kind] * 4)


def test_quantized_blocks_stay_available_for_quantized_kernels(gguf_file):
    path, _, stored = gguf_file
    tensor = GGUFCheckpoint(path).tensors["t.Q4_1"]
    assert tensor.raw.dtype == np.uint8 and tensor.raw.tobytes() == stored["Q4_1"].tobytes()


def test_the_header_reads_every_metadata_type_as_the_gguf_package_does(tmp_path):
    """whale parses GGUF headers itself (gguf.GGUFReader is ~10x slower on a real vocabulary); the gguf package,
    which wrote the file, is the reference for what each value reads back as."""
    path = tmp_path / "meta.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("test.u32", 7)
    writer.add_int32("test.i32", -3)
    writer.add_uint64("test.u64", 2**40)
    writer.add_float32("test.f32", 1e-5)
    writer.add_float64("test.f64", 0.1)
    writer.add_bool("test.bool", True)
    writer.add_string("test.str", "whale ⛵")
    writer.add_array("test.strs", ["a", "", "ü", "tokens"])
    writer.add_array("test.ints", [1, -2, 3])
    writer.add_array("test.floats", [0.5, -1.25])
    writer.add_array("test.bools", [True, False])
    writer.add_tensor("t.F32", np.arange(96, dtype=np.float32).reshape(3, 32))
    writer.add_tensor("t.Q8_0", gguf.quants.quantize(np.ones((2, 64), np.float32), T.Q8_0), raw_dtype=T.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reference = gguf.GGUFReader(path)
    ours = GGUFCheckpoint(path)
    assert ours.metadata == {name: field.contents() for name, field in reference.fields.items()
                             if not name.startswith("GGUF.")}
    assert ours.metadata["test.strs"] == ["a", "", "ü", "tokens"] and ours.metadata["test.bools"] == [True, False]
    for tensor in reference.tensors:
        raw = ours.tensors[tensor.name].raw
        assert raw.dtype == tensor.data.dtype and raw.shape == tensor.data.shape
        assert np.array_equal(raw, tensor.data)


def test_names_map_to_hugging_face_names():
    assert hf_tensor_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_tensor_name("blk.7.ffn_down.weight") == "model.layers.7.mlp.down_proj.weight"
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("rope_freqs.weight") is None


def test_unpermute_inverts_llama_cpp_permutation():
    heads, head_dim, hidden = 3, 8, 5
    weight = torch.randn(heads * head_dim, hidden)
    # llama.cpp's converter: rows (head, half, pair) <- (head, pair, half)
    permuted = weight.reshape(heads, 2, head_dim // 2, hidden).transpose(1, 2).reshape(weight.shape)
    assert torch.equal(unpermute_rope_rows(permuted, heads), weight)


def test_unreadable_file_is_a_clear_error(tmp_path, gguf_file):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        GGUFCheckpoint(bad)
    whole = gguf_file[0].read_bytes()
    # a real file cut short, in the header or in the tensor data: said in those words, not struct's or numpy's
    for cut, where in ((40, "ends inside its header"), (len(whole) - 100, f"the file at {len(whole) - 100:,}")):
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(whole[:cut])
        with pytest.raises(ModelLoadError, match=f"cut{cut}.gguf is truncated: .*{where}.*Fetch the file again"):
            GGUFCheckpoint(truncated)


def _mapped_resident_bytes(path) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if "-" in line.split(" ", 1)[0]:  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def test_populate_maps_the_tensors_asked_for_and_nothing_else(tmp_path):
    """Kernels that compute from the mapping would otherwise fault each page in on first use (a MoE model's
    experts over hundreds of steps); the embedding, of which a step reads a few rows, is left out."""
    path = tmp_path / "populate.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(0)
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    for name in ("blk.0.ffn_up.weight", "token_embd.weight"):
        blocks = gguf.quants.quantize(rng.standard_normal((1024, 2048), np.float32), q8_0)
        writer.add_tensor(name, blocks, raw_dtype=q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    checkpoint = GGUFCheckpoint(path)
    before = _mapped_resident_bytes(path)
    checkpoint.tensors["blk.0.ffn_up.weight"].populate()
    grown = _mapped_resident_bytes(path) - before
    size = checkpoint.tensors["blk.0.ffn_up.weight"].raw.nbytes  # 2.1 MiB of Q8_0 blocks
    assert size <= grown < size + 64 * 1024


def test_a_packed_tensor_is_not_held_twice(tmp_path):
    """A linear whose blocks the kernels repack (8 rows interleaved) holds them once: the file's pages are let go
    as they are packed (the page cache keeps them), and the packed kernel computes the file's weights."""
    from random_blocks import round_activations

    from whale.kernels import cpu_ops
    from whale.models.gguf_blocks import BlockLinear

    if cpu_ops() is None:
        pytest.skip("the compiled CPU kernels are not built here")
    path = tmp_path / "packed.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    blocks = gguf.quants.quantize(np.random.default_rng(0).standard_normal((1024, 2048), np.float32), q8_0)
    writer.add_tensor("blk.0.ffn_up.weight", blocks, raw_dtype=q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = GGUFCheckpoint(path).tensors["blk.0.ffn_up.weight"]
    linear = BlockLinear.from_gguf(tensor, None)
    assert linear.types != [q8_0.value]  # packed
    assert _mapped_resident_bytes(path) < 64 * 1024  # of the file's 2.1 MiB, the header at most
    x = torch.randn(3, 2048, generator=torch.Generator().manual_seed(0))
    weight = tensor.dequantize().double()
    exact = round_activations(x, 32).double() @ weight.T
    assert ((linear(x).double() - exact).abs() / (x.double().abs() @ weight.abs().T)).max() < 1e-6

