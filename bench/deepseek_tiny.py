"""Tiny DeepSeek-V3 (4 layers, 16 routed experts, random weights): greedy decode of 128 tokens, whale next to
transformers' generate() in the same run, alternating, best of N; plus the KV-cache bytes per token of each.

    .venv/bin/python bench/deepseek_tiny.py [--tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from report import Report, add_publish_option
from tokenizers import Tokenizer, models, pre_tokenizers

from whale import LLM
from whale.sampling_params import SamplingParams

VOCAB = 1024
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
              num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=24, kv_lora_rank=16,
              qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, n_shared_experts=1,
              num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, norm_topk_prob=True,
              routed_scaling_factor=2.5, max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32,
                               "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                               "original_max_position_embeddings": 128})


def build_checkpoint(directory: Path, width: int = 1) -> torch.nn.Module:
    """`width` multiplies hidden, FFN, expert and latent sizes (1: overhead-bound; 4: weight-bandwidth-bound)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    scaled = ("hidden_size", "intermediate_size", "moe_intermediate_size", "q_lora_rank", "kv_lora_rank")
    config = {**CONFIG, **{k: CONFIG[k] * width for k in scaled}}
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**config)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if "inv_freq" not in name:
                noise = torch.randn(tensor.shape, generator=generator)
                tensor.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)
    model.save_pretrained(directory)
    write_tokenizer(directory)
    return model


def write_tokenizer(directory: Path) -> None:
    """A word-level tokenizer of the VOCAB ids ("t0" ... ), bos t0, eos t1."""
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t2"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "t0", "eos_token": "t1"}))


def hf_cache_bytes_per_token(model: torch.nn.Module, prompt: torch.Tensor) -> float:
    """Bytes transformers' own cache holds per token, measured on a forward over the prompt."""
    with torch.inference_mode():
        cache = model(prompt, use_cache=True).cache
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return total / prompt.shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=1, help="scale hidden/FFN/latent sizes (4 = hidden 256)")
    add_publish_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(2)
    prompt = list(range(10, 42))
    with tempfile.TemporaryDirectory() as tmp:
        reference = build_checkpoint(Path(tmp), args.width)
        llm = LLM(tmp, dtype="float32", device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    ids = torch.tensor([prompt])
    timings: dict[str, list[float]] = {"whale": [], "transformers": []}
    outputs = {}
    for _ in range(args.repeats):  # alternate so a noisy neighbour hits both alike
        start = time.perf_counter()
        outputs["whale"] = llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0].token_ids
        timings["whale"].append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.inference_mode():
            generated = reference.generate(ids, max_new_tokens=args.tokens, do_sample=False, eos_token_id=None,
                                           pad_token_id=0)
        timings["transformers"].append(time.perf_counter() - start)
        outputs["transformers"] = generated[0, len(prompt):].tolist()
    config = llm.loaded.config
    latent_bytes = llm.engine.cache.bytes_per_token()
    decompressed = config.num_hidden_layers * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * 4
    best = {name: min(values) for name, values in timings.items()}
    report = Report("deepseek_tiny")
    report.line(f"tiny DeepSeek-V3: {config.num_hidden_layers} layers, {config.n_routed_experts} experts "
                f"(top-{config.num_experts_per_tok}), hidden {config.hidden_size}, fp32, "
                f"{torch.get_num_threads()} threads, prompt {len(prompt)}, greedy {args.tokens} tokens, best of "
                f"{args.repeats}")
    report.line()
    report.line("| engine | s | tok/s | ms/token | KV bytes/token |")
    report.line("|---|---|---|---|---|")
    hf_bytes = hf_cache_bytes_per_token(reference, ids)
    for name, kv in (("whale", latent_bytes), ("transformers", hf_bytes)):
        seconds = best[name]
        report.line(f"| {name} | {seconds:.3f} | {args.tokens / seconds:.1f} | "
                    f"{1000 * seconds / args.tokens:.2f} | {kv:,.0f} |")
    report.line()
    report.line(f"speedup whale / transformers: {best['transformers'] / best['whale']:.1f}x; "
                f"identical tokens: {outputs['whale'] == outputs['transformers']}; "
                f"decompressed per-head K/V would be {decompressed:,} B/token")
    if args.publish:
        report.publish()


if __name__ == "__main__":
    main()
