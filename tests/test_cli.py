"""The `whale` command, run as a user runs it: a real subprocess."""

from __future__ import annotations

import subprocess
import sys


def _whale(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "whale.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_generate_prints_the_greedy_completion(default_llm):
    from whale import SamplingParams

    done = _whale("generate", "The capital of France is", "--max-tokens", "8", "--kernels", "dense")
    assert done.returncode == 0, done.stderr  # dense fp32 kernels: the same weights and math as default_llm
    expected = default_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))
    assert done.stdout == expected[0].outputs[0].text + "\n"


def test_an_unknown_kernel_choice_is_refused_with_the_choices():
    done = _whale("generate", "Hi", "--kernels", "int3")
    assert done.returncode == 2 and "choose from 'auto', 'dense', 'int4', 'hybrid'" in done.stderr


def test_chat_streams_replies_and_keeps_the_conversation():
    done = _whale("chat", "--temperature", "0", "--max-tokens", "40",
                  stdin="What is 2+2?\n/reset\nSay hello.\n/exit\n")
    assert done.returncode == 0, done.stderr
    assert "4" in done.stdout and "whale chat" in done.stdout


def test_models_lists_the_default_model():
    done = _whale("models")
    assert done.returncode == 0
    assert "default" in done.stdout and "SmolLM2-135M-Instruct.Q4_1.gguf" in done.stdout
    for chat_format in ("v3", "r1", "r1-0528", "v3.1", "v3.2", "r1-distill-qwen", "r1-distill-llama"):
        assert f"  {chat_format} " in done.stdout


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    done = _whale("generate", "hi", "--model", str(tmp_path / "missing"))
    assert done.returncode == 2
    assert "cannot resolve model" in done.stderr and "Traceback" not in done.stderr
    done = _whale("generate", "hi", "--temperature", "-1")
    assert done.returncode == 2 and "temperature must be >= 0" in done.stderr
    assert _whale("no-such-command").returncode == 2
