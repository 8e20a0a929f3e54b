"""Tiny random DeepSeek-V4 checkpoints written by transformers (every layer type; windows, compression rates and
the indexer's top-k small enough that short contexts cross many compression boundaries), plus transformers'
reference model for each.

"v4": transformers' own save (its config keys, its tensor names). "v4_released": the layout of the released
checkpoints: original tensor names (`embed.weight`, `hc_head_fn`, ...), config.json with per-layer
`compress_ratios`, `num_hash_layers` and a flat YaRN `rope_scaling`, dense linears in FP8 e4m3 with 128 x 128
e8m0 block scales (`<name>.scale`) and routed experts in FP4 e2m1 with an e8m0 scale per 32 values; its reference
is transformers loading that very checkpoint (its renames, its FP8 and FP4 dequantisation)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from deepseek_checkpoints import _write_tokenizer
from safetensors.torch import load_file, save_file

VOCAB = 256
_LAYERS = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
           "compressed_sparse_attention", "heavily_compressed_attention")
_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1}
CONFIGS = {
    "v4": dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, head_dim=32,
               partial_rotary_factor=0.25, q_lora_rank=48, o_groups=2, o_lora_rank=24, moe_intermediate_size=32,
               n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, index_n_heads=16, index_head_dim=16,
               index_topk=3, sliding_window=8, layer_types=list(_LAYERS), num_hash_layers=2,
               compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
               rope_parameters=_YARN, max_position_embeddings=256, hc_mult=4, bos_token_id=0, eos_token_id=1),
    # the released rates (4 and 128) and a window of 16; every FP8 matrix whole 128 x 128 blocks
    "v4_released": dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, head_dim=128,
                        partial_rotary_factor=0.25, q_lora_rank=128, o_groups=2, o_lora_rank=128,
                        moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                        index_n_heads=16, index_head_dim=32, index_topk=5, sliding_window=16,
                        compress_ratios=[0, 4, 128, 4], num_hash_layers=1, rope_parameters=_YARN,
                        max_position_embeddings=1024, hc_mult=4, bos_token_id=0, eos_token_id=1),
}
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def reference_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """transformers' DeepseekV4ForCausalLM, every parameter random (norms around 1, the token-id routing table
    any experts), so sinks, position biases, hyper-connections and routing all matter."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**CONFIGS[kind])).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("norm.weight"):
                tensor.copy_(1.0 + 0.2 * noise)
            elif name.endswith(("scale", "sinks", "base", "position_bias", "e_score_correction_bias")):
                tensor.copy_(0.5 * noise)
            else:
                tensor.copy_(0.15 * noise)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.5 * torch.randn(buffer.shape, generator=generator))
            elif name.endswith("tid2eid"):
                experts = model.config.n_routed_experts
                choice = torch.rand(buffer.shape[0], experts, generator=generator).argsort(-1)
                buffer.copy_(choice[:, :buffer.shape[1]])
    return model


def write_checkpoint(kind: str, directory: Path, seed: int = 0) -> torch.nn.Module:
    """Write checkpoint `kind` to `directory`; return the reference model computing what it holds."""
    model = reference_model(kind, seed)
    model.save_pretrained(directory)
    _write_tokenizer(directory)
    if kind == "v4_released":
        return _as_released(directory)
    return model


def _e8m0(scale: torch.Tensor) -> torch.Tensor:
    """The power of two at or above `scale`, as float8_e8m0fnu."""
    return torch.exp2(torch.ceil(torch.log2(scale.clamp(min=2.0 ** -100)))).to(torch.float8_e8m0fnu)


def _fp8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = weight.shape
    tiles = weight.reshape(rows // 128, 128, cols // 128, 128)
    scale = _e8m0(tiles.abs().amax(dim=(1, 3)) / 448.0)
    quantized = (tiles / scale.float()[:, None, :, None]).to(torch.float8_e4m3fn).reshape(rows, cols)
    return quantized, scale


def _fp4_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // 32, 32)
    scale = _e8m0(groups.abs().amax(dim=-1) / 6.0)
    scaled = (groups / scale.float()[..., None]).reshape(rows, cols)
    codes = (scaled[..., None] - E2M1).abs().argmin(dim=-1).to(torch.uint8)  # the nearest e2m1 value
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)  # low nibble: the even column
    return packed.view(torch.int8), scale


def _as_released(directory: Path) -> torch.nn.Module:
    """Rename to the original tensor names, quantise, rewrite config.json the released way. The reference is
    transformers loading that very checkpoint (its own renames, its own FP8 / FP4 dequantisation)."""
    from transformers import DeepseekV4ForCausalLM, FineGrainedFP8Config

    renames = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
               "model.hc_head.hc_fn": "hc_head_fn", "model.hc_head.hc_base": "hc_head_base",
               "model.hc_head.hc_scale": "hc_head_scale"}
    released = {}
    for name, tensor in load_file(str(directory / "model.safetensors")).items():
        target = renames.get(name, name.removeprefix("model."))
        quantize = None
        if ".experts." in name and name.endswith(".weight"):
            quantize = _fp4_rows
        elif tensor.dim() == 2 and name.endswith(".weight") and not any(
                skip in name for skip in ("embed", "compressor.", "weights_proj", "gate.weight", "head.weight")):
            quantize = _fp8_blocks
        if quantize is None:
            released[target] = tensor
        else:
            released[target], released[target.removesuffix(".weight") + ".scale"] = quantize(tensor)
    save_file(released, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    for key in ("layer_types", "mlp_layer_types", "compress_rates", "rope_parameters"):
        config.pop(key)
    config.update(compress_ratios=CONFIGS["v4_released"]["compress_ratios"], num_hash_layers=1,
                  rope_theta=10000.0, compress_rope_theta=160000.0,
                  rope_scaling={k.replace("rope_type", "type"): v for k, v in _YARN.items()},
                  quantization_config={"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                       "weight_block_size": [128, 128], "activation_scheme": "dynamic",
                                       "expert_dtype": "fp4"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return DeepseekV4ForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                 quantization_config=FineGrainedFP8Config(dequantize=True)).eval()
