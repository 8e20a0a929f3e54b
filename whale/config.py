"""Model configuration: frozen dataclasses parsed from a Hugging Face config.json or from GGUF metadata.

Each architecture family has its own dataclass; `parse_hf_config` picks it from `model_type` through a small
registry, so adding a family (the DeepSeek types) is one entry, not a branch in every caller.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from whale.errors import ModelLoadError, UnsupportedModelError


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters: `rope_type` is default, linear, llama3 or yarn."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn (DeepSeek)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> RopeConfig:
        # transformers 5 writes `rope_parameters` (theta inside); released checkpoints use rope_theta +
        # rope_scaling. Accept both.
        params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        theta = params.pop("rope_theta", config.get("rope_theta", 10000.0))
        rope_type = params.pop("rope_type", params.pop("type", "default")) or "default"
        known = {f.name for f in fields(cls)}
        extra = {k: v for k, v in params.items() if k in known and v is not None}
        return cls(theta=float(theta), rope_type=rope_type, **extra)


@dataclass(frozen=True)
class ModelConfig:
    """What every decoder has. `architecture` is the HF model_type (llama, qwen2, qwen3, deepseek_v3, ...)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None


@dataclass(frozen=True)
class DenseConfig(ModelConfig):
    """Llama / Qwen2 / Qwen3 decoders: the default model and the R1 distills."""

    attention_bias: bool = False  # bias on q, k, v projections (Qwen2 always)
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE


@dataclass(frozen=True)
class DeepseekConfig(ModelConfig):
    """DeepSeek V2 / V2-Lite / V3 / R1 / V3.1 / V3.2: MLA attention, DeepSeekMoE, optional DSA indexer and MTP.

    Defaults are those of the model type's reference configuration (transformers' DeepseekV2/V3/V32Config);
    training-only fields (aux_loss_alpha, seq_aux, ep_size) are kept so a config round-trips."""

    q_lora_rank: int | None = 1536  # None: a single q_proj (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    rope_interleave: bool = True  # rotary pairs are (2i, 2i+1), as the checkpoints expect
    hidden_act: str = "silu"
    # DeepSeekMoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 2048
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    mlp_layer_types: tuple[str, ...] | None = None  # V3.2: "dense" / "sparse" per layer; wins when given
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"  # greedy | group_limited_greedy | noaux_tc
    scoring_func: str = "sigmoid"  # softmax | sigmoid
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    ep_size: int = 1
    # Multi-token prediction layers stored after the main ones (model.layers.61 on V3)
    num_nextn_predict_layers: int = 0
    # DeepSeek Sparse Attention (V3.2); index_topk 0 means dense MLA
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    fp8_block_size: tuple[int, int] | None = None  # quantization_config.weight_block_size of FP8 checkpoints

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        if self.mlp_layer_types is not None and layer < len(self.mlp_layer_types):  # MTP layers come after
            return self.mlp_layer_types[layer] == "sparse"
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0


V4_LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")


@dataclass(frozen=True)
class DeepseekV4Config(ModelConfig):
    """DeepSeek-V4 (Flash, Pro): one shared 512-wide K=V head over a sliding window plus compressed entries (CSA:
    one per `csa_rate` tokens, chosen per query by the lightning indexer; HCA: one per `hca_rate`), attention
    sinks, a grouped low-rank output projection, hyper-connection residual streams, and an MoE whose first
    layers route by a token-id table. `rope` is the sliding layers' RoPE, `compress_rope` the one of every
    compressed layer (its attention and its entries). Defaults are transformers' DeepseekV4Config."""

    q_lora_rank: int = 1024
    qk_rope_head_dim: int = 64
    o_groups: int = 8
    o_lora_rank: int = 1024
    layer_types: tuple[str, ...] = ()
    mlp_layer_types: tuple[str, ...] = ()  # "hash_moe" (routed by tid2eid[token]) or "moe"
    csa_rate: int = 4
    hca_rate: int = 128
    sliding_window: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    compress_rope: RopeConfig = field(default_factory=RopeConfig)
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    routed_scaling_factor: float = 1.5
    scoring_func: str = "sqrtsoftplus"
    swiglu_limit: float = 10.0
    num_nextn_predict_layers: int = 0

    def rate(self, layer: int) -> int:
        """Tokens per compressed entry of the layer (0: sliding window only)."""
        return {"sliding_attention": 0, "compressed_sparse_attention": self.csa_rate,
                "heavily_compressed_attention": self.hca_rate}[self.layer_types[layer]]


def v4_layer_types(ratios: list[int] | tuple[int, ...], csa_rate: int = 4, hca_rate: int = 128) -> tuple[str, ...]:
    """DeepSeek-V4's layer types from the released per-layer `compress_ratios` (0: the sliding window only)."""
    by_ratio = {0: V4_LAYER_TYPES[0], csa_rate: V4_LAYER_TYPES[1], hca_rate: V4_LAYER_TYPES[2]}
    unknown = sorted(set(ratios) - set(by_ratio))
    if unknown:
        raise ModelLoadError(f"compress_ratios holds {unknown}: DeepSeek-V4 layers compress by 0 (sliding window "
                             f"only), {csa_rate} (CSA) or {hca_rate} (HCA)")
    return tuple(by_ratio[r] for r in ratios)


def _parse_deepseek_v4(cfg: dict[str, Any]) -> DeepseekV4Config:
    """config.json as the released checkpoints write it (`compress_ratios` per layer, `num_hash_layers`, flat
    rope_scaling for the compressed layers) or as transformers does (`layer_types`, `compress_rates`, nested
    `rope_parameters` with "main" and "compress")."""
    values: dict[str, Any] = _common_fields({**cfg, "intermediate_size": cfg.get("moe_intermediate_size", 2048)})
    layers = values["num_hidden_layers"]
    own = {f.name for f in fields(DeepseekV4Config)} - {f.name for f in fields(ModelConfig)}
    values.update({k: cfg[k] for k in own if cfg.get(k) is not None})
    rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128, **(cfg.get("compress_rates") or {})}
    values["csa_rate"] = int(cfg.get("compress_rate_csa", rates["compressed_sparse_attention"]))
    values["hca_rate"] = int(cfg.get("compress_rate_hca", rates["heavily_compressed_attention"]))
    layer_types = cfg.get("layer_types")
    if layer_types is None and cfg.get("compress_ratios") is not None:
        layer_types = v4_layer_types(cfg["compress_ratios"], values["csa_rate"], values["hca_rate"])
    if layer_types is None:  # transformers' default: two HCA layers, then CSA and HCA alternating
        layer_types = [V4_LAYER_TYPES[2]] * min(layers, 2) + [V4_LAYER_TYPES[1 if i % 2 else 2]
                                                              for i in range(max(layers - 2, 0))]
    values["layer_types"] = tuple(layer_types[:layers])  # a list that also covers the MTP layers is cut
    if any(t not in V4_LAYER_TYPES for t in values["layer_types"]) or len(values["layer_types"]) != layers:
        raise ModelLoadError(f"layer_types must name each of the {layers} layers one of {', '.join(V4_LAYER_TYPES)}")
    mlp_types = cfg.get("mlp_layer_types")
    if mlp_types is None:
        hashed = min(layers, int(cfg.get("num_hash_layers", 3)))
        mlp_types = ["hash_moe"] * hashed + ["moe"] * (layers - hashed)
    values["mlp_layer_types"] = tuple(mlp_types[:layers])
    head_dim = values["head_dim"]
    if cfg.get("qk_rope_head_dim") is None and cfg.get("partial_rotary_factor") is not None:
        values["qk_rope_head_dim"] = int(head_dim * cfg["partial_rotary_factor"])
    params = cfg.get("rope_parameters") or {}
    if isinstance(params.get("main"), dict) and isinstance(params.get("compress"), dict):
        main, compress = dict(params["main"]), dict(params["compress"])
    else:
        flat = {k: v for k, v in {**(cfg.get("rope_scaling") or {}), **params}.items() if k not in ("main", "compress")}
        main = {"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000.0)}
        compress = {**flat, "rope_theta": cfg.get("compress_rope_theta", 160000.0)}
    values["rope"] = RopeConfig.from_hf({"rope_parameters": main})
    # the compressed layers take YaRN's frequencies, never its cos/sin scaling (attention_factor 1)
    values["compress_rope"] = RopeConfig.from_hf({"rope_parameters": compress})
    values["num_key_value_heads"] = 1
    return DeepseekV4Config(**values)


# Per model type, the defaults of fields a config.json may omit (transformers' config classes).
_DEEPSEEK_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": dict(q_lora_rank=1536, n_routed_experts=64, n_shared_experts=2, moe_intermediate_size=1407,
                        first_k_dense_replace=0, n_group=1, topk_group=1, topk_method="greedy",
                        scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
                        num_experts_per_tok=6, rope_interleave=True),
    "deepseek_v3": {},
    "deepseek_v32": dict(index_n_heads=64, index_head_dim=128, index_topk=2048),
}


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (int(value),)


def _common_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    return dict(
        architecture=cfg["model_type"],
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rope=RopeConfig.from_hf(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
    )


def _parse_llama(cfg: dict[str, Any]) -> DenseConfig:
    bias = bool(cfg.get("attention_bias", False))
    return DenseConfig(**_common_fields(cfg), attention_bias=bias, o_proj_bias=bias,
                       mlp_bias=bool(cfg.get("mlp_bias", False)))


def _parse_qwen2(cfg: dict[str, Any]) -> DenseConfig:
    return DenseConfig(**_common_fields(cfg), attention_bias=True)


def _parse_qwen3(cfg: dict[str, Any]) -> DenseConfig:
    bias = bool(cfg.get("attention_bias", False))
    return DenseConfig(**_common_fields(cfg), attention_bias=bias, o_proj_bias=bias, qk_norm=True)


def _parse_deepseek(cfg: dict[str, Any]) -> DeepseekConfig:
    model_type = cfg["model_type"]
    values: dict[str, Any] = {**_common_fields(cfg), **_DEEPSEEK_DEFAULTS[model_type]}
    own_fields = {f.name for f in fields(DeepseekConfig)} - {f.name for f in fields(ModelConfig)}
    # null means "absent" except for q_lora_rank, where V2-Lite's null means no query compression
    values.update({k: cfg[k] for k in own_fields if k in cfg and (cfg[k] is not None or k == "q_lora_rank")})
    if values.get("mlp_layer_types") is not None:
        values["mlp_layer_types"] = tuple(values["mlp_layer_types"])
    values["num_key_value_heads"] = values["num_attention_heads"]  # MLA: one latent shared by all heads
    values["head_dim"] = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    quant = cfg.get("quantization_config") or {}
    if quant.get("quant_method") == "fp8":
        values["fp8_block_size"] = tuple(quant.get("weight_block_size") or (128, 128))
    return DeepseekConfig(**values)


HF_PARSERS = {"llama": _parse_llama, "mistral": _parse_llama, "qwen2": _parse_qwen2, "qwen3": _parse_qwen3,
              "deepseek_v2": _parse_deepseek, "deepseek_v3": _parse_deepseek, "deepseek_v32": _parse_deepseek,
              "deepseek_v4": _parse_deepseek_v4}


def parse_hf_config(cfg: dict[str, Any]) -> ModelConfig:
    """Turn a config.json dict into the architecture's config dataclass."""
    model_type = cfg.get("model_type")
    parser = HF_PARSERS.get(model_type)
    if parser is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; whale serves: {', '.join(sorted(HF_PARSERS))}")
    try:
        return parser(cfg)
    except KeyError as exc:
        raise ModelLoadError(f"config.json of a {model_type} model lacks the field {exc}") from exc


def load_hf_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    try:
        return parse_hf_config(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def gguf_to_hf_config(meta: dict[str, Any]) -> dict[str, Any]:
    """Translate GGUF metadata (llama.cpp key names) into the config.json fields of the same model."""
    arch = meta["general.architecture"]
    if arch == "deepseek2":
        return _gguf_deepseek2_config(meta)
    model_type = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}.get(arch)
    if model_type is None:
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported yet")

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    heads = key("attention.head_count")
    hidden = key("embedding_length")
    cfg: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": key("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length") or key("rope.dimension_count") or hidden // heads,
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6),
        "max_position_embeddings": key("context_length", 4096),
        "rope_theta": key("rope.freq_base", 10000.0),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    scaling_type = key("rope.scaling.type")
    if scaling_type in ("linear", "yarn"):
        cfg["rope_scaling"] = {"rope_type": scaling_type, "factor": key("rope.scaling.factor", 1.0),
                               "original_max_position_embeddings": key("rope.scaling.original_context_length")}
    return cfg


def _gguf_deepseek2_config(meta: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's deepseek2 metadata -> a DeepSeek config.json. GGUF names no topk_method: sigmoid gating means
    noaux_tc (V3/R1), softmax with expert groups group_limited_greedy (V2), otherwise greedy (V2-Lite)."""

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"deepseek2.{name}", default)

    rope_dim = key("rope.dimension_count", 64)
    qk_head_dim = key("attention.key_length_mla") or key("attention.key_length")
    sigmoid = key("expert_gating_func") == 2  # llama.cpp's ExpertGatingFuncType: 1 softmax, 2 sigmoid
    groups = key("expert_group_count", 1)
    cfg: dict[str, Any] = {
        "model_type": "deepseek_v3" if sigmoid else "deepseek_v2",
        "vocab_size": key("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": key("embedding_length"),
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": key("attention.head_count"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6),
        "max_position_embeddings": key("context_length", 4096),
        "rope_theta": key("rope.freq_base", 10000.0),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "q_lora_rank": key("attention.q_lora_rank") or None,  # llama.cpp writes 0 for V2-Lite's plain q_proj
        "kv_lora_rank": key("attention.kv_lora_rank"),
        "qk_rope_head_dim": rope_dim,
        "qk_nope_head_dim": qk_head_dim - rope_dim,
        "v_head_dim": key("attention.value_length_mla") or key("attention.value_length"),
        "first_k_dense_replace": key("leading_dense_block_count", 0),
        "moe_intermediate_size": key("expert_feed_forward_length"),
        "n_routed_experts": key("expert_count"),
        "num_experts_per_tok": key("expert_used_count"),
        "n_shared_experts": key("expert_shared_count", 0),
        "routed_scaling_factor": key("expert_weights_scale", 1.0),
        "norm_topk_prob": bool(key("expert_weights_norm", False)),
        "n_group": groups,
        "topk_group": key("expert_group_used_count", 1),
        "scoring_func": "sigmoid" if sigmoid else "softmax",
        "topk_method": "noaux_tc" if sigmoid else "group_limited_greedy" if groups > 1 else "greedy",
        "num_nextn_predict_layers": 0,  # llama.cpp's deepseek2 converter drops the MTP layers
    }
    if key("rope.scaling.type") == "yarn":
        # yarn_log_multiplier = 0.1 * mscale_all_dim; GGUF has no separate mscale (equal in released configs)
        mscale_all_dim = key("rope.scaling.yarn_log_multiplier", 0.0) / 0.1
        cfg["rope_scaling"] = {"type": "yarn", "factor": key("rope.scaling.factor", 1.0),
                               "original_max_position_embeddings": key("rope.scaling.original_context_length"),
                               "beta_fast": 32.0, "beta_slow": 1.0, "mscale": mscale_all_dim,
                               "mscale_all_dim": mscale_all_dim}
    return cfg
