"""The reasoning budget on a tiny random DeepSeek-V3 checkpoint with the real DeepSeek tokenizer. Random weights
write anything (they never end their thinking on their own), which makes them a good adversary: over seeded
requests at temperature 1, in the V3.2 format (the end is `</think>`) and the R1 format (`\\n</think>\\n\\n`), the
reasoning never exceeds the budget and the answer is never empty; through the server, `budget_tokens` (OpenAI
shape, Anthropic shape) and `reasoning_effort` pick the budget, always leaving room for the answer."""

from __future__ import annotations

import random

import pytest
from scripted_engine import deepseek_v32_served

from whale.chat import ChatVariant
from whale.sampling_params import SamplingParams
from whale.server.anthropic_api import MessagesRequest, to_chat_request
from whale.server.protocol import ChatCompletionRequest

ASK = [{"role": "user", "content": "What is 2 + 2?"}]
EOS = 1


@pytest.fixture(scope="module")
def llm(tiny_path, default_llm):  # default_llm: the session's model, loaded before the timing-sensitive work
    from whale import LLM

    return LLM(str(tiny_path), dtype="float32")


@pytest.mark.parametrize("variant", ["v3.2", "r1"])
def test_the_budget_holds_over_seeded_requests_at_temperature_1(llm, variant):
    llm.chat_variant = ChatVariant(variant)
    prompt = llm.chat_prompt(ASK, thinking=True)
    spec = prompt.reasoning
    rng = random.Random(0)
    budgets = [rng.randint(1, 40) for _ in range(50)]
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=budget + 16, thinking_budget=budget,
                             reasoning=spec) for seed, budget in enumerate(budgets)]
    assert_budgets_held(llm.generate([{"prompt_token_ids": prompt.ids}] * len(params), params), budgets, spec, EOS)


def assert_budgets_held(outputs, budgets: list[int], spec, eos: int) -> None:
    """Each output's reasoning (up to the end of thinking and the format's tail after it) is within its budget,
    and an answer follows that does not end at once."""
    for budget, output in zip(budgets, outputs, strict=True):
        ids = output.outputs[0].token_ids
        assert spec.end_id in ids, "thinking was not ended"
        reasoning = ids.index(spec.end_id) + 1 + (len(spec.forced_end) - 1 - spec.forced_end.index(spec.end_id))
        assert max(len(spec.forced_end), 1) <= reasoning <= max(budget, len(spec.forced_end))
        assert len(ids) > reasoning and ids[reasoning] != eos


def test_budget_tokens_reach_the_engine_and_usage_counts_exactly(tiny_server):
    _, client = tiny_server
    for seed in range(5):
        reply = client.chat.completions.create(
            model="deepseek-reasoner", messages=ASK, max_tokens=40, seed=seed,
            extra_body={"thinking": {"type": "enabled", "budget_tokens": 8}})
        reasoning = reply.usage.completion_tokens_details.reasoning_tokens
        assert 0 < reasoning <= 8 < reply.usage.completion_tokens  # the answer had its tokens
        assert reply.choices[0].message.model_extra["reasoning_content"] is not None


def test_where_a_budget_comes_from():
    served = deepseek_v32_served(max_model_len=200_000)

    def budget(max_tokens=32768, **fields):
        request = ChatCompletionRequest(model="deepseek-reasoner", messages=ASK, max_tokens=max_tokens, **fields)
        return served.prepare_chat(request).params.thinking_budget

    assert budget(thinking={"type": "enabled", "budget_tokens": 500}) == 500
    assert budget(reasoning_effort="low") == 1024 and budget(reasoning_effort="medium") == 4096
    assert budget() == 32768 - 256  # none asked for: the answer keeps its room
    assert budget(reasoning_effort="max") == 32768 - 256
    assert budget(thinking={"type": "enabled", "budget_tokens": 40_000}) == 32768 - 256
    assert budget(max_tokens=100, thinking={"type": "enabled", "budget_tokens": 90}) == 50  # half stays
    assert budget(max_tokens=100) is None  # too small to keep a room for: as asked
    served.thinking_budget = 2000
    assert budget() == 2000
    anthropic = MessagesRequest.model_validate({"model": "claude-sonnet-4", "max_tokens": 4000, "messages": ASK,
                                                "thinking": {"type": "enabled", "budget_tokens": 1500}})
    assert served.prepare_chat(to_chat_request(anthropic, served), clamp_max_tokens=True).params.thinking_budget \
        == 1500
    chat = ChatCompletionRequest(model="deepseek-chat", messages=ASK, max_tokens=4000)
    assert served.prepare_chat(chat).params.thinking_budget is None  # no thinking, no budget
