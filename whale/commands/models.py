"""`whale models`: what model references resolve on this machine, and the architectures whale serves."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from whale.chat.variants import CHAT_FORMATS
from whale.config import HF_PARSERS
from whale.errors import ModelNotFoundError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models")
    parser.add_argument("--path", action="append", default=[], type=Path,
                        help="also list .gguf files and checkpoint directories in this folder (repeatable)")
    parser.set_defaults(func=run)


def _hub_cache_models() -> list[tuple[str, str]]:
    """(repo id, model_type) for every cached hub model whose config.json names an architecture we serve."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return []
    found = []
    for repo in cache.repos:
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            config = revision.snapshot_path / "config.json"
            if config.is_file():
                model_type = json.loads(config.read_text()).get("model_type", "?")
                found.append((repo.repo_id, model_type))
                break
    return found


def _local_models(folder: Path) -> list[tuple[str, str]]:
    found = [(str(p), "gguf") for p in sorted(folder.glob("*.gguf"))]
    for config in sorted(folder.glob("*/config.json")):
        found.append((str(config.parent), json.loads(config.read_text()).get("model_type", "?")))
    return found


def run(args: argparse.Namespace) -> int:
    from whale.hub import default_gguf_path

    rows: list[tuple[str, str, str]] = []
    try:
        rows.append(("default", "llama (gguf)", str(default_gguf_path())))
    except ModelNotFoundError as exc:
        rows.append(("default", "-", f"unavailable: {exc}"))
    for repo_id, model_type in _hub_cache_models():
        rows.append((repo_id, model_type, "Hugging Face cache"))
    for folder in args.path:
        rows.extend((ref, kind, "local") for ref, kind in _local_models(folder))
    width = max(len(r[0]) for r in rows)
    print(f"{'MODEL':<{width}}  {'ARCHITECTURE':<14}  WHERE")
    for ref, arch, where in rows:
        print(f"{ref:<{width}}  {arch:<14}  {where}")
    print(f"\nArchitectures whale serves: {', '.join(sorted(HF_PARSERS))}, and GGUF files of them.")
    print("\nChat formats (detected from the checkpoint; force one with --chat-format NAME):")
    for name, description in CHAT_FORMATS.items():
        print(f"  {name:<18} {description}")
    return 0
