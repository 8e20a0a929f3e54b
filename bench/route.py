"""The complexity route: how it routes the held-out prompts (tests/data/route/), what that saves in tokens against
"always thinking" and "never thinking", and what it costs in time: the decision alone (scoring included) and a
whole request through `whale serve` on the default model, `deepseek-auto` against `deepseek-chat` taking turns.

    .venv/bin/python bench/route.py [--repeats 20] [--requests 3] [--max-tokens 16]

The token estimate needs reasoning lengths this machine cannot measure on a real DeepSeek model: they are
assumptions, stated in the table (`python -m whale.route.train --help` to vary them).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import httpx
from report import Report, add_publish_option
from serve import percentile
from servers import free_port, wait_ready

from whale.route.difficulty import shipped_model
from whale.route.policy import RoutePolicy, Router
from whale.route.train import DEFAULT_DATA, heldout_report, load_examples


def decision_ms(prompts: list[str], repeats: int) -> list[float]:
    router = Router(RoutePolicy())
    out = []
    for _ in range(repeats):
        for prompt in prompts:
            start = time.perf_counter()
            router.decide(prompt)
            out.append((time.perf_counter() - start) * 1e3)
    return out


def request_ms(prompts: list[str], rounds: int, max_tokens: int) -> dict[str, list[float]]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "whale.cli", "serve", "--model", "default", "--port", str(port),
                                "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    times: dict[str, list[float]] = {"deepseek-auto": [], "deepseek-chat": []}
    try:
        wait_ready(process, url)
        with httpx.Client(timeout=120) as client:
            for round_ in range(rounds):
                for prompt in prompts:
                    for tag, model in enumerate(times):
                        # a prompt of its own for each request: no model gets the other's prefix-cache hits
                        content = f"[{round_}.{tag}] {prompt}"
                        body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                                "messages": [{"role": "user", "content": content}]}
                        start = time.perf_counter()
                        client.post(f"{url}/v1/chat/completions", json=body).raise_for_status()
                        times[model].append((time.perf_counter() - start) * 1e3)
    finally:
        process.terminate()
        process.wait(timeout=30)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="decisions per held-out prompt")
    parser.add_argument("--requests", type=int, default=3, help="rounds of the held-out prompts through the server")
    parser.add_argument("--max-tokens", type=int, default=16)
    add_publish_option(parser)
    args = parser.parse_args()
    examples = load_examples(DEFAULT_DATA)
    held = [e.prompt for e in examples if e.split == "heldout"]
    out = Report("route")
    out.line("Held-out prompts, default bands (fast < 0.5 <= think (2048-token budget) < 0.8 <= deep (the answer's "
             "room)):")
    out.line()
    for line in heldout_report(shipped_model(), examples, RoutePolicy(), answer=400, easy_reasoning=600,
                       hard_reasoning=6000, hard_share=0.2).splitlines():
        out.line(line)
    decisions = decision_ms(held, args.repeats)
    times = request_ms(held, args.requests, args.max_tokens)
    auto, chat = statistics.median(times["deepseek-auto"]), statistics.median(times["deepseek-chat"])
    p99 = percentile(decisions, 99)
    out.line()
    out.line("| time, ms (this CPU) | p50 | p99 |")
    out.line("|---|---|---|")
    out.line(f"| route decision ({len(decisions)}, scoring included) | {statistics.median(decisions):.3f} | "
             f"{p99:.3f} |")
    for model, values in times.items():
        out.line(f"| request, model {model} ({len(values)}, {args.max_tokens} tokens, default model) | "
                 f"{statistics.median(values):.1f} | {percentile(values, 99):.1f} |")
    out.line()
    out.line(f"decision p99 / request p50: {p99 / chat:.2%}; routed minus unrouted request p50: {auto - chat:+.1f} ms")
    if args.publish:
        out.publish()


if __name__ == "__main__":
    main()
