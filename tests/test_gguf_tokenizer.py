"""A GGUF's tokenizer rebuilt by whale keeps llama.cpp's two kinds of added tokens apart: CONTROL tokens are
special (skipped when a reply is decoded), USER_DEFINED ones (the R1 distills' <think>, </think>, <tool_call>,
</tool_call>) are whole tokens that are always decoded, as llama.cpp's own detokenizer does. Skipping them hid
every reasoning block and tool call of a distill served from a GGUF from the chat parsers."""

from __future__ import annotations

from whale.hub import default_gguf_path
from whale.tokenizer import Tokenizer
from whale.weights.gguf import GGUFCheckpoint

TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]
CONTROL, USER_DEFINED = 3, 4  # gguf.TokenType


def _distill_like_tokenizer() -> Tokenizer:
    """The default model's GGUF vocabulary with the distills' tags appended as USER_DEFINED tokens, as
    llama.cpp's converter writes them (added tokens that are not special)."""
    meta = dict(GGUFCheckpoint(default_gguf_path()).metadata)
    meta["tokenizer.ggml.tokens"] = [*meta["tokenizer.ggml.tokens"], *TAGS]
    meta["tokenizer.ggml.token_type"] = [*meta["tokenizer.ggml.token_type"], *[USER_DEFINED] * len(TAGS)]
    assert meta["tokenizer.ggml.token_type"][2] == CONTROL  # <|im_end|>
    return Tokenizer.from_gguf_metadata(meta)


def test_user_defined_tokens_are_whole_and_survive_a_reply_decode():
    tokenizer = _distill_like_tokenizer()
    text = '<think>Let me check.</think>\n\n<tool_call>{"name": "f"}</tool_call><|im_end|>'
    ids = tokenizer.encode(text, add_special_tokens=False)
    vocab = len(tokenizer.backend.get_vocab()) - len(TAGS)
    tag_ids = [tokenizer.encode(tag, add_special_tokens=False) for tag in TAGS]
    assert tag_ids == [[vocab + i] for i in range(len(TAGS))]  # one token each, never split into pieces
    assert [i for i in ids if i >= vocab] == [vocab, vocab + 1, vocab + 2, vocab + 3]
    # what the engine does with a reply: skip special tokens. The tags stay; the CONTROL end token goes.
    assert tokenizer.decode(ids, skip_special_tokens=True) == text.removesuffix("<|im_end|>")
    assert tokenizer.decode(ids) == text
