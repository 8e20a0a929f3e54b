"""Tokenizers: HF tokenizer.json through `tokenizers`, or the vocabulary embedded in a GGUF file rebuilt as one.

Chat templates are rendered by whale.chat.jinja in a sandbox; the prompt text is then encoded without adding
special tokens, because the template writes BOS itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from whale.chat.jinja import render_chat_template
from whale.errors import ModelLoadError, UnsupportedModelError

# The backend's `encode` holds the GIL for its whole run (~0.9 s for a 2 MB prompt), which would stall the
# server's event loop even from a worker thread; `encode_batch` runs the same pipeline with the GIL released.
GIL_FREE_ENCODE_CHARS = 4096

# llama.cpp's `tokenizer.ggml.pre` names -> the split regexes that come before byte-level BPE.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK3_SPLITS = [
    r"\p{N}{1,3}",
    r"[一-龥\u3040-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
]
_PRE_TOKENIZER_SPLITS = {
    "default": [_GPT2_SPLIT],
    "gpt-2": [_GPT2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT],
    "starcoder": [r"\p{N}", _GPT2_SPLIT],
    "refact": [r"\p{N}", _GPT2_SPLIT],
    "llama3": [_LLAMA3_SPLIT],
    "llama-bpe": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT],
    "deepseek-r1-qwen": [_QWEN2_SPLIT],
    "deepseek-v3": _DEEPSEEK3_SPLITS,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types that are added (unsplittable) tokens


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Text <-> token ids, the special tokens a generator needs, and the model's chat template."""

    def __init__(self, backend: BackendTokenizer, *, bos_token: str | None, eos_token: str | None,
                 add_bos_token: bool, chat_template: str | None):
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token else None
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The backend's post-processor adds BOS for HF tokenizers that want it; GGUF ones carry a flag.
        if len(text) > GIL_FREE_ENCODE_CHARS:  # the same pipeline, without holding the GIL (see the constant)
            ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        else:
            ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if (add_special_tokens and self.add_bos_token and self.bos_token_id is not None
                and (not ids or ids[0] != self.bos_token_id)):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs: Any) -> str:
        if not self.chat_template:
            raise UnsupportedModelError("this model has no chat template; send a plain prompt to /completions "
                                        "or start whale with --chat-format")
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                    tools=tools, **kwargs)

    @classmethod
    def from_hf_dir(cls, model_dir: Path) -> Tokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{model_dir} has no tokenizer.json (whale reads the fast-tokenizer format)")
        backend = BackendTokenizer.from_file(str(path))
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = config.get("chat_template")
        template_file = model_dir / "chat_template.jinja"
        if template_file.is_file():
            template = template_file.read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(backend, bos_token=_token_text(config.get("bos_token")),
                   eos_token=_token_text(config.get("eos_token")), add_bos_token=False, chat_template=template)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedModelError(f"GGUF tokenizer model {kind!r} is not supported (whale reads gpt2 BPE)")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        backend = BackendTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                              ignore_merges=False))
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in _PRE_TOKENIZER_SPLITS:
            raise UnsupportedModelError(f"GGUF pre-tokenizer {pre!r} is not supported; known: "
                                        f"{sorted(_PRE_TOKENIZER_SPLITS)}")
        splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in _PRE_TOKENIZER_SPLITS[pre]]
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        # CONTROL tokens are special (a decode may skip them); USER_DEFINED ones are HF's non-special added tokens
        # (the distills' <think>, </think>, <tool_call>): whole, never split, and always decoded, or the chat
        # parsers would never see them
        added = {kind: [AddedToken(tokens[i], special=kind == _CONTROL, normalized=False)
                        for i, k in enumerate(types) if k == kind] for kind in (_CONTROL, _USER_DEFINED)}
        backend.add_special_tokens(added[_CONTROL])
        backend.add_tokens(added[_USER_DEFINED])

        def special(key: str) -> str | None:
            idx = meta.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

        return cls(backend, bos_token=special("bos"), eos_token=special("eos"),
                   add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=meta.get("tokenizer.chat_template"))
