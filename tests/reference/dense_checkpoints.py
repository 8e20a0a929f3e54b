"""Tiny random Llama / Qwen2 / Qwen3 checkpoints written to disk by transformers, in the real HF layout."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB = 320


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """transformers initialises biases to 0 and norms to 1; give every tensor a random value so each path
    (qkv bias, q/k norm, norm weights) changes the logits and a mistake in it shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.08 * noise)


def write_tokenizer(directory: Path) -> None:
    vocab = {f"t{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(directory / "tokenizer.json"))


def tiny_dense_checkpoint(kind: str, directory: Path, seed: int = 0, **sizes: int) -> tuple[Path, torch.nn.Module]:
    """Write a 2-layer model of `kind` (llama, llama3, qwen2, qwen3) as sharded safetensors; return the
    directory and transformers' own model as the reference. `sizes` override config fields (hidden_size, ...)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2) | sizes
    if kind == "llama":
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    elif kind == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        config, cls = LlamaConfig(**common, rope_parameters=rope), LlamaForCausalLM
    elif kind == "qwen2":
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    elif kind == "qwen3":
        config, cls = Qwen3Config(**({"head_dim": 24, "tie_word_embeddings": True} | common)), Qwen3ForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(config).eval()
    _randomize(model, seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size="60KB")
    write_tokenizer(directory)
    return directory, model
