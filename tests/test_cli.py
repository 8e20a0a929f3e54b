"""The `whale` command, run as a user runs it: a real subprocess."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch


def _whale(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "whale.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_generate_prints_the_greedy_completion(default_llm):
    from whale import SamplingParams

    done = _whale("generate", "The capital of France is", "--max-tokens", "8", "--kernels", "dense",
                  "--temperature", "0", "--speculative", "ngram")  # drafts never change a greedy reply
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


class _Transcript:
    """A running `whale chat` whose stdout a thread collects, so the test can wait for what it prints."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "whale.cli", "chat", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.text = ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while chunk := self.proc.stdout.read(1):
            self.text += chunk

    def wait_for(self, predicate, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.text):
            assert time.monotonic() < deadline and self.proc.poll() is None, (self.text, self.proc.stderr.read())
            time.sleep(0.01)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()


def test_chat_ctrl_c_stops_the_reply_and_keeps_the_conversation(default_llm):
    from whale import SamplingParams

    chat = _Transcript("--temperature", "0", "--max-tokens", "100", "--kernels", "dense")
    chat.wait_for(lambda text: text.count("\n> ") == 1)
    chat.send("Write a long story about a dragon.")
    chat.wait_for(lambda text: len(text.split("\n> ")[1]) >= 3)  # the reply has begun
    chat.proc.send_signal(signal.SIGINT)
    chat.wait_for(lambda text: text.count("\n> ") == 2)  # stopped, and back at the prompt
    chat.send("Who is in it?")
    chat.wait_for(lambda text: text.count("\n> ") == 3)
    chat.send("/exit")
    assert chat.proc.wait(timeout=60) == 0 and "Traceback" not in chat.proc.stderr.read()
    _, stopped, second, _ = chat.text.split("\n> ")
    assert stopped.endswith(" [stopped]\n")
    shown = stopped.removesuffix(" [stopped]\n")
    greedy = SamplingParams(temperature=0, max_tokens=100)
    story = {"role": "user", "content": "Write a long story about a dragon."}
    full = default_llm.chat([story], greedy).outputs[0].text
    assert shown and full.startswith(shown) and len(shown) < len(full)  # cut short, as far as it had come
    # the next turn sees the story as far as it was shown
    kept = [story, {"role": "assistant", "content": shown}, {"role": "user", "content": "Who is in it?"}]
    assert second == default_llm.chat(kept, greedy).outputs[0].text + "\n"


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
    done = _whale("generate", "hi", "--speculative", "mtp")
    assert done.returncode == 2 and "needs a DeepSeek checkpoint" in done.stderr and done.stderr.count("\n") == 1
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
