"""A deepseek2 GGUF written with the `gguf` package from a tiny checkpoint (llama.cpp's names: stacked experts,
kv_b split into k_b / v_b, exp_probs_b), loaded back by whale: the same logits as transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from deepseek_checkpoints import VOCAB, write_checkpoint
from random_blocks import round_activations

from whale import LLM, SamplingParams
from whale.engine.paged_attention import create_cache
from whale.models.gguf_blocks import BLOCK_TYPES, BlockEmbedding, BlockLatentHeads, BlockLinear
from whale.models.loader import load_model
from whale.weights import safetensors as st

PROMPT = [5, 17, 3, 99, 42, 8, 120, 77, 13, 61, 200, 4, 9, 31]
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm",
          "self_attn.q_b_proj": "attn_q_b", "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
          "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
          "mlp.gate": "ffn_gate_inp", "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
          "mlp.shared_experts.up_proj": "ffn_up_shexp", "mlp.shared_experts.down_proj": "ffn_down_shexp"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def _gguf_tensors(tensors: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """HF names -> llama.cpp deepseek2 names, as its converter writes them."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name in _GLOBAL:
            out[_GLOBAL[name]] = tensor
            continue
        _, _, layer, rest = name.split(".", 3)
        block = f"blk.{layer}."
        if ".experts." in rest:
            _, _, expert, proj, _ = rest.split(".")
            experts.setdefault((int(layer), proj), {})[int(expert)] = tensor
        elif rest == "mlp.gate.e_score_correction_bias":
            out[block + "exp_probs_b.bias"] = tensor
        elif rest == "self_attn.kv_b_proj.weight":
            kv_b = tensor.view(config["num_attention_heads"], -1, tensor.shape[-1])
            k_b, v_b = kv_b.split([config["qk_nope_head_dim"], config["v_head_dim"]], dim=1)
            out[block + "attn_k_b.weight"], out[block + "attn_v_b.weight"] = k_b.transpose(1, 2), v_b
        else:
            module, kind = rest.rsplit(".", 1)
            out[f"{block}{_LAYER[module]}.{kind}"] = tensor
    for (layer, proj), by_expert in experts.items():
        short = proj.split("_")[0]
        out[f"blk.{layer}.ffn_{short}_exps.weight"] = torch.stack([by_expert[e] for e in sorted(by_expert)])
    return out


def write_gguf(checkpoint: Path, path: Path, block_type: str | None = None, latent_blocks: bool = False) -> None:
    """`block_type`: store every matrix whose rows split into 32-value blocks (experts, projections, embedding,
    output) in that ggml type, as a quantized release is; the router stays float, and the split kv_b (attn_k_b,
    attn_v_b) unless `latent_blocks`."""
    import json

    import gguf

    config = json.loads((checkpoint / "config.json").read_text())
    writer = gguf.GGUFWriter(str(path), "deepseek2")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(1)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_leading_dense_block_count(config["first_k_dense_replace"])
    writer.add_q_lora_rank(config.get("q_lora_rank") or 0)  # as llama.cpp's converter: 0 for V2-Lite
    writer.add_kv_lora_rank(config["kv_lora_rank"])
    writer.add_key_length(config["kv_lora_rank"] + config["qk_rope_head_dim"])
    writer.add_value_length(config["kv_lora_rank"])
    writer.add_key_length_mla(config["qk_nope_head_dim"] + config["qk_rope_head_dim"])
    writer.add_value_length_mla(config["v_head_dim"])
    writer.add_rope_dimension_count(config["qk_rope_head_dim"])
    writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    writer.add_expert_count(config["n_routed_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_expert_shared_count(config["n_shared_experts"])
    writer.add_expert_weights_scale(config["routed_scaling_factor"])
    writer.add_expert_weights_norm(bool(config["norm_topk_prob"]))
    writer.add_expert_group_count(config["n_group"])
    writer.add_expert_group_used_count(config["topk_group"])
    sigmoid = config.get("scoring_func") == "sigmoid"
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX)
    scaling = config["rope_scaling"]
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(scaling["factor"])
    writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    writer.add_rope_scaling_yarn_log_mul(0.1 * scaling["mscale_all_dim"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    tensors = dict(st.iter_tensors(checkpoint))
    for name, tensor in _gguf_tensors(tensors, config).items():
        values = np.ascontiguousarray(tensor.float().numpy())
        float_parts = ("ffn_gate_inp",) if latent_blocks else ("ffn_gate_inp", "attn_k_b", "attn_v_b")
        quantized = block_type and values.ndim >= 2 and values.shape[-1] % 32 == 0 and not any(
            part in name for part in float_parts)
        if quantized:
            kind = gguf.GGMLQuantizationType[block_type]
            writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kind", ["v2", "v2_lite", "v3"])
@torch.inference_mode()
def test_deepseek2_gguf_logits_match_transformers(kind, tmp_path):
    reference = write_checkpoint(kind, tmp_path / kind)
    path = tmp_path / f"{kind}.gguf"
    write_gguf(tmp_path / kind, path)
    loaded = load_model(str(path), dtype="float32", device="cpu")
    assert loaded.config.topk_method == reference.config.to_dict().get("topk_method", "noaux_tc")
    model = loaded.model
    cache = create_cache(model.kv_cache_spec(), torch.float32, torch.device("cpu"))
    cache.begin_step([0], [len(PROMPT)])
    logits = model.compute_logits(model(torch.tensor(PROMPT), torch.arange(len(PROMPT)), cache))
    expected = reference(torch.tensor([PROMPT])).logits[0]
    assert (logits - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["v2_lite", "v3"])
@torch.inference_mode()
def test_deepseek2_gguf_computes_from_its_blocks(kind, tmp_path):
    """A deepseek2 GGUF in Q8_0 blocks (stacked experts included) runs from them: each expert a view of its slice of
    the stacked tensor, nothing expanded. Against the same file expanded to fp32 (which the test above checks
    against transformers) with the block kernels' int8 rounding of each linear's input applied, the logits agree
    to float32 accumulation."""
    write_checkpoint(kind, tmp_path / kind)
    path = tmp_path / f"{kind}.q8_0.gguf"
    write_gguf(tmp_path / kind, path, block_type="Q8_0")
    blocks = load_model(str(path))
    assert blocks.kernels == "blocks"
    moe = next(layer.mlp for layer in blocks.model.model.layers if hasattr(layer.mlp, "experts"))
    assert all(isinstance(e.down_proj, BlockLinear) for e in moe.experts) and moe.block_experts is not None
    assert isinstance(blocks.model.model.embed_tokens, BlockEmbedding)
    dense = load_model(str(path), kernels="dense")
    _round_as_the_kernels(dense, blocks)
    logits = {label: _logits(loaded) for label, loaded in (("blocks", blocks), ("dense", dense))}
    assert (logits["blocks"] - logits["dense"]).abs().max() <= 1e-4 * logits["dense"].abs().max()


class _RoundedLatentHeads(BlockLatentHeads):
    """The absorbed attention's per-head products over a float kv_b, each head's input rounded per 32 values as
    `block_heads` rounds it (the reference for BlockLatentHeads)."""

    def __init__(self, kv_b: torch.Tensor, heads: int, nope: int):
        torch.nn.Module.__init__(self)
        self.w_kv, self.nope = kv_b.view(heads, -1, kv_b.shape[-1]), nope

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        return torch.einsum("thn,hnr->thr", _rounded(q_nope), self.w_kv[:, :self.nope])

    def expand_values(self, attended: torch.Tensor) -> torch.Tensor:
        return torch.einsum("thr,hvr->thv", _rounded(attended), self.w_kv[:, self.nope:])


def _rounded(x: torch.Tensor) -> torch.Tensor:
    return round_activations(x.reshape(-1, x.shape[-1]), 32).view(x.shape)


@torch.inference_mode()
def test_deepseek2_gguf_split_kv_b_computes_from_its_blocks(tmp_path):
    """Quantized releases store kv_b split per head in blocks (V2-Lite Q4_K_M: attn_k_b Q5_0, attn_v_b Q4_K): the
    absorbed attention multiplies each head by its own blocks (BlockLatentHeads, packed), kv_b never expanded. Against
    the same file expanded to float, with each head's query and attended latent rounded as the kernel rounds
    them, the logits agree to float32 accumulation."""
    write_checkpoint("v2_lite_nope32", tmp_path / "checkpoint")
    path = tmp_path / "latent.q8_0.gguf"
    write_gguf(tmp_path / "checkpoint", path, block_type="Q8_0", latent_blocks=True)
    blocks = load_model(str(path))
    heads = [layer.self_attn.kv_b_proj for layer in blocks.model.model.layers]
    assert all(isinstance(h, BlockLatentHeads) for h in heads)
    # packed for the kernel (each head's rows 8 to a group), not the file's Q8_0 rows as stored
    assert {(h.k_type, h.v_type) for h in heads} == {(BLOCK_TYPES["Q8_0"] | 256,) * 2}
    dense = load_model(str(path), kernels="dense")
    _round_as_the_kernels(dense, blocks)
    config = dense.config
    for layer in dense.model.model.layers:
        attention = layer.self_attn
        attention.kv_b_proj = _RoundedLatentHeads(attention.kv_b_proj.weight, config.num_attention_heads,
                                                  config.qk_nope_head_dim)
    logits = {label: _logits(loaded) for label, loaded in (("blocks", blocks), ("dense", dense))}
    assert (logits["blocks"] - logits["dense"]).abs().max() <= 1e-4 * logits["dense"].abs().max()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", ["v2_lite_nope32", "v2_nope32", "v3_nope32"])
def test_the_compiled_deepseek_stack_equals_the_python_layers(tmp_path, kind, batch):
    """whale/models/deepseek_stack.py against the Python layers over the same blocks (a deepseek2 GGUF in Q8_0,
    kv_b split per head): V2-Lite (no query compression, greedy softmax routing), V2 (group-limited greedy,
    scaled) and V3 (compressed queries, sigmoid scores with the correction bias, renormalised). Decode steps of
    one sequence and of three, over contexts past one 256-position chunk of the paged kernel: bit-identical, so
    the greedy tokens and their logprobs are equal."""
    write_checkpoint(kind, tmp_path / kind)
    path = tmp_path / f"{kind}.gguf"
    write_gguf(tmp_path / kind, path, block_type="Q8_0", latent_blocks=True)
    llm = LLM(str(path), enable_prefix_caching=False)
    generator = torch.Generator().manual_seed(3)
    prompts = [{"prompt_token_ids": torch.randint(3, VOCAB, (n,), generator=generator).tolist()}
               for n in range(250, 250 + batch)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    stacked = [o.outputs[0] for o in llm.generate(prompts, params)]
    model = llm.loaded.model
    assert model.compiled_decode.stack is not None
    model.compiled_decode.stack = None  # the Python layers from here on
    layered = [o.outputs[0] for o in llm.generate(prompts, params)]
    assert [o.token_ids for o in stacked] == [o.token_ids for o in layered]
    assert [o.logprobs for o in stacked] == [o.logprobs for o in layered]


def _round_as_the_kernels(dense, blocks) -> None:
    """Round the input of each of the dense model's linears that `blocks` computes from blocks, per 32 values."""
    for layer in dense.model.model.layers:  # every expert through its own modules, where the hooks sit
        if hasattr(layer.mlp, "gate_up"):
            del layer.mlp.gate_up
    rounded = {name for name, module in blocks.model.named_modules() if isinstance(module, BlockLinear)}
    for name, module in dense.model.named_modules():
        if name in rounded:
            module.register_forward_pre_hook(lambda _module, args: round_activations(args[0], 32))
    assert len(rounded) > 10


def _logits(loaded) -> torch.Tensor:
    model = loaded.model
    cache = create_cache(model.kv_cache_spec(), torch.float32, torch.device("cpu"))
    cache.begin_step([0], [len(PROMPT)])
    return model.compute_logits(model(torch.tensor(PROMPT), torch.arange(len(PROMPT)), cache))
