"""Speculative decoding on an input-grounded task: the default model asked to repeat a ~1,200-token document
(whale's own docs), greedy, with prompt-lookup drafts (`--speculative ngram`) and without, single stream and
8 streams, next to llama.cpp (llama-cpp-python) with its prompt-lookup drafts (`LlamaPromptLookupDecoding`) and
without, same GGUF, same threads, alternating rounds in one run. Reports decode tok/s (after the first token),
the speed-up over whale without drafts, acceptance and mean accepted length; then, on the tiny DeepSeek-V3, the
cost of a verifying step at forced 0% and 100% acceptance (random weights make real acceptance meaningless).

    .venv/bin/python bench/speculative.py [--tokens 256] [--rounds 3] [--threads 2] [--publish]

llama-cpp-python runs from its own venv (bench/peers.py: built on first use under ~/.cache/whale-bench).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from report import ROOT, Report, add_publish_option

DOCUMENTS = ("docs/structure.md", "docs/server.md", "docs/performance.md", "docs/deepseek.md", "README.md")
DOCUMENT_TOKENS = 1200
STREAMS = 8

# llama-cpp-python, greedy, one request after another (it serves one at a time); argv: gguf, a JSON file of the
# prompts' token ids, tokens, threads, draft tokens (0: no drafts). Prints the decode tok/s over all requests.
_PEER_SCRIPT = """
import json, sys, time
import llama_cpp
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
path, tokens, threads, drafts = sys.argv[1], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
with open(sys.argv[2]) as handle:
    prompts = json.load(handle)
# drafts need every position's logits kept (logits_all), as llama-cpp-python's speculative example does
model = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=4096, verbose=False,
                        logits_all=bool(drafts),
                        draft_model=LlamaPromptLookupDecoding(num_pred_tokens=drafts) if drafts else None)
def run(prompt, count):
    model.reset()
    produced, first = 0, None
    for produced, _ in enumerate(model.generate(prompt, temp=0.0, reset=False), start=1):
        if produced == 1:
            first = time.perf_counter()
        if produced >= count:
            break
    return count - 1, time.perf_counter() - first
run(prompts[0][:64], 8)
done = [run(p, tokens) for p in prompts]
print(json.dumps(sum(t for t, _ in done) / sum(s for _, s in done)))
"""


def documents(tokenizer, count: int) -> list[str]:
    """`count` different ~DOCUMENT_TOKENS-token passages of whale's docs, cut at line ends."""
    text = "\n".join((ROOT / name).read_text() for name in DOCUMENTS)
    lines, passages, current = text.splitlines(), [], []
    for line in lines:
        current.append(line)
        if len(tokenizer.encode("\n".join(current))) >= DOCUMENT_TOKENS:
            passages.append("\n".join(current))
            current = []
            if len(passages) == count:
                return passages
    raise ValueError("not enough text for the passages")


def whale_run(engine, prompts: list[list[int]], tokens: int) -> tuple[float, float, float]:
    """(decode tok/s after each request's first token, acceptance, mean accepted length) for greedy requests."""
    from whale import SamplingParams

    stats = engine.speculation
    before = (stats.drafted, stats.accepted, stats.verifications)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    requests = [engine.add_request(p, params) for p in prompts]
    while any(not r.output_token_ids for r in requests):  # prefill (chunked) up to every first token
        engine.step()
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    rate = len(prompts) * (tokens - 1) / (time.perf_counter() - start)
    drafted, accepted, verifications = (now - then for now, then in
                                        zip((stats.drafted, stats.accepted, stats.verifications), before, strict=True))
    return rate, accepted / drafted if drafted else 0.0, 1 + accepted / verifications if verifications else 1.0


def peer_run(gguf: Path, prompts: list[list[int]], tokens: int, threads: int, drafts: int) -> float:
    from peers import llama_cpp_python

    with tempfile.NamedTemporaryFile("w", suffix=".json") as handle:  # 8 x 1,200 ids: too long for argv
        json.dump(prompts, handle)
        handle.flush()
        done = subprocess.run([str(llama_cpp_python()), "-c", _PEER_SCRIPT, str(gguf), handle.name, str(tokens),
                               str(threads), str(drafts)], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"llama-cpp-python failed: {done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def deepseek_verify_cost(report: Report, threads: int) -> None:
    """Tiny DeepSeek-V3 with its MTP layer: ms per decode step at 1 token; per verifying step of K drafts all
    refused / all accepted (a proposer that drafts a known reply, or its wrong tokens); and the MTP proposer itself
    (random weights: its acceptance means nothing, its cost does)."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from reference.deepseek_checkpoints import write_checkpoint
    from replay_proposer import ReplayProposer

    from whale import LLM, SamplingParams
    from whale.engine.llm_engine import EngineConfig, LLMEngine

    with tempfile.TemporaryDirectory() as directory:
        write_checkpoint("v3", Path(directory), seed=3, mtp=True)
        loaded = LLM(directory, dtype="float32").loaded
    prompt, tokens = list(range(2, 34)), 129
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)

    def timed(engine) -> tuple[float, int]:
        best = float("inf")
        for _ in range(3):
            request = engine.add_request(prompt, params, request_id="r")
            engine.step()
            steps, start = 0, time.perf_counter()
            while engine.has_unfinished():
                engine.step()
                steps += 1
            best = min(best, time.perf_counter() - start)
        assert request.status.finished
        return best, steps

    seconds, steps = timed(LLMEngine(loaded, EngineConfig()))
    reference = LLMEngine(loaded, EngineConfig())
    request = reference.add_request(prompt, params)
    while reference.has_unfinished():
        reference.step()
    reply = list(request.output_token_ids)
    report.line()
    config = loaded.config
    report.line(f"Tiny DeepSeek-V3 ({config.num_hidden_layers} layers + MTP, {config.n_routed_experts} experts, "
                f"hidden {config.hidden_size}, fp32, {threads} threads), {tokens - 1} greedy tokens after the first, "
                "best of 3: the cost of verifying drafts")
    report.line()
    report.line("| proposer | drafts per step | acceptance | steps | ms/step | tok/s | vs no drafts |")
    report.line("|---|---:|---:|---:|---:|---:|---:|")
    base_rate = (tokens - 1) / seconds
    report.line(f"| none | 0 | - | {steps} | {1000 * seconds / steps:.2f} | {base_rate:.0f} | 1.00x |")
    cases = [(f"forced {'0' if wrong else '100'}%", drafts, wrong) for drafts in (1, 3) for wrong in (1, 0)]
    for name, drafts, wrong in [*cases, ("mtp", 1, None), ("mtp", 3, None)]:
        engine = LLMEngine(loaded, EngineConfig(speculative="mtp" if wrong is None else "off",
                                                num_speculative_tokens=drafts if wrong is None else None))
        if wrong is not None:  # every draft token wrong (0% accepted), or none wrong (100%)
            engine.proposer = ReplayProposer({"r": reply}, 256, wrong_every=wrong)
            engine.num_speculative_tokens = drafts
        seconds, steps = timed(engine)
        rate = (tokens - 1) / seconds
        report.line(f"| {name} | {drafts} | {engine.speculation.acceptance_rate:.0%} | {steps} | "
                    f"{1000 * seconds / steps:.2f} | {rate:.0f} | {rate / base_rate:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--drafts", type=int, default=3, help="whale's draft tokens per step")
    parser.add_argument("--peer-drafts", type=int, default=10, help="llama.cpp's (LlamaPromptLookupDecoding's default)")
    add_publish_option(parser)
    args = parser.parse_args()
    import torch

    from whale import LLM
    from whale.engine.llm_engine import EngineConfig, LLMEngine
    from whale.hub import default_gguf_path

    torch.set_num_threads(args.threads)
    llm = LLM("default")
    tokenizer = llm.tokenizer
    prompts = [llm.chat_prompt([{"role": "user", "content": f"Repeat this document exactly:\n\n{doc}"}]).ids
               for doc in documents(tokenizer, STREAMS)]
    # prefix caching on: rounds after the first skip the prefill, which the figures leave out anyway
    engines = {"off": LLMEngine(llm.loaded, EngineConfig()),
               "ngram": LLMEngine(llm.loaded, EngineConfig(speculative="ngram", num_speculative_tokens=args.drafts))}
    for engine in engines.values():  # warm-up
        whale_run(engine, [prompts[0][:64]], 8)
    cases = {"1 stream": prompts[:1], f"{STREAMS} streams": prompts}
    whale: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    peer: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):  # alternate so every engine sees the same machine state
        for case, batch in cases.items():
            for name, engine in engines.items():
                whale.setdefault((case, name), []).append(whale_run(engine, batch, args.tokens))
            for drafts in (0, args.peer_drafts):
                peer.setdefault((case, drafts), []).append(
                    peer_run(default_gguf_path(), batch, args.tokens, args.threads, drafts))
    report = Report("speculative")
    report.line(f"Default model ({default_gguf_path().name}, whale's kernels: {llm.loaded.kernels}) repeating a "
                f"~{DOCUMENT_TOKENS}-token document, {args.tokens} greedy tokens per request, {args.threads} threads, "
                f"median of {args.rounds} alternating rounds; decode tok/s after each request's first token; "
                f"whale drafts {args.drafts} tokens, llama.cpp {args.peer_drafts} (prompt lookup both)")
    report.line()
    report.line("| streams | engine | decode tok/s | vs whale off | acceptance | mean accepted length |")
    report.line("|---|---|---:|---:|---:|---:|")
    for case in cases:
        base = statistics.median(r for r, _, _ in whale[(case, "off")])
        for name in engines:
            runs = whale[(case, name)]
            rate = statistics.median(r for r, _, _ in runs)
            extra = (f"{statistics.median(a for _, a, _ in runs):.0%} | "
                     f"{statistics.median(m for _, _, m in runs):.2f}") if name != "off" else "- | -"
            report.line(f"| {case} | whale {name} | {rate:.1f} | {rate / base:.2f}x | {extra} |")
        for drafts in (0, args.peer_drafts):
            rate = statistics.median(peer[(case, drafts)])
            label = "llama.cpp prompt lookup" if drafts else "llama.cpp"
            report.line(f"| {case} | {label} | {rate:.1f} | {rate / base:.2f}x | - | - |")
    deepseek_verify_cost(report, args.threads)
    if args.publish:
        report.publish()


if __name__ == "__main__":
    main()
