"""Model references: default, .gguf files, checkpoint directories, hub ids (offline, against a hub-layout cache)."""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from whale import LLM, SamplingParams
from whale.errors import ModelNotFoundError
from whale.hub import HUB_ALLOW_PATTERNS, resolve_model

sys.path.insert(0, str(Path(__file__).parent / "reference"))
from dense_checkpoints import tiny_dense_checkpoint  # noqa: E402


def test_default_resolves_to_the_gguf_inside_site_packages():
    files = resolve_model("default")
    assert files.format == "gguf"
    assert files.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "site-packages" in files.path.parts


def test_gguf_file_and_checkpoint_directory(tmp_path):
    gguf = resolve_model("default").path
    assert resolve_model(str(gguf)).path == gguf
    directory, _ = tiny_dense_checkpoint("llama", tmp_path / "ckpt")
    files = resolve_model(str(directory))
    assert (files.format, files.path) == ("hf", directory)


def test_missing_path_names_what_was_tried(tmp_path):
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model(str(tmp_path / "nope"))
    message = str(error.value)
    assert "local path" in message and "hub id" in message and "nope" in message


def test_directory_without_a_checkpoint_is_explained(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        resolve_model(str(tmp_path))


def test_a_non_gguf_file_is_refused(tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        resolve_model(str(weights))


def test_allow_patterns_take_weights_configs_and_tokenizers_only():
    def fetched(name: str) -> bool:
        return any(fnmatch.fnmatch(name, pattern) for pattern in HUB_ALLOW_PATTERNS)

    for wanted in ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json",
                   "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert fetched(wanted), wanted
    for unwanted in ("pytorch_model.bin", "consolidated.pth", "model.gguf"):
        assert not fetched(unwanted), unwanted


def _hub_cache(root: Path, repo_id: str, source: Path) -> None:
    """Lay out `source` the way huggingface_hub caches a downloaded snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


# nothing listens on the discard port: a hub that refuses connections, as a machine without a network sees it
UNREACHABLE = {"HF_ENDPOINT": "http://127.0.0.1:9"}


def _whale(args: list[str], cache: Path, network: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(network or {"HF_HUB_OFFLINE": "1"}), "HF_HUB_CACHE": str(cache),
           "HF_HOME": str(cache.parent)}
    return subprocess.run([sys.executable, "-m", "whale.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_hub_id_loads_from_the_cache_offline_and_generates(tmp_path):
    directory, _ = tiny_dense_checkpoint("qwen2", tmp_path / "src")
    _hub_cache(tmp_path / "hub", "acme/tiny-qwen", directory)
    generate = ["generate", "t5 t7 t9", "--model", "acme/tiny-qwen", "--max-tokens", "4", "--dtype", "float32",
                "--temperature", "0"]
    done = _whale(generate, tmp_path / "hub")
    assert done.returncode == 0, done.stderr
    # without HF_HUB_OFFLINE but with no hub to reach, the cache serves at once (no retries in between)
    unreachable = _whale(generate, tmp_path / "hub", UNREACHABLE)
    assert unreachable.returncode == 0 and "Retrying" not in unreachable.stderr, unreachable.stderr
    assert unreachable.stdout == done.stdout
    # the hub id resolved to the cached snapshot: the same completion as the checkpoint directory itself
    local = LLM(str(directory), dtype="float32").generate("t5 t7 t9", SamplingParams(temperature=0, max_tokens=4))
    assert local[0].outputs[0].text.strip() and done.stdout == local[0].outputs[0].text + "\n"
    listed = _whale(["models"], tmp_path / "hub")
    rows = [line.split() for line in listed.stdout.splitlines() if line.startswith("acme/tiny-qwen ")]
    assert rows == [["acme/tiny-qwen", "qwen2", "Hugging", "Face", "cache"]]


def test_unknown_hub_id_offline_is_a_clear_error_not_a_traceback(tmp_path):
    (tmp_path / "hub").mkdir()
    done = _whale(["generate", "hi", "--model", "acme/absent"], tmp_path / "hub")
    assert done.returncode == 2
    assert "acme/absent" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("command", [["generate", "hi", "--model"], ["plan"]])
def test_an_uncached_hub_id_without_a_network_fails_at_once_in_one_line(tmp_path, command):
    (tmp_path / "hub").mkdir()
    done = _whale([*command, "acme/absent"], tmp_path / "hub", UNREACHABLE)
    # huggingface_hub alone retries the connection five times (~23 s, a warning line each)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "'acme/absent'" in done.stderr and "127.0.0.1:9 cannot be reached" in done.stderr
