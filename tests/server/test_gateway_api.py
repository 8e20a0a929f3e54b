"""What a whale replica answers to SGLang's gateway and to fronts: SGLang's `/generate` (its shapes, streamed and
not) and vLLM's extras on `/v1/completions` (token ids in and out, logprobs keyed by id), each checked against the
same request through whale's own engine (`LLM.generate`) on the default model."""

from __future__ import annotations

import json

import httpx
import pytest

from whale import SamplingParams

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def expected(default_llm):
    """Greedy, 8 tokens, through the offline engine: (prompt ids, output ids, text)."""
    ids = default_llm.tokenizer.encode(PROMPT)
    out = default_llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=8))[0]
    return ids, list(out.outputs[0].token_ids), out.outputs[0].text


def test_generate_as_sglang_answers(default_url, expected):
    ids, output, text = expected
    body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 8}}
    reply = httpx.post(f"{default_url}/generate", json=body, timeout=60).json()
    assert reply["output_ids"] == output and reply["text"] == text
    meta = reply["meta_info"]
    assert meta["prompt_tokens"] == len(ids) and meta["completion_tokens"] == 8
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    by_text = httpx.post(f"{default_url}/generate", json={"text": PROMPT, "sampling_params": body["sampling_params"]},
                         timeout=60).json()
    assert by_text["output_ids"] == output


def test_generate_streams_incrementally(default_url, expected):
    ids, output, text = expected
    body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 8}, "stream": True,
            "return_logprob": True, "top_logprobs_num": 2}
    payloads = []
    with httpx.stream("POST", f"{default_url}/generate", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                payloads.append(json.loads(line[6:]))
    assert [t for p in payloads for t in p["output_ids"]] == output
    assert "".join(p["text"] for p in payloads) == text
    assert payloads[-1]["meta_info"]["completion_tokens"] == 8
    logprobs = [entry for p in payloads for entry in p["meta_info"]["output_token_logprobs"]]
    assert [entry[1] for entry in logprobs] == output and all(entry[0] <= 0 for entry in logprobs)
    tops = [top for p in payloads for top in p["meta_info"]["output_top_logprobs"]]
    assert all(len(top) == 2 and top[0][0] >= top[1][0] for top in tops)


def test_generate_refuses_what_it_cannot_do(default_url):
    both = httpx.post(f"{default_url}/generate", json={"text": "a", "input_ids": [1]})
    assert both.status_code in (400, 422) and "exactly one of 'text' and 'input_ids'" in both.text
    ebnf = httpx.post(f"{default_url}/generate", json={"text": "a", "sampling_params": {"ebnf": "root ::= 'a'"}})
    assert ebnf.status_code == 400 and "'ebnf' grammars are not taken here" in ebnf.json()["error"]["message"]


def test_gateway_probes(default_url):
    info = httpx.get(f"{default_url}/server_info").json()
    assert info["served_model_name"] == "smollm2-135m-instruct" and info["dp_size"] == 1
    assert httpx.get(f"{default_url}/get_model_info").json()["is_generation"] is True
    load = httpx.get(f"{default_url}/get_load").json()
    assert load == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": load[0]["num_tokens"]}]


def test_completions_take_vllm_extras(default_url, expected):
    ids, output, text = expected
    body = {"model": "smollm2-135m-instruct", "prompt": ids, "max_tokens": 8, "temperature": 0,
            "return_token_ids": True, "logprobs": 1, "return_tokens_as_token_ids": True}
    choice = httpx.post(f"{default_url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert choice["token_ids"] == output and choice["prompt_token_ids"] == ids and choice["text"] == text
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in output]
    streamed, prompt_ids = [], None
    with httpx.stream("POST", f"{default_url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for chunk_choice in json.loads(line[6:])["choices"]:
                    streamed += chunk_choice.get("token_ids", [])
                    prompt_ids = prompt_ids or chunk_choice.get("prompt_token_ids")
    assert streamed == output and prompt_ids == ids


def test_completions_min_tokens_and_stop_token_ids(default_url, expected):
    ids, output, _ = expected
    body = {"model": "smollm2-135m-instruct", "prompt": ids, "max_tokens": 8, "temperature": 0,
            "return_token_ids": True, "stop_token_ids": [output[2]]}
    choice = httpx.post(f"{default_url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert choice["token_ids"] == output[:3] and choice["finish_reason"] == "stop"
    held = httpx.post(f"{default_url}/v1/completions", json={**body, "min_tokens": 4}, timeout=60).json()["choices"][0]
    assert len(held["token_ids"]) > 3  # the stop id does not count before min_tokens
