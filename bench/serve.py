"""The server under concurrent streaming load: whale's server next to llama-cpp-python's OpenAI server on the same
GGUF (the default model), same thread count, in the same run. For 1, 8 and 32 streaming clients it prints the
aggregate tokens/s, time to first token and inter-token latency percentiles. The two servers take turns at each
concurrency level, so neither runs while the other is measured.

    .venv/bin/python bench/serve.py [--clients 1 8 32] [--max-tokens 64] [--requests-per-client 2] [--threads 2]

Tokens are counted as streamed content chunks on both servers (each sends about one token per chunk).
llama-cpp-python runs from its own venv (bench/peers.py: built on first use under ~/.cache/whale-bench).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import peers
from report import Report, add_publish_option
from servers import free_port, wait_ready

PROMPT = "Write a long story about whale number {i}, who learns to sing."


@dataclass
class RequestTiming:
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0


@dataclass
class LevelResult:
    server: str
    clients: int
    timings: list[RequestTiming]
    wall: float

    @property
    def tokens(self) -> int:
        return sum(t.tokens for t in self.timings)


def start_servers(threads: int, max_seqs: int) -> dict[str, tuple[subprocess.Popen, str]]:
    from whale.hub import default_gguf_path

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    whale_port, llama_port = free_port(), free_port()
    whale = subprocess.Popen([sys.executable, "-m", "whale.cli", "serve", "--model", "default", "--port",
                              str(whale_port), "--max-num-seqs", str(max_seqs), "--log-level", "warning"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # queue concurrent requests instead of cutting off the one being streamed
    llama = peers.llama_cpp_server(default_gguf_path(), threads, llama_port, "--model_alias", "deepseek-chat",
                                   "--interrupt_requests", "False", env=env)
    return {"whale": (whale, f"http://127.0.0.1:{whale_port}"),
            "llama.cpp": (llama, f"http://127.0.0.1:{llama_port}")}


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> RequestTiming:
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    timing = RequestTiming()
    start = last = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if not choices[0].get("delta", {}).get("content"):
                continue
            now = time.perf_counter()
            if timing.ttft is None:
                timing.ttft = now - start
            else:
                timing.gaps.append(now - last)
            last = now
            timing.tokens += 1
    return timing


async def run_level(server: str, url: str, clients: int, per_client: int, max_tokens: int) -> LevelResult:
    async def client_loop(index: int) -> list[RequestTiming]:
        results = []
        for round_ in range(per_client):
            results.append(await one_request(http, url, PROMPT.format(i=index * per_client + round_), max_tokens))
        return results

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as http:
        start = time.perf_counter()
        nested = await asyncio.gather(*(client_loop(i) for i in range(clients)))
        wall = time.perf_counter() - start
    return LevelResult(server, clients, [t for group in nested for t in group], wall)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def report_table(results: list[LevelResult], report: Report) -> None:
    report.line("| server | clients | requests | tokens | wall s | agg tok/s | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms "
                "| ITL p50 ms | ITL p90 ms | ITL p99 ms |")
    report.line("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ttft = [t.ttft for t in r.timings if t.ttft is not None]
        gaps = [g for t in r.timings for g in t.gaps]
        cells = [percentile(ttft, q) * 1e3 for q in (50, 90, 99)] + [percentile(gaps, q) * 1e3 for q in (50, 90, 99)]
        report.line(f"| {r.server} | {r.clients} | {len(r.timings)} | {r.tokens} | {r.wall:.1f} | "
                    f"{r.tokens / r.wall:.1f} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    add_publish_option(parser)
    args = parser.parse_args()
    servers = start_servers(args.threads, max(args.clients))
    results: list[LevelResult] = []
    try:
        for process, url in servers.values():
            wait_ready(process, url)
        for name, (_, url) in servers.items():  # warm-up: first-request costs (kernels, caches) stay out
            asyncio.run(run_level(name, url, 1, 1, 8))
        for clients in args.clients:
            for name, (_, url) in servers.items():
                result = asyncio.run(run_level(name, url, clients, args.requests_per_client, args.max_tokens))
                print(f"{name} x{clients}: {result.tokens / result.wall:.1f} tok/s", file=sys.stderr)
                results.append(result)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=30)
    report = Report("serve")
    report.line(f"Streaming chat on the default model (SmolLM2-135M Q4_1 GGUF), at most {args.max_tokens} tokens, "
                f"{args.requests_per_client} requests per client, {args.threads} threads; the servers take turns")
    report.line()
    report_table(results, report)
    if args.publish:
        report.publish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
