"""Long contexts: DeepSeek-V4's compressed cache against V3's latent cache. Tiny random V4 and V3 models of the same
width (4 layers, hidden 256; V4 with the released window, compression rates and indexer top-k), each with a
context of 4k, 32k and 128k tokens in whale's paged cache: cache bytes a token (and a sequence's fixed part) and
decode tok/s, in the same run. Then the cache of the real V4-Flash / V4-Pro shapes as whale's allocator lays it out.

The context is given as cache rows (written by steps that run no model, so zeros) rather than prefilled: decode
speed depends on how many rows a step reads, not on their values.

    .venv/bin/python bench/long_context.py [--contexts 4096,32768,131072] [--tokens 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from deepseek_tiny import build_checkpoint, write_tokenizer
from report import Report, add_publish_option

from whale.config import parse_hf_config
from whale.engine.paged_attention import PagedKVCache, create_cache
from whale.models.deepseek_v4 import cache_spec
from whale.models.loader import load_model
from whale.planner.catalog import CATALOG, v4_config_json

V4 = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, head_dim=128,
          partial_rotary_factor=0.25, q_lora_rank=128, o_groups=2, o_lora_rank=128, moe_intermediate_size=128,
          n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, index_n_heads=8, index_head_dim=64,
          index_topk=512, sliding_window=128, compress_ratios=[0, 4, 128, 4], num_hash_layers=1,
          max_position_embeddings=262144, bos_token_id=0, eos_token_id=1)
FILL_CHUNK = 1024
WARMUP = 2


def build_v4(directory: Path) -> None:
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**V4))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            noise = torch.randn(tensor.shape, generator=generator)
            tensor.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else 0.1 * noise)
    model.save_pretrained(directory)
    write_tokenizer(directory)


def decode_rate(model, context: int, tokens: int) -> tuple[float, float, float]:
    """tok/s of `tokens` one-token steps after `context` tokens (and WARMUP untimed ones); the cache's bytes a
    token and a sequence's fixed bytes."""
    spec = model.kv_cache_spec()
    cache = create_cache(spec, torch.float32, num_blocks=-(-(context + tokens) // 16) + 1, max_num_seqs=1,
                         max_num_batched_tokens=FILL_CHUNK)
    for start in range(0, context, FILL_CHUNK):
        cache.begin_step([0], [min(FILL_CHUNK, context - start)])
        cache.end_step()
    ids = torch.randint(2, 1000, (tokens + WARMUP,))
    with torch.inference_mode():
        for step in range(tokens + WARMUP):
            if step == WARMUP:  # the first steps allocate and fault in what the others reuse: not timed
                began = time.perf_counter()
            cache.begin_step([0], [1])
            model.compute_logits(model(ids[step:step + 1], torch.tensor([context + step]), cache))
            cache.end_step()
        seconds = time.perf_counter() - began
    return tokens / seconds, *cache.footprint()


def real_shapes(report: Report) -> None:
    report.line("| model | cache bytes / token (bf16) | fixed / sequence | one sequence at 128k | at 1M |")
    report.line("|---|---|---|---|---|")
    for name in ("deepseek-v4-flash", "deepseek-v4-pro"):
        spec = cache_spec(parse_hf_config(v4_config_json(CATALOG[name])))
        per_token, fixed = PagedKVCache(spec, 64, 16, torch.bfloat16, max_num_seqs=1).footprint()
        report.line(f"| {CATALOG[name].label} | {per_token:,.0f} | {fixed / 2**20:.1f} MiB | "
                    f"{(per_token * 131072 + fixed) / 2**30:.2f} GiB | {(per_token * 2**20 + fixed) / 2**30:.2f} GiB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="4096,32768,131072")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    add_publish_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(2)
    contexts = [int(c) for c in args.contexts.split(",")]
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(Path(tmp) / "v3", width=4)
        build_v4(Path(tmp) / "v4")
        for name in ("v3", "v4"):
            models[name] = load_model(str(Path(tmp) / name), dtype="float32", device="cpu").model
    report = Report("long_context")
    report.line(f"tiny V3 (MLA latent 64 + 16) and tiny V4 (window 128, CSA 4 with top-512, HCA 128), 4 layers, "
                f"hidden 256, fp32, {torch.get_num_threads()} threads; {args.tokens} decode steps after the context "
                f"({WARMUP} untimed before), best of {args.repeats}")
    report.line()
    report.line("| context | V3 cache B/token | V4 cache B/token (+ fixed) | V3 tok/s | V4 tok/s | V4 / V3 |")
    report.line("|---|---|---|---|---|---|")
    for context in contexts:
        runs: dict[str, list[tuple[float, float, float]]] = {"v3": [], "v4": []}
        for _ in range(args.repeats):  # alternating, so a noisy neighbour hits both alike; the best of each
            for name, model in models.items():
                runs[name].append(decode_rate(model, context, args.tokens))
        (v3_rate, v3_bytes, _), (v4_rate, v4_bytes, v4_fixed) = max(runs["v3"]), max(runs["v4"])
        report.line(f"| {context:,} | {v3_bytes:,.0f} | {v4_bytes:,.0f} (+{v4_fixed / 2**20:.2f} MiB) | "
                    f"{v3_rate:.1f} | {v4_rate:.1f} | {v4_rate / v3_rate:.2f}x |")
    report.line()
    real_shapes(report)
    if args.publish:
        report.publish()


if __name__ == "__main__":
    main()
