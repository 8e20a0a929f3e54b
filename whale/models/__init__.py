"""Model architectures, looked up lazily by the config's `architecture` (HF model_type)."""

from __future__ import annotations

import importlib

from torch import nn

from whale.config import ModelConfig
from whale.errors import UnsupportedModelError

# model_type -> "module:Class"; a module is imported only when a model of its family is loaded.
MODEL_REGISTRY = {
    "llama": "whale.models.dense:DenseForCausalLM",
    "mistral": "whale.models.dense:DenseForCausalLM",
    "qwen2": "whale.models.dense:DenseForCausalLM",
    "qwen3": "whale.models.dense:DenseForCausalLM",
    "deepseek_v2": "whale.models.deepseek:DeepseekForCausalLM",
    "deepseek_v3": "whale.models.deepseek:DeepseekForCausalLM",
    "deepseek_v32": "whale.models.deepseek:DeepseekForCausalLM",
    "deepseek_v4": "whale.models.deepseek_v4:DeepseekV4ForCausalLM",
}


def build_model(config: ModelConfig) -> nn.Module:
    """Instantiate the architecture's module on the meta device; weights arrive with the loader."""
    target = MODEL_REGISTRY.get(config.architecture)
    if target is None:
        raise UnsupportedModelError(f"no whale implementation for architecture {config.architecture!r}")
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)(config)
