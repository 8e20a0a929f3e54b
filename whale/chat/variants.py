"""Chat-format variants of the DeepSeek family, and detection of the variant from a checkpoint."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whale.chat.markers import BOS, DSML, EOS
from whale.errors import InvalidRequestError

CHAT_FORMATS: dict[str, str] = {
    "v3": "DeepSeek-V3 (Dec 2024): no thinking, V3 tool calls (function<｜tool▁sep｜>name + ```json)",
    "v3-0324": "DeepSeek-V3-0324: as v3, <｜Assistant｜> emitted after each user turn",
    "r1": "DeepSeek-R1: always thinks (<think>\\n prefilled), no system prompt (merged into the user turn), "
          "no tools",
    "r1-0528": "DeepSeek-R1-0528: thinks, system prompt and V3 tool calls supported",
    "v3.1": "DeepSeek-V3.1 / V3.1-Terminus / V3.2-Exp: hybrid thinking, name<｜tool▁sep｜>args tool calls "
            "(non-thinking only)",
    "v3.2": "DeepSeek-V3.2: Python encoder (no Jinja), DSML tool calls, thinking kept across tool calls",
    "v4": "DeepSeek-V4-Flash / V4-Pro: Python encoder (no Jinja), thinking by default with a reasoning-effort "
          "preamble, DSML tool calls in a tool_calls block, tool results in the user turn",
    "r1-distill-qwen": "DeepSeek-R1-Distill-Qwen-*: R1 template on a Qwen2.5 tokenizer, whale's "
                       "<tool_call> convention",
    "r1-distill-llama": "DeepSeek-R1-Distill-Llama-*: R1 template on a Llama-3 tokenizer, whale's "
                        "<tool_call> convention",
    "r1-0528-qwen3": "DeepSeek-R1-0528-Qwen3-8B: R1-0528 template on Qwen3, whale's <tool_call> convention",
    "jinja": "any other model: the checkpoint's own Jinja chat_template, rendered in a sandbox",
}


@dataclass(frozen=True)
class ChatVariant:
    """A resolved chat format: its name plus what the checkpoint says about templates and special tokens."""

    name: str
    template: str | None = None
    bos_token: str = BOS
    eos_token: str = EOS

    def __post_init__(self) -> None:
        if self.name not in CHAT_FORMATS:
            raise InvalidRequestError(
                f"unknown chat format {self.name!r}; choose one of: {', '.join(CHAT_FORMATS)}")
        if self.name == "jinja" and not self.template:
            raise InvalidRequestError("chat format 'jinja' needs the checkpoint's chat_template; "
                                      "this checkpoint has none, pick a named --chat-format")


def _token_text(value: Any) -> str:
    """tokenizer_config special tokens are either strings or AddedToken dicts."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def _template_text(tokenizer_config: dict[str, Any]) -> str | None:
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}]
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template or None


_NAME_RULES: tuple[tuple[str, str], ...] = (
    (r"r1-0528-qwen3", "r1-0528-qwen3"),
    (r"r1-distill-qwen", "r1-distill-qwen"),
    (r"r1-distill-llama", "r1-distill-llama"),
    (r"r1-0528", "r1-0528"),
    (r"deepseek-v4($|[^.\d])", "v4"),
    (r"v3\.2-exp", "v3.1"),
    (r"v3\.2", "v3.2"),
    (r"v3\.1", "v3.1"),
    (r"v3-0324", "v3-0324"),
    (r"(^|[/_-])r1($|[-_.])", "r1"),
)


def _from_name(name: str) -> str | None:
    lowered = name.lower().replace("_", "-")
    for pattern, variant in _NAME_RULES:
        if re.search(pattern, lowered):
            return variant
    return None


def _from_template(template: str, model_type: str) -> str | None:
    if f"{DSML}tool_calls" in template:
        return "v4"
    if DSML in template:
        return "v3.2"
    if "<｜User｜>" not in template:
        return None
    if "thinking" in template and "<｜Assistant｜></think>" in template:
        return "v3.1"
    distill = {"qwen2": "r1-distill-qwen", "llama": "r1-distill-llama"}.get(model_type)
    if "<think>\\n" in template or "<think>\n" in template:
        return distill or "r1"
    if "is_last_user" in template:
        if model_type == "qwen3":
            return "r1-0528-qwen3"
        return "r1-0528" if "</think>" in template else "v3-0324"
    return distill or "v3"


def _from_config(config: dict[str, Any]) -> str | None:
    model_type = config.get("model_type", "")
    architectures = " ".join(config.get("architectures") or [])
    if model_type == "deepseek_v4" or "DeepseekV4" in architectures:
        return "v4"
    if model_type == "deepseek_v32" or "DeepseekV32" in architectures:
        return "v3.2"
    if model_type in ("deepseek_v3", "deepseek_v2"):
        return "v3"
    return None


def detect_variant(config: dict[str, Any] | None, tokenizer_config: dict[str, Any] | None,
                   name: str = "", forced: str | None = None) -> ChatVariant:
    """Pick the chat format of a checkpoint from its name, its chat_template and its config.json.

    `forced` (from `whale serve --chat-format NAME`) wins. The checkpoint's name is the strongest hint
    (R1 and V3 share an architecture), then the template's fingerprint, then the config's model_type.
    """
    config = config or {}
    tokenizer_config = tokenizer_config or {}
    template = _template_text(tokenizer_config)
    bos = _token_text(tokenizer_config.get("bos_token")) or BOS
    eos = _token_text(tokenizer_config.get("eos_token")) or EOS
    model_type = str(config.get("model_type", ""))
    chosen = (forced or _from_name(name) or (template and _from_template(template, model_type))
              or _from_config(config))
    if chosen is None and template:
        chosen = "jinja"
    if chosen is None:
        raise InvalidRequestError(
            f"cannot tell the chat format of {name or 'this model'!r}: it has no chat_template and is not "
            f"a known DeepSeek variant; pass --chat-format with one of: {', '.join(CHAT_FORMATS)}")
    return ChatVariant(name=chosen, template=template, bos_token=bos, eos_token=eos)


def detect_loaded_variant(loaded: Any, forced: str | None = None) -> tuple[ChatVariant, dict[str, Any]]:
    """(chat format, config.json fields) of a whale LoadedModel: from its config.json and tokenizer_config.json
    (HF directory) or from the GGUF's metadata."""
    files, tokenizer = loaded.files, loaded.tokenizer
    if files.format == "hf":
        config = _read_json(files.path / "config.json")
        tokenizer_config = _read_json(files.path / "tokenizer_config.json")
        if tokenizer.chat_template and not tokenizer_config.get("chat_template"):
            tokenizer_config["chat_template"] = tokenizer.chat_template  # from chat_template.jinja
        stem = files.path.name
    else:
        config = {"model_type": loaded.config.architecture,
                  "max_position_embeddings": loaded.config.max_position_embeddings}
        tokenizer_config = {"chat_template": tokenizer.chat_template, "bos_token": tokenizer.bos_token or "",
                            "eos_token": tokenizer.eos_token or ""}
        stem = files.path.stem
    return detect_variant(config, tokenizer_config, stem, forced=forced), config


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def as_variant(variant: ChatVariant | str) -> ChatVariant:
    """Accept a variant name where a ChatVariant is expected (tests, `--chat-format` without a checkpoint)."""
    return variant if isinstance(variant, ChatVariant) else ChatVariant(name=variant)


def variant_name(variant: ChatVariant | str) -> str:
    """The format name of a variant or a name, checked against CHAT_FORMATS."""
    name = variant.name if isinstance(variant, ChatVariant) else variant
    if name not in CHAT_FORMATS:
        raise InvalidRequestError(f"unknown chat format {name!r}; choose one of: {', '.join(CHAT_FORMATS)}")
    return name
