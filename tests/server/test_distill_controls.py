"""Token-level control on a distill: a tiny random-weight qwen2 GGUF with the real R1-Distill-Qwen tokenizer
(Qwen2's 151,665-token vocabulary and DeepSeek's added tokens, the distill's chat template), through `LLM`. The
distills always think (the prompt opens `<think>`) and end it with `</think>`, which is an ordinary added token in
their vocabulary. Random weights write anything, so what holds, holds because of the engine: over seeded requests
at temperature 1, the reasoning never passes its budget and is followed by an answer, and every finished answer
held to a JSON schema validates."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import jsonschema_rs
import pytest
from scripted_gguf import DISTILL_QWEN_BOS, DISTILL_QWEN_EOS, distill_qwen_tokenizer_json, write_random_qwen2_gguf
from test_server_budget import assert_budgets_held

from whale.sampling_params import SamplingParams, StructuredOutput

TEMPLATE = (Path(__file__).parents[1] / "chat" / "templates" / "deepseek-r1-distill.jinja").read_text()
ASK = [{"role": "user", "content": "Describe a person as JSON."}]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}


@pytest.fixture(scope="module")
def distill(tmp_path_factory, default_llm):
    from whale import LLM

    path = write_random_qwen2_gguf(tmp_path_factory.mktemp("distill") / "DeepSeek-R1-Distill-Qwen-1.5B.random.gguf",
                                   distill_qwen_tokenizer_json(), TEMPLATE, DISTILL_QWEN_EOS, DISTILL_QWEN_BOS)
    llm = LLM(str(path), dtype="float32")
    assert llm.chat_variant.name == "r1-distill-qwen" and llm.loaded.config.vocab_size > 151_000
    return llm


def test_the_budget_holds_on_a_distill(distill):
    prompt = distill.chat_prompt(ASK)
    spec = prompt.reasoning
    assert prompt.thinking and spec.starts_inside  # the template opened the think block
    rng = random.Random(1)
    budgets = [rng.randint(1, 40) for _ in range(50)]
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=budget + 12, thinking_budget=budget,
                             reasoning=spec) for seed, budget in enumerate(budgets)]
    assert_budgets_held(distill.generate([{"prompt_token_ids": prompt.ids}] * len(params), params), budgets, spec,
                        DISTILL_QWEN_EOS)


def test_every_finished_distill_answer_follows_the_schema(distill):
    prompt = distill.chat_prompt(ASK)
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=120, thinking_budget=8,
                             reasoning=prompt.reasoning, structured_output=spec) for seed in range(50)]
    finished = 0
    for output in distill.generate([{"prompt_token_ids": prompt.ids}] * len(params), params):
        completion = output.outputs[0]
        answer = completion.text.split("</think>", 1)[1].strip()
        if completion.finish_reason == "stop":
            jsonschema_rs.validate(SCHEMA, json.loads(answer))
            finished += 1
        else:
            assert completion.finish_reason == "length" and answer.startswith("{")
    assert finished >= 40


def test_budget_and_schema_hold_the_same_with_drafts(distill):
    """Speculative decoding with drafts that are right in long runs (the reply given without drafts, every 5th
    token wrong), including inside the forced end of thinking and the grammar's stretches: the same replies, so
    the same budgets and schemas hold."""
    from replay_proposer import ReplayProposer

    from whale.engine.llm_engine import EngineConfig, LLMEngine

    prompt = distill.chat_prompt(ASK)
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    budgets = [3, 9, 17, 30] * 2
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=90, thinking_budget=budget,
                             reasoning=prompt.reasoning, structured_output=spec if seed % 2 else None)
              for seed, budget in enumerate(budgets)]
    ids = [f"r{i}" for i in range(len(params))]

    def run(engine):
        requests = [engine.add_request(prompt.ids, p, request_id=i) for p, i in zip(params, ids, strict=True)]
        while engine.has_unfinished():
            engine.step()
        return requests

    plain = run(LLMEngine(distill.loaded, EngineConfig()))
    engine = LLMEngine(distill.loaded, EngineConfig())
    engine.proposer = ReplayProposer({i: list(r.output_token_ids) for i, r in zip(ids, plain, strict=True)},
                                     distill.loaded.config.vocab_size, wrong_every=5)
    engine.num_speculative_tokens = 6
    drafted = run(engine)
    assert [list(r.output_token_ids) for r in drafted] == [list(r.output_token_ids) for r in plain]
    assert engine.speculation.accepted > 200
    outputs = [SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(r.output_token_ids))]) for r in drafted]
    assert_budgets_held(outputs, budgets, prompt.reasoning, DISTILL_QWEN_EOS)
    for request in drafted[1::2]:
        if request.finish_reason == "stop":
            jsonschema_rs.validate(SCHEMA, json.loads(request.text.split("</think>", 1)[1]))
