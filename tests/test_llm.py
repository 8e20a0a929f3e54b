"""The offline API on the embedded default model: vLLM's LLM / SamplingParams conventions."""

from __future__ import annotations

import pytest

from whale import SamplingParams
from whale.errors import InvalidRequestError

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,", "1, 2, 3,"]


def test_string_prompt_equals_its_token_ids(default_llm):
    params = SamplingParams(max_tokens=12, **GREEDY)
    by_text = default_llm.generate(PROMPTS[0], params)[0]
    by_ids = default_llm.generate({"prompt_token_ids": by_text.prompt_token_ids}, params)[0]
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert len(by_text.outputs[0].token_ids) == 12 and by_text.outputs[0].finish_reason == "length"
    assert by_text.outputs[0].text == default_llm.tokenizer.decode(by_text.outputs[0].token_ids,
                                                                   skip_special_tokens=True)


def test_batched_generation_equals_one_at_a_time(default_llm):
    params = SamplingParams(max_tokens=10, **GREEDY)
    batched = default_llm.generate(PROMPTS, params)
    for prompt, output in zip(PROMPTS, batched, strict=True):
        alone = default_llm.generate(prompt, params)[0]
        assert output.outputs[0].token_ids == alone.outputs[0].token_ids


def test_seeded_sampling_is_the_same_whatever_else_is_in_the_batch(default_llm):
    seeded = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=10, seed=1234, ignore_eos=True)
    alone = default_llm.generate(PROMPTS[1], seeded)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    batch = default_llm.generate(PROMPTS, [others, seeded, others])
    assert batch[1].outputs[0].token_ids == alone


def test_stop_string_truncates_and_reports_itself(default_llm):
    free = default_llm.generate(PROMPTS[1], SamplingParams(max_tokens=20, **GREEDY))[0].outputs[0].text
    stop = free[8:12]
    assert stop.strip(), "the greedy text gives a usable stop string"
    out = default_llm.generate(PROMPTS[1], SamplingParams(max_tokens=20, stop=[stop], **GREEDY))[0].outputs[0]
    assert out.text == free[:free.index(stop)]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    kept = default_llm.generate(PROMPTS[1], SamplingParams(max_tokens=20, stop=stop, include_stop_str_in_output=True,
                                                           **GREEDY))[0].outputs[0]
    assert kept.text == free[:free.index(stop) + len(stop)]


def test_stop_token_ids_and_eos(default_llm):
    free = default_llm.generate(PROMPTS[2], SamplingParams(max_tokens=8, **GREEDY))[0].outputs[0].token_ids
    out = default_llm.generate(PROMPTS[2], SamplingParams(max_tokens=8, stop_token_ids=[free[3]], **GREEDY))[0]
    assert out.outputs[0].token_ids == free[:free.index(free[3]) + 1]
    assert out.outputs[0].stop_reason == free[3]
    reply = default_llm.chat([{"role": "user", "content": "What is 2+2?"}], SamplingParams(temperature=0,
                                                                                         max_tokens=60))
    assert reply.outputs[0].finish_reason == "stop"
    assert reply.outputs[0].token_ids[-1] == default_llm.tokenizer.eos_token_id
    assert "4" in reply.outputs[0].text and "<|im_end|>" not in reply.outputs[0].text


def test_logprobs_cover_every_token(default_llm):
    out = default_llm.generate(PROMPTS[0], SamplingParams(max_tokens=5, logprobs=3, **GREEDY))[0].outputs[0]
    assert len(out.logprobs) == 5
    for token, position in zip(out.token_ids, out.logprobs, strict=True):
        assert token in position and len(position) <= 4
        assert position[token] == max(position.values())  # greedy picks the most likely token
    assert out.cumulative_logprob == pytest.approx(sum(p[t] for t, p in zip(out.token_ids, out.logprobs,
                                                                           strict=True)))


def test_a_prompt_longer_than_the_context_is_refused_with_both_numbers(default_llm):
    context = default_llm.loaded.config.max_position_embeddings
    with pytest.raises(InvalidRequestError, match=rf"{context + 5}.*{context}"):
        default_llm.generate({"prompt_token_ids": [1] * (context + 5)}, SamplingParams())


def test_out_of_vocabulary_ids_and_bad_prompts_are_refused(default_llm):
    with pytest.raises(InvalidRequestError, match="token ids"):
        default_llm.generate({"prompt_token_ids": [10**7]}, SamplingParams())
    with pytest.raises(InvalidRequestError, match="empty"):
        default_llm.generate({"prompt_token_ids": []}, SamplingParams())
    with pytest.raises(InvalidRequestError, match="prompt_token_ids"):
        default_llm.generate([{"text": "hi"}], SamplingParams())


def test_a_logits_processor_class_is_built_per_request(default_llm):
    """LLM.generate shares one SamplingParams between prompts: a processor given as a class gets an instance per
    request, whose state (here: the tokens it saw, and a ban on repeating the previous token) is that request's."""
    built = []

    class NoRepeats:
        def __init__(self):
            self.seen: list[list[int]] = []
            built.append(self)

        def __call__(self, output_ids, logits):
            self.seen.append(list(output_ids))
            if output_ids:
                logits[output_ids[-1]] = float("-inf")
            return logits

    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logits_processors=[NoRepeats])
    outputs = default_llm.generate(["The sea", "One, two, three,", "Whales"], params)
    assert len(built) == 3
    for output, processor in zip(outputs, built, strict=True):
        ids = output.outputs[0].token_ids
        assert processor.seen == [ids[:i] for i in range(len(ids))]  # its own request's tokens, each step
        assert all(a != b for a, b in zip(ids, ids[1:], strict=False))
