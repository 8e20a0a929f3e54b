"""schemathesis against the running server's own /openapi.json (bench/fuzz.py, with fewer cases): generated
requests that fit the schema and requests it rules out, to every documented route. Every answer must be
documented for its route (status and content type), match its schema (the DeepSeek / Anthropic error bodies
included), never be a 5xx, and every request the schema rules out must be refused with a 4xx.
The engine is real: a tiny random DeepSeek-V3.2 checkpoint with the real tokenizer, so generation is fast, and a
192-token context bounds every request."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from server_harness import FUZZ_ENGINE, serving, write_tiny_deepseek

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import fuzz  # noqa: E402

CASES_PER_OPERATION_AND_MODE = 40


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory, default_llm):  # default_llm: loaded first, as the other server tests do
    from whale.models.loader import load_model

    path = write_tiny_deepseek(tmp_path_factory.mktemp("checkpoints"))
    with serving(load_model(str(path), dtype="float32"), engine_options=FUZZ_ENGINE) as served:
        yield served


def test_every_answer_is_documented_and_no_input_breaks_the_server(fuzzed_server):
    report = fuzz.run_fuzz(fuzzed_server[1], examples=CASES_PER_OPERATION_AND_MODE, seed=0)
    print(report.render())
    assert {run.label for run in report.runs} >= {"POST /chat/completions", "POST /completions", "GET /models",
                                                  "POST /anthropic/v1/messages"}
    assert report.cases >= 8 * CASES_PER_OPERATION_AND_MODE // 2
    assert not report.failures, report.render()
