"""The DeepSeek lineup as planner specs: each model's real config (docs/sources.md §3), plus any
HF config.json (local path or hub id) turned into the same `ModelSpec`.

The planner never imports torch or whale's engine config: a spec is only the shape numbers it counts with.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from whale.errors import ModelNotFoundError, UnsupportedModelError
from whale.hub import hub_download

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Serving:
    """What the serving engines need to know beyond shapes: chat-format parsers and length limits.

    `reasoning` is "r1" (always thinks), "hybrid" (thinking toggled per request) or None; `tools` names the
    tool-call format ("v3", "v31", "v32", "v4") or None when the model has no function calling.
    """

    reasoning: str | None = None
    tools: str | None = None
    tokenizer_mode: str | None = None
    max_model_len: int | None = None  # a recommended serving limit below the config's maximum


@dataclass(frozen=True)
class ModelSpec:
    """The numbers of one checkpoint the planner counts with. Names follow HF config.json where one exists."""

    name: str
    hf_id: str | None
    architecture: str  # HF model_type: deepseek_v2 / _v3 / _v32 / _v4, llama, qwen2, qwen3
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_context: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    # Multi-head latent attention (V2/V3); q_lora_rank None = a plain q_proj (V2-Lite).
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # DeepSeekMoE
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    first_k_dense: int = 0
    moe_layer_freq: int = 1
    mtp_layers: int = 0
    # Lightning indexer of DeepSeek Sparse Attention (V3.2, V4)
    index_n_heads: int = 0
    index_head_dim: int = 0
    # V4 compressed attention: grouped low-rank output, per-layer token compression, raw local window
    o_lora_rank: int = 0
    o_groups: int = 0
    compress_ratios: tuple[int, ...] = ()
    sliding_window: int = 0
    native_dtype: str = "bf16"  # the released checkpoint: bf16, fp8 (128x128 blocks), fp4 (FP4 experts + FP8)
    published_total: float | None = None  # the model card's figures, shown beside ours
    published_active: float | None = None
    serving: Serving = Serving()
    display_name: str = ""

    @property
    def attention(self) -> str:
        """"mla" (latent cache), "compressed" (V4 CSA/HCA) or "gqa" (per-head K/V, MHA when kv = heads)."""
        if self.architecture == "deepseek_v4":
            return "compressed"
        return "mla" if self.kv_lora_rank else "gqa"

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def label(self) -> str:
        return self.display_name or self.hf_id or self.name

    def is_moe_layer(self, index: int) -> bool:
        return self.is_moe and index >= self.first_k_dense and index % max(1, self.moe_layer_freq) == 0


_V3 = ModelSpec(
    name="deepseek-v3", hf_id="deepseek-ai/DeepSeek-V3", architecture="deepseek_v3", display_name="DeepSeek-V3",
    hidden_size=7168, num_layers=61, num_heads=128, num_kv_heads=128, head_dim=192, intermediate_size=18432,
    vocab_size=129280, max_context=163840, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1, experts_per_token=8,
    moe_intermediate_size=2048, first_k_dense=3, mtp_layers=1, native_dtype="fp8",
    published_total=671e9, published_active=36.7e9, serving=Serving(tools="v3"),
)
_V32 = replace(_V3, name="deepseek-v3.2", hf_id="deepseek-ai/DeepSeek-V3.2", architecture="deepseek_v32",
               display_name="DeepSeek-V3.2", index_n_heads=64, index_head_dim=128, published_active=None,
               serving=Serving(reasoning="hybrid", tools="v32", tokenizer_mode="v32"))
_V2 = ModelSpec(
    name="deepseek-v2", hf_id="deepseek-ai/DeepSeek-V2-Chat", architecture="deepseek_v2",
    display_name="DeepSeek-V2", hidden_size=5120, num_layers=60, num_heads=128, num_kv_heads=128, head_dim=192,
    intermediate_size=12288, vocab_size=102400, max_context=163840, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160, n_shared_experts=2,
    experts_per_token=6, moe_intermediate_size=1536, first_k_dense=1, published_total=236e9,
    published_active=21e9,
)
_V2_LITE = replace(
    _V2, name="deepseek-v2-lite", hf_id="deepseek-ai/DeepSeek-V2-Lite-Chat", display_name="DeepSeek-V2-Lite",
    hidden_size=2048, num_layers=27, num_heads=16, num_kv_heads=16, intermediate_size=10944, q_lora_rank=None,
    n_routed_experts=64, moe_intermediate_size=1408, published_total=15.7e9, published_active=2.4e9)
# V4: public configs (HF config copies, NeMo's DeepseekV4Config defaults = Flash); layer layout per the
# model card synopsis: layers 0-1 keep only the 128-token window, then compression ratios alternate 4 / 128.
_V4_FLASH = ModelSpec(
    name="deepseek-v4-flash", hf_id="deepseek-ai/DeepSeek-V4-Flash", architecture="deepseek_v4",
    display_name="DeepSeek-V4-Flash", hidden_size=4096, num_layers=43, num_heads=64, num_kv_heads=1,
    head_dim=512, intermediate_size=0, vocab_size=129280, max_context=1048576, q_lora_rank=1024,
    qk_rope_head_dim=64, n_routed_experts=256, n_shared_experts=1, experts_per_token=6,
    moe_intermediate_size=2048, mtp_layers=1, index_n_heads=64, index_head_dim=128, o_lora_rank=1024,
    o_groups=8, compress_ratios=(0, 0) + (4, 128) * 20 + (4,), sliding_window=128, native_dtype="fp4",
    published_total=284e9, published_active=13e9,
    serving=Serving(reasoning="hybrid", tools="v4", tokenizer_mode="v4"),
)
_V4_PRO = replace(
    _V4_FLASH, name="deepseek-v4-pro", hf_id="deepseek-ai/DeepSeek-V4-Pro", display_name="DeepSeek-V4-Pro",
    hidden_size=7168, num_layers=61, num_heads=128, q_lora_rank=1536, n_routed_experts=384,
    moe_intermediate_size=3072, o_groups=16, compress_ratios=(0, 0) + (4, 128) * 29 + (4,),
    published_total=1.6e12, published_active=49e9)


def _dense(name: str, hf_id: str, arch: str, hidden: int, layers: int, heads: int, kv: int, ffn: int,
           vocab: int, total: float, **extra: Any) -> ModelSpec:
    return ModelSpec(
        name=name, hf_id=hf_id, architecture=arch, display_name=hf_id.split("/")[1], hidden_size=hidden,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=128, intermediate_size=ffn,
        vocab_size=vocab, max_context=131072, qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3",
        published_total=total, serving=Serving(reasoning="r1", max_model_len=32768), **extra)


_R1 = Serving(reasoning="r1")
CATALOG: dict[str, ModelSpec] = {spec.name: spec for spec in (
    _V2, _V2_LITE, _V3,
    replace(_V3, name="deepseek-v3-0324", hf_id="deepseek-ai/DeepSeek-V3-0324", display_name="DeepSeek-V3-0324"),
    replace(_V3, name="deepseek-r1", hf_id="deepseek-ai/DeepSeek-R1", display_name="DeepSeek-R1", serving=_R1),
    replace(_V3, name="deepseek-r1-0528", hf_id="deepseek-ai/DeepSeek-R1-0528", display_name="DeepSeek-R1-0528",
            serving=Serving(reasoning="r1", tools="v3")),
    replace(_V3, name="deepseek-v3.1", hf_id="deepseek-ai/DeepSeek-V3.1", display_name="DeepSeek-V3.1",
            serving=Serving(reasoning="hybrid", tools="v31")),
    replace(_V3, name="deepseek-prover-v2", hf_id="deepseek-ai/DeepSeek-Prover-V2-671B",
            display_name="DeepSeek-Prover-V2-671B", serving=Serving()),
    _V32,
    replace(_V32, name="deepseek-v3.2-speciale", hf_id="deepseek-ai/DeepSeek-V3.2-Speciale",
            display_name="DeepSeek-V3.2-Speciale", serving=Serving(reasoning="r1", tokenizer_mode="v32")),
    _V4_FLASH, _V4_PRO,
    _dense("r1-distill-qwen-1.5b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "qwen2", 1536, 28, 12, 2, 8960,
           151936, 1.78e9),
    _dense("r1-distill-qwen-7b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "qwen2", 3584, 28, 28, 4, 18944,
           152064, 7.62e9),
    _dense("r1-distill-llama-8b", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "llama", 4096, 32, 32, 8, 14336,
           128256, 8.03e9),
    _dense("r1-distill-qwen-14b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "qwen2", 5120, 48, 40, 8, 13824,
           152064, 14.8e9),
    _dense("r1-distill-qwen-32b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "qwen2", 5120, 64, 40, 8, 27648,
           152064, 32.8e9),
    _dense("r1-distill-llama-70b", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B", "llama", 8192, 80, 64, 8, 28672,
           128256, 70.6e9),
    _dense("r1-0528-qwen3-8b", "deepseek-ai/DeepSeek-R1-0528-Qwen3-8B", "qwen3", 4096, 36, 32, 8, 12288,
           151936, 8.19e9),
)}


def _aliases() -> dict[str, str]:
    table: dict[str, str] = {}
    for key, spec in CATALOG.items():
        short = key.removeprefix("deepseek-")
        for alias in (key, short, spec.hf_id or key, (spec.hf_id or key).split("/")[-1]):
            table[alias.lower()] = key
    return table


_ALIASES = _aliases()


def _int(cfg: dict[str, Any], key: str, default: int = 0) -> int:
    value = cfg.get(key)
    return default if value is None else int(value)


def _native_dtype(cfg: dict[str, Any]) -> str:
    quant = cfg.get("quantization_config") or {}
    if cfg.get("model_type") == "deepseek_v4":
        return "fp4"
    return "fp8" if quant.get("quant_method") == "fp8" else "bf16"


def _deepseek_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    ratios = cfg.get("compress_ratios")
    return dict(
        q_lora_rank=cfg.get("q_lora_rank") or None, kv_lora_rank=cfg.get("kv_lora_rank") or None,
        qk_nope_head_dim=_int(cfg, "qk_nope_head_dim"), qk_rope_head_dim=_int(cfg, "qk_rope_head_dim"),
        v_head_dim=_int(cfg, "v_head_dim"), n_routed_experts=_int(cfg, "n_routed_experts"),
        n_shared_experts=_int(cfg, "n_shared_experts"), experts_per_token=_int(cfg, "num_experts_per_tok"),
        moe_intermediate_size=_int(cfg, "moe_intermediate_size"),
        first_k_dense=_int(cfg, "first_k_dense_replace"), moe_layer_freq=_int(cfg, "moe_layer_freq", 1),
        mtp_layers=_int(cfg, "num_nextn_predict_layers"), index_n_heads=_int(cfg, "index_n_heads"),
        index_head_dim=_int(cfg, "index_head_dim"), o_lora_rank=_int(cfg, "o_lora_rank"),
        o_groups=_int(cfg, "o_groups"), sliding_window=_int(cfg, "sliding_window"),
        compress_ratios=tuple(int(r) for r in ratios) if ratios else (),
    )


def v4_config_json(spec: ModelSpec) -> dict[str, Any]:
    """The config.json fields of a V4 model here that shape its layers and its cache, as its checkpoint writes
    them (the engine parses them: the planner's V4 figures are checked against the engine's allocator)."""
    return {"model_type": "deepseek_v4", "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
            "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads, "head_dim": spec.head_dim,
            "q_lora_rank": spec.q_lora_rank, "moe_intermediate_size": spec.moe_intermediate_size,
            "compress_ratios": list(spec.compress_ratios), "sliding_window": spec.sliding_window,
            "index_n_heads": spec.index_n_heads, "index_head_dim": spec.index_head_dim}


SUPPORTED_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4", "llama", "qwen2", "qwen3",
                   "mistral")


def spec_from_hf_config(cfg: dict[str, Any], name: str) -> ModelSpec:
    """Turn a config.json dict into a ModelSpec; every size comes from the file."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"{name}: model_type {model_type!r} cannot be planned; supported: {', '.join(SUPPORTED_TYPES)}")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        deepseek = model_type.startswith("deepseek")
        extra = _deepseek_fields(cfg) if deepseek else {}
        if deepseek and model_type != "deepseek_v4" and not extra["kv_lora_rank"]:
            raise UnsupportedModelError(f"{name}: a {model_type} config without kv_lora_rank is not MLA")
        head_dim = cfg.get("head_dim") or (extra.get("qk_nope_head_dim", 0) + extra.get("qk_rope_head_dim", 0)
                                           if deepseek else hidden // heads)
        return ModelSpec(
            name=name, hf_id=name if _HUB_ID.match(name) else None, architecture=model_type,
            hidden_size=hidden, num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=_int(cfg, "num_key_value_heads", heads), head_dim=int(head_dim),
            intermediate_size=_int(cfg, "intermediate_size"), vocab_size=int(cfg["vocab_size"]),
            max_context=_int(cfg, "max_position_embeddings", 4096),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=model_type == "qwen3", native_dtype=_native_dtype(cfg), **extra)
    except (KeyError, TypeError, ValueError) as exc:
        raise UnsupportedModelError(f"{name}: config.json lacks or garbles the field {exc}") from exc


def _read_config(path: Path, name: str) -> ModelSpec:
    try:
        return spec_from_hf_config(json.loads(path.read_text()), name)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelNotFoundError(f"cannot read {path}: {exc}") from exc


def _hub_config(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download

    return hub_download(repo_id, "config.json", functools.partial(hf_hub_download, repo_id, "config.json"))


def resolve_model(reference: str) -> ModelSpec:
    """A catalog name or alias, a local config.json / checkpoint directory, or a hub id."""
    key = _ALIASES.get(reference.lower())
    if key is not None:
        return CATALOG[key]
    path = Path(reference).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return _read_config(path / "config.json", path.name)
    if path.is_file():
        return _read_config(path, path.parent.name)
    if _HUB_ID.match(reference) and not path.exists():
        return _read_config(_hub_config(reference), reference)
    raise ModelNotFoundError(
        f"unknown model {reference!r}: not in the catalog ({', '.join(sorted(CATALOG))}), "
        "not a directory holding config.json, not a config.json file and not a hub id like org/name")
