"""A model's own sampling defaults (generation_config.json, a GGUF's general.sampling.* keys) reach every entry
point for the knobs a request leaves unset: the server's SamplingParams, `LLM.generate`, and `whale generate`
(whose output at the model's temperature 0 is the greedy text)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from dense_checkpoints import tiny_dense_checkpoint
from test_dense_gguf import write_dense_gguf

from whale import LLM, SamplingParams
from whale.server.protocol import ChatCompletionRequest
from whale.server.served_model import served_model_from_loaded

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"


def _chat(served, **fields) -> SamplingParams:
    request = ChatCompletionRequest(model=served.name, messages=[{"role": "user", "content": "t5 t6"}], **fields)
    return served.prepare_chat(request).params


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Qwen2 as an HF directory (with generation_config.json) and as a GGUF (with general.sampling.*)."""
    root = tmp_path_factory.mktemp("defaults")
    directory, reference = tiny_dense_checkpoint("qwen2", root / "hf")
    written = json.loads((directory / "generation_config.json").read_text())  # transformers' own: ids only
    assert "temperature" not in written
    generation = {**written, "do_sample": True, "temperature": 0.0, "top_p": 0.95, "top_k": 20}
    (directory / "generation_config.json").write_text(json.dumps(generation))
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    gguf_path = root / "tiny.gguf"
    write_dense_gguf(reference, gguf_path, "qwen2", sampling={"temp": 0.6, "min_p": 0.05, "penalty_repeat": 1.1},
                     chat_template=TEMPLATE)
    return directory, gguf_path


def test_generation_config_json_fills_what_a_request_leaves_unset_everywhere(checkpoints):
    llm = LLM(str(checkpoints[0]), dtype="float32")
    served = served_model_from_loaded(llm.loaded, llm.engine.max_model_len)
    params = _chat(served)
    assert (params.temperature, params.top_p, params.top_k) == (0.0, 0.95, 20)
    params = _chat(served, temperature=0.3, top_p=0.5)  # the request's own values win
    assert (params.temperature, params.top_p, params.top_k) == (0.3, 0.5, 20)
    assert "generation_config.json" in served.defaults.describe()
    # LLM.generate without SamplingParams takes them: the model's temperature 0 is greedy, so it repeats itself
    defaults = llm.get_default_sampling_params(max_tokens=8, ignore_eos=True)
    assert (defaults.temperature, defaults.top_p, defaults.top_k) == (0.0, 0.95, 20)
    first, second = (llm.generate("t5 t6 t7")[0].outputs[0].text for _ in range(2))
    assert first and first == second
    # `whale generate` without --temperature: the model's temperature 0, i.e. the greedy completion
    done = subprocess.run([sys.executable, "-m", "whale.cli", "generate", "t5 t6 t7", "--model", str(checkpoints[0]),
                           "--max-tokens", "8", "--dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == llm.generate("t5 t6 t7", defaults)[0].outputs[0].text + "\n"


def test_a_gguf_s_sampling_keys_are_its_defaults(checkpoints):
    llm = LLM(str(checkpoints[1]), dtype="float32")
    served = served_model_from_loaded(llm.loaded, llm.engine.max_model_len)
    for params in (_chat(served), llm.get_default_sampling_params()):
        assert (params.temperature, params.top_p, params.top_k) == (pytest.approx(0.6), 1.0, -1)
        assert (params.min_p, params.repetition_penalty) == (pytest.approx(0.05), pytest.approx(1.1))
    assert "the GGUF's metadata" in served.defaults.describe()
