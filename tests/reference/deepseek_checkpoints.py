"""Tiny random DeepSeek checkpoints (V2, V2-Lite, V3, V3.2, FP8, MTP) written to disk by transformers in the real
HF layout (sharded safetensors + index, legacy `rope_scaling` config keys), plus transformers' reference models."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB = 256
YARN = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1}
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
               num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
               first_k_dense_replace=1, max_position_embeddings=2560, bos_token_id=0, eos_token_id=1)
CONFIGS: dict[str, dict] = {
    # V2: group-limited greedy over softmax scores, scaled, not renormalised
    "v2": dict(model_type="deepseek_v2", q_lora_rank=24, n_routed_experts=8, n_shared_experts=2,
               num_experts_per_tok=3, n_group=4, topk_group=2, topk_method="group_limited_greedy",
               scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=16.0,
               rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}),
    # V2-Lite: no query compression, plain greedy
    "v2_lite": dict(model_type="deepseek_v2", q_lora_rank=None, n_routed_experts=8, n_shared_experts=2,
                    num_experts_per_tok=3, n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax",
                    norm_topk_prob=False, routed_scaling_factor=1.0,
                    rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}),
    # V3: sigmoid scores, biased group-limited selection, renormalised weights
    "v3": dict(model_type="deepseek_v3", q_lora_rank=24, n_routed_experts=16, n_shared_experts=1,
               num_experts_per_tok=4, n_group=4, topk_group=2, topk_method="noaux_tc", scoring_func="sigmoid",
               norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
               rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}),
}
# query heads of 32 no-rope values (and a compressed query of 32): the split kv_b's rows and q_b's fill whole
# 32-value blocks
CONFIGS["v2_lite_nope32"] = dict(CONFIGS["v2_lite"], qk_nope_head_dim=32)
for _kind in ("v2", "v3"):
    CONFIGS[f"{_kind}_nope32"] = dict(CONFIGS[_kind], qk_nope_head_dim=32, q_lora_rank=32)
CONFIGS["v32"] = dict(CONFIGS["v3"], model_type="deepseek_v32", index_n_heads=16, index_head_dim=16, index_topk=8)
# FP8: dimensions above and not multiples of the 128 block
CONFIGS["v3_fp8"] = dict(CONFIGS["v3"], hidden_size=160, q_lora_rank=136, intermediate_size=200,
                         moe_intermediate_size=48, num_hidden_layers=2)
FP8_SKIP = ("embed_tokens", "lm_head", "norm", "mlp.gate.", "weights_proj", "e_score_correction_bias")


def hf_config(kind: str):
    """transformers' config object for a tiny checkpoint of `kind`."""
    from transformers import AutoConfig

    values = {**_COMMON, **CONFIGS[kind]}
    model_type = values.pop("model_type")
    scaling = dict(values.pop("rope_scaling"))
    values["rope_parameters"] = {"rope_type": scaling.pop("type"), "rope_theta": 10000.0, **scaling}
    values.pop("scoring_func")  # transformers hard-codes it per model type; kept in our config.json
    values["num_key_value_heads"] = values["num_attention_heads"]
    return AutoConfig.for_model(model_type, **values)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter and buffer random (norms around 1), so routing, biases and norms all matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if "inv_freq" in name:
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if "norm" in name:
                tensor.copy_(1.0 + 0.2 * noise)
            elif "e_score_correction_bias" in name:
                tensor.copy_(0.3 * noise)
            else:
                tensor.copy_(0.15 * noise)


def reference_model(kind: str, seed: int = 0, layers: int | None = None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config = hf_config(kind)
    if layers is not None:
        config.num_hidden_layers = layers
        if hasattr(config, "mlp_layer_types"):
            config.mlp_layer_types = ["dense"] * config.first_k_dense_replace + ["sparse"] * (
                layers - config.first_k_dense_replace)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _randomize(model, seed)
    return model


def _write_tokenizer(directory: Path) -> None:
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t2"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "t0", "eos_token": "t1"}))


def _legacy_config(directory: Path, kind: str, extra: dict) -> None:
    """Rewrite config.json the way the released checkpoints spell it (rope_theta + rope_scaling)."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.pop("rope_parameters", None)
    config.update(rope_theta=10000.0, rope_scaling=CONFIGS[kind]["rope_scaling"],
                  scoring_func=CONFIGS[kind]["scoring_func"], **extra)
    path.write_text(json.dumps(config, indent=2))


def _mtp_tensors(model: torch.nn.Module, kind: str, seed: int) -> dict[str, torch.Tensor]:
    """Layer `num_hidden_layers` as DeepSeek stores it: a full MoE decoder layer plus enorm/hnorm/eh_proj/
    shared_head and copies of the embedding and head."""
    layers = model.config.num_hidden_layers
    donor = reference_model(kind, seed + 1, layers=layers + 1)
    prefix = f"model.layers.{layers}."
    tensors = {k: v.clone() for k, v in _per_expert_state(donor).items() if k.startswith(prefix)}
    generator = torch.Generator().manual_seed(seed + 2)
    hidden = model.config.hidden_size
    tensors[prefix + "enorm.weight"] = 1.0 + 0.2 * torch.randn(hidden, generator=generator)
    tensors[prefix + "hnorm.weight"] = 1.0 + 0.2 * torch.randn(hidden, generator=generator)
    tensors[prefix + "shared_head.norm.weight"] = 1.0 + 0.2 * torch.randn(hidden, generator=generator)
    tensors[prefix + "eh_proj.weight"] = 0.15 * torch.randn(hidden, 2 * hidden, generator=generator)
    tensors[prefix + "embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
    tensors[prefix + "shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    return tensors


def _per_expert_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """transformers fuses experts into 3-D tensors in memory; checkpoints store one matrix per expert."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            for e, fused in enumerate(tensor):
                gate, up = fused.chunk(2, dim=0)
                state[f"{base}{e}.gate_proj.weight"], state[f"{base}{e}.up_proj.weight"] = gate, up
        elif name.endswith("experts.down_proj"):
            base = name[: -len("down_proj")]
            for e, down in enumerate(tensor):
                state[f"{base}{e}.down_proj.weight"] = down
        else:
            state[name] = tensor
    return state


def _add_shard(directory: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / name), metadata={"format": "pt"})
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update({k: name for k in tensors})
    index_path.write_text(json.dumps(index, indent=2))


def quantize_fp8(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128x128 block: scale_inv = amax / 448, fp8 = weight / scale_inv (edge blocks partial)."""
    rows, cols = weight.shape
    scale_inv = torch.empty(-(-rows // block), -(-cols // block))
    quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            tile = weight[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale_inv[i, j] = tile.abs().amax().clamp(min=1e-12) / 448.0
            quantized[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale_inv[i, j]).to(
                torch.float8_e4m3fn)
    return quantized, scale_inv


def dequantize_fp8_reference(quantized: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The reference side's own dequantisation, block by block (transformers' CPU FP8 path is wrong for edge
    blocks)."""
    out = quantized.float()
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            out[i * block:(i + 1) * block, j * block:(j + 1) * block] *= scale_inv[i, j]
    return out


def _quantize_shards(directory: Path) -> None:
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(directory / shard))
        for name in list(tensors):
            if tensors[name].dim() == 2 and name.endswith(".weight") and not any(s in name for s in FP8_SKIP):
                tensors[name], tensors[name + "_scale_inv"] = quantize_fp8(tensors[name])
                index["weight_map"][name + "_scale_inv"] = shard
        save_file(tensors, str(directory / shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index, indent=2))


def write_checkpoint(kind: str, directory: Path, seed: int = 0, mtp: bool = False) -> torch.nn.Module:
    """Write checkpoint `kind` (a CONFIGS key) to `directory`; return transformers' reference model for it.
    FP8 kinds are quantised on disk and the reference gets the dequantised weights."""
    model = reference_model(kind, seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size="150KB")
    extra: dict = {}  # without `mtp` a V3 config still says 1 MTP layer, as transformers' own saves do
    if mtp:
        _add_shard(directory, "model-mtp.safetensors", _mtp_tensors(model, kind, seed))
    if kind.endswith("fp8"):
        _quantize_shards(directory)
        extra["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                        "weight_block_size": [128, 128]}
        _load_dequantized(model, directory)
    _legacy_config(directory, kind, extra)
    _write_tokenizer(directory)
    return model


def _load_dequantized(model: torch.nn.Module, directory: Path) -> None:
    """Give the reference model the FP8 checkpoint's values, dequantised here."""
    from safetensors import safe_open

    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    stored = {}
    for name, shard in index.items():
        with safe_open(str(directory / shard), "pt") as handle:
            stored[name] = handle.get_tensor(name)
    fused = _per_expert_state(model)
    for name in fused:
        if name + "_scale_inv" in stored:
            fused[name] = dequantize_fp8_reference(stored[name], stored[name + "_scale_inv"])
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            state[name] = torch.stack([torch.cat((fused[f"{base}{e}.gate_proj.weight"],
                                                  fused[f"{base}{e}.up_proj.weight"])) for e in range(len(tensor))])
        elif name.endswith("experts.down_proj"):
            base = name[: -len("down_proj")]
            state[name] = torch.stack([fused[f"{base}{e}.down_proj.weight"] for e in range(len(tensor))])
        else:
            state[name] = fused[name]
    model.load_state_dict(state)


def checkpoint_maker(tmp_path_factory, write: Callable[[str, Path], torch.nn.Module],
                     folder: str) -> Callable[[str], tuple[Path, torch.nn.Module]]:
    """For a module-scoped fixture: `get(kind)` writes checkpoint `kind` once (with `write`) and returns its
    directory and reference model."""
    made: dict[str, tuple[Path, torch.nn.Module]] = {}

    def get(kind: str) -> tuple[Path, torch.nn.Module]:
        if kind not in made:
            directory = tmp_path_factory.mktemp(folder) / kind
            made[kind] = directory, write(kind, directory)
        return made[kind]

    return get


def assert_greedy_like_reference(llm, reference: torch.nn.Module, prompts: list[list[int]], tokens: int = 32) -> None:
    """`tokens` greedy tokens of each prompt, all in one ragged batch through whale's engine, equal
    transformers' `generate` on the prompt alone."""
    from whale.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, output in zip(prompts, outputs, strict=True):
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(prompt):]
        assert output.outputs[0].token_ids == expected.tolist()
