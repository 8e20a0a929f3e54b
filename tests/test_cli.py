"""The `whale` command, run as a user runs it: a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _whale(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "whale.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_generate_prints_the_greedy_completion(default_llm):
    from whale import SamplingParams

    done = _whale("generate", "The capital of France is", "--max-tokens", "8", "--kernels", "dense",
                  "--temperature", "0")
    assert done.returncode == 0, done.stderr  # dense fp32 kernels: the same weights and math as default_llm
    expected = default_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))
    assert done.stdout == expected[0].outputs[0].text + "\n"


def test_an_unknown_kernel_choice_is_refused_with_the_choices():
    done = _whale("generate", "Hi", "--kernels", "int3")
    assert done.returncode == 2 and "choose from 'auto', 'dense', 'int4', 'hybrid'" in done.stderr


def test_chat_streams_replies_keeps_the_conversation_and_resets_it(default_llm):
    from whale import SamplingParams

    done = _whale("chat", "--temperature", "0", "--max-tokens", "40", "--kernels", "dense",
                  stdin="What is 2+2?\nSay hello.\n/reset\nSay hello.\n/exit\n")
    assert done.returncode == 0, done.stderr
    greedy = SamplingParams(temperature=0, max_tokens=40)
    ask, hello = {"role": "user", "content": "What is 2+2?"}, {"role": "user", "content": "Say hello."}
    answer = default_llm.chat([ask], greedy).outputs[0].text
    kept = default_llm.chat([ask, {"role": "assistant", "content": answer}, hello], greedy).outputs[0].text
    fresh = default_llm.chat([hello], greedy).outputs[0].text
    assert kept != fresh  # the earlier turns change this reply, so the transcript shows which prompt was used
    banner, *turns = done.stdout.split("\n> ")
    assert banner.startswith("whale chat · default (SmolLM2-135M-Instruct.Q4_1.gguf) · ")
    # each reply, then the prompt for the next line; /reset says so, /exit prints nothing
    assert turns == [answer + "\n", kept + "\n", "(conversation cleared)\n", fresh + "\n", ""]


def test_models_lists_the_default_model():
    done = _whale("models")
    assert done.returncode == 0
    default = [line.split() for line in done.stdout.splitlines() if line.startswith("default ")]
    assert len(default) == 1 and default[0][:3] == ["default", "llama", "(gguf)"]
    assert default[0][3].endswith("/SmolLM2-135M-Instruct.Q4_1.gguf") and Path(default[0][3]).is_file()
    for chat_format in ("v3", "r1", "r1-0528", "v3.1", "v3.2", "r1-distill-qwen", "r1-distill-llama"):
        assert f"  {chat_format} " in done.stdout


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    done = _whale("generate", "hi", "--model", str(tmp_path / "missing"))
    assert done.returncode == 2
    assert done.stderr.startswith("whale generate: error: cannot resolve model") and done.stderr.count("\n") == 1
    done = _whale("generate", "hi", "--temperature", "-1")
    assert (done.returncode, done.stderr) == (2, "whale generate: error: temperature must be >= 0\n")
    assert _whale("no-such-command").returncode == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for torch builds without a GPU")
def test_a_device_this_torch_cannot_use_is_one_line_saying_what_to_do():
    done = _whale("generate", "hi", "--device", "cuda")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "sees no CUDA GPU; run on --device cpu, or install a CUDA build" in done.stderr
    done = _whale("generate", "hi", "--device", "tpu")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "unknown device 'tpu': use cpu, cuda or cuda:N" in done.stderr


def test_version_and_a_summary_of_every_command():
    from whale import __version__

    done = _whale("--version")
    assert done.returncode == 0 and done.stdout == f"whale {__version__}\n"
    listing = _whale("--help").stdout
    for name in ("generate", "chat", "models", "serve", "plan"):
        line = next(line for line in listing.splitlines() if line.strip().startswith(name + " "))
        assert "see `whale" not in line and len(line.split()) > 3
