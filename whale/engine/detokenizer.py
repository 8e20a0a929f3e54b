"""Incremental detokenization that never emits half a character.

Byte-level BPE splits a multi-byte UTF-8 character across tokens; decoding a prefix then ends in U+FFFD. We
decode a short window of recent tokens and hold text back while it ends in an incomplete character.
"""

from __future__ import annotations

from whale.tokenizer import Tokenizer

_WINDOW = 6  # tokens of context kept before the unread ones, enough for any UTF-8 character


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = 0  # tokens before this are already emitted
        self.text = ""

    @property
    def holding(self) -> bool:
        """Whether tokens are held back (the text so far ends inside a character, or in a skipped token)."""
        return self.read_offset < len(self.token_ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (maybe empty)."""
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset:])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        delta = full[len(prefix):]
        self.text += delta
        self.read_offset = len(self.token_ids)
        self.prefix_offset = max(0, self.read_offset - _WINDOW)
        return delta

    def flush(self) -> str:
        """At the end of generation: whatever is still held back, replacement characters included."""
        full = self._decode(self.token_ids[self.prefix_offset:])
        prefix = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        delta = full[len(prefix):] if len(full) > len(prefix) else ""
        self.text += delta
        self.read_offset = len(self.token_ids)
        return delta
