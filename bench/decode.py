"""Single-stream decode speed on the default model: whale next to llama.cpp (llama-cpp-python), same GGUF,
same thread count, alternating rounds in one run. Prints a table with the ratio, the linear kernels whale chose
for this CPU (`auto`) next to the fp32 path, and each decode step split into model time (forward + lm_head) and
the rest (sampling, engine bookkeeping).

    .venv/bin/python bench/decode.py [--tokens 128] [--rounds 3] [--threads 2]

llama-cpp-python runs from its own venv (bench/peers.py: built on first use under ~/.cache/whale-bench).
"""

from __future__ import annotations

import argparse
import statistics
import time

from report import Report, add_publish_option

PROMPT = "Write a short story about a whale who learns to sing."


class ModelTimer:
    """Forward hooks timing the model's forward and its lm_head: what a step spends in the model."""

    def __init__(self, model):
        self.seconds, self._start = 0.0, 0.0
        for module in (model, model.lm_head):
            module.register_forward_pre_hook(self._enter)
            module.register_forward_hook(self._exit)

    def _enter(self, *_) -> None:
        self._start = time.perf_counter()

    def _exit(self, *_) -> None:
        self.seconds += time.perf_counter() - self._start


def whale_decode(llm, timer: ModelTimer, prompt_ids: list[int], tokens: int) -> tuple[float, float, float]:
    """(prefill seconds, decode tokens/s, share of decode time in the model) for one greedy request."""
    from whale import SamplingParams

    engine = llm.engine
    request = engine.add_request(prompt_ids, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    start = time.perf_counter()
    engine.step()
    prefill = time.perf_counter() - start
    timer.seconds = 0.0
    start = time.perf_counter()
    while not request.status.finished:
        engine.step()
    elapsed = time.perf_counter() - start
    return prefill, (tokens - 1) / elapsed, timer.seconds / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    add_publish_option(parser)
    args = parser.parse_args()
    import torch
    from peers import llama_cpp_decode

    from whale import LLM
    from whale.hub import default_gguf_path
    from whale.platform import cpu_flags

    torch.set_num_threads(args.threads)
    engines = {"fp32": LLM("default", dtype="float32")}
    auto = LLM("default")  # dtype and kernels chosen for this CPU (whale.platform.cpu_weight_kernels)
    if auto.loaded.kernels != "dense":
        engines[f"auto: {auto.loaded.kernels}"] = auto
    timers = {name: ModelTimer(llm.loaded.model) for name, llm in engines.items()}
    tokenizer = engines["fp32"].tokenizer
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]),
                                  add_special_tokens=False)
    for name, llm in engines.items():  # warm-up
        whale_decode(llm, timers[name], prompt_ids, 8)
    results: dict[str, list[tuple[float, float, float | None]]] = {f"whale ({name})": [] for name in engines}
    results["llama.cpp (Q4_1)"] = []
    for _ in range(args.rounds):  # alternate so every engine sees the same machine state
        for name, llm in engines.items():
            results[f"whale ({name})"].append(whale_decode(llm, timers[name], prompt_ids, args.tokens))
        results["llama.cpp (Q4_1)"].append(
            (*llama_cpp_decode(default_gguf_path(), prompt_ids, args.tokens, args.threads), None))
    peer_rate = statistics.median(r for _, r, _ in results["llama.cpp (Q4_1)"])
    report = Report("decode")
    report.line(f"Single-stream decode, {default_gguf_path().name}, {len(prompt_ids)}-token chat prompt, "
                f"{args.tokens} greedy tokens, {args.threads} threads, median of {args.rounds} alternating rounds; "
                f"avx512_bf16={'avx512_bf16' in cpu_flags()}; model ms = forward + lm_head, rest = the engine")
    report.line()
    report.line("| engine | prefill ms | decode tok/s | ms/token | model ms | rest ms | ratio vs llama.cpp |")
    report.line("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        prefill = statistics.median(p for p, _, _ in runs) * 1000
        rate = statistics.median(r for _, r, _ in runs)
        step_ms = 1000 / rate
        split = "| - | - " if runs[0][2] is None else (
            f"| {step_ms * statistics.median(m for _, _, m in runs):.1f} "
            f"| {step_ms * (1 - statistics.median(m for _, _, m in runs)):.1f} ")
        report.line(f"| {name} | {prefill:.0f} | {rate:.1f} | {step_ms:.1f} {split}| {rate / peer_rate:.2f}x |")
    if args.publish:
        report.publish()


if __name__ == "__main__":
    main()
