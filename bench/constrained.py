"""What a grammar costs: the default model writing JSON held to a schema (llguidance), against the same model writing
the same number of tokens unconstrained, at 1 and 16 concurrent requests, in the same run; and the grammar's own
share of a step (the time spent computing masks, per token). Then the sampler: a step's sampling for 1, 16 and 64
rows in one batched call, one call per row, and the per-row sampler it replaced, on the default model's, DeepSeek's
and the Qwen distills' vocabularies.

    .venv/bin/python bench/constrained.py [--rounds 3] [--publish]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from report import Report, add_publish_option

from whale import LLM, SamplingParams
from whale.engine import grammar, sampler
from whale.sampling_params import StructuredOutput

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "skills", "city"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "maximum": 120},
                         "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
                         "city": {"type": "string", "maxLength": 24}}}
MESSAGES = [{"role": "user", "content": "Invent a person and describe them as JSON with name, age, skills and city."}]


class MaskClock:
    """Wraps GrammarController.allowed to add up the time spent computing masks."""

    def __init__(self) -> None:
        self.seconds, self.calls = 0.0, 0
        self._original = grammar.GrammarController.allowed

        def timed(controller):
            start = time.perf_counter()
            try:
                return self._original(controller)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        grammar.GrammarController.allowed = timed


def run(llm: LLM, ids: list[int], params: list[SamplingParams]) -> tuple[list[int], float]:
    """Each request's generated length, and the seconds the batch took."""
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids}] * len(params), params)
    return [len(o.outputs[0].token_ids) for o in outputs], time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    add_publish_option(parser)
    args = parser.parse_args()
    llm = LLM("default", enable_prefix_caching=False)  # both sides compute the prompt
    ids = llm.chat_prompt(MESSAGES).ids
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    # warm-up: the grammar's view of the tokenizer is built once per tokenizer (~1 s; a server builds it on a
    # request's worker thread, never in a step)
    run(llm, ids, [SamplingParams(max_tokens=4, structured_output=spec)])
    clock = MaskClock()
    report = Report("constrained")
    report.line("The default model (SmolLM2-135M, Q4_1) writing JSON held to a 4-field schema by llguidance, and "
                "the same number of tokens per request unconstrained (`ignore_eos`), same run, prefix cache off; "
                f"median of {args.rounds} rounds")
    report.line()
    report.line("| concurrent | constrained tok/s | unconstrained tok/s | overhead | mask ms/token | tokens/request |")
    report.line("|---:|---:|---:|---:|---:|---:|")
    for batch in (1, 16):
        constrained, free, masks, lengths = [], [], [], []
        for round_index in range(args.rounds):
            params = [SamplingParams(temperature=0.7, seed=round_index * 100 + i, max_tokens=160,
                                     structured_output=spec) for i in range(batch)]
            clock.seconds, clock.calls = 0.0, 0
            counts, seconds = run(llm, ids, params)
            constrained.append(sum(counts) / seconds)
            masks.append(clock.seconds / max(clock.calls, 1) * 1e3)
            lengths.append(sum(counts) / batch)
            # the same lengths, request by request: the batch thins out as it did constrained
            plain = [SamplingParams(temperature=0.7, seed=i, max_tokens=count, ignore_eos=True)
                     for i, count in enumerate(counts)]
            counts, seconds = run(llm, ids, plain)
            free.append(sum(counts) / seconds)
        c, f = statistics.median(constrained), statistics.median(free)
        report.line(f"| {batch} | {c:.1f} | {f:.1f} | {(1 - c / f) * 100:.1f}% | {statistics.median(masks):.3f} | "
                    f"{statistics.median(lengths):.0f} |")
    report.line()
    sampling_table(report, llm)
    if args.publish:
        report.publish()
    return 0


def previous_sample(logits: torch.Tensor, state: sampler.SamplingState) -> int:
    """The sampler the engine ran before, one row at a time, for the settings measured here: temperature, top-p by
    sorting the whole vocabulary, an inverse-CDF draw over it in float64."""
    p = state.params
    logits = logits / p.temperature
    sorted_logits, order = logits.sort(descending=True)
    probs = sorted_logits.softmax(-1)
    drop = (probs.cumsum(-1) - probs) >= p.top_p
    drop[0] = False
    probs = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf")).softmax(-1)
    cumulative = probs.double().cumsum(0)
    point = torch.rand((), generator=state.generator, dtype=torch.float64) * cumulative[-1]
    return int(torch.searchsorted(cumulative, point.reshape(1), right=True).clamp_(max=len(probs) - 1))


def sampling_table(report: Report, llm: LLM) -> None:
    """A step's sampling with R1's recommended settings (temperature 0.6, top_p 0.95), seeded per row: the batched
    sampler in one call, the same sampler one call per row, and the sampler it replaced (per row), same run."""
    report.line("Sampling one step at temperature 0.6, top_p 0.95, per-row seeds: ms per step; the batched sampler "
                "in one call, one call per row, and the per-row sampler it replaced (top-p by a full sort)")
    report.line()
    report.line("| vocabulary | rows | batched | batched, a call per row | previous | speed-up over previous |")
    report.line("|---|---:|---:|---:|---:|---:|")
    vocabularies = {f"{llm.loaded.config.vocab_size} (default model)": llm.loaded.config.vocab_size,
                    "129280 (DeepSeek V3)": 129280, "152064 (Qwen2 distills)": 152064}
    for name, vocab in vocabularies.items():
        for rows in (1, 16, 64):
            logits = torch.randn(rows, vocab) * 3
            states = [sampler.SamplingState(SamplingParams(temperature=0.6, top_p=0.95, seed=i), [])
                      for i in range(rows)]

            def batched(logits=logits, states=states):
                sampler.sample_batch(logits.clone(), states)

            def per_row(logits=logits, states=states):
                for row, state in zip(logits, states, strict=True):
                    sampler.sample_batch(row.unsqueeze(0).clone(), [state])

            def previous(logits=logits, states=states):
                for row, state in zip(logits, states, strict=True):
                    previous_sample(row, state)

            timings = {}
            for label, fn in (("batched", batched), ("per row", per_row), ("previous", previous)):
                for _ in range(2):
                    fn()
                start = time.perf_counter()
                repeats = max(3, 48 // rows)
                for _ in range(repeats):
                    fn()
                timings[label] = (time.perf_counter() - start) / repeats * 1e3
            report.line(f"| {name} | {rows} | {timings['batched']:.2f} | {timings['per row']:.2f} | "
                        f"{timings['previous']:.2f} | {timings['previous'] / timings['batched']:.1f}x |")


if __name__ == "__main__":
    sys.exit(main())
