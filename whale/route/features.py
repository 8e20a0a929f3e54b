"""What the difficulty model reads of a prompt: hashed word unigrams and bigrams, the same again tagged for the
first eight words (the instruction usually leads: "rewrite this: ..." outweighs the pasted text's words), hashed
character trigrams of each word (so "prove", "proving" and "proof" share evidence, and typos keep most of theirs),
and a few shape measures (length, how much of it is numbers, math symbols and code). Numbers become their shape
("<n3>": three digits), not their value; Han characters count as words. Every hash is zlib's CRC-32, stable
across processes and machines, so the shipped weights mean the same everywhere."""

from __future__ import annotations

import math
import re
import zlib

HASH_BITS = 14
HASH_SIZE = 1 << HASH_BITS
HEAD_WORDS = 8
_WORD = re.compile(r"[^\W\d_]+|\d+|[^\w\s]", re.UNICODE)
_HAN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_MATH = re.compile(r"[+\-*/^=<>%√∑∫∏≤≥≠±×÷∞∀∃∈⊆]|\\(?:frac|sum|int|sqrt|cdot|le|ge|binom)|\bmod\b")
_CODE = re.compile(r"```|`|[{}\[\];]|->|=>|==|!=|::|\bdef |\bfn |\bclass |\breturn\b|\bfunc |\bSELECT\b", re.I)
_SENTENCE_END = re.compile(r"[.!?。！？]+(?:\s|$)")
_LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s", re.M)

# the dense measures, in the order they follow the hashed buckets; each is scaled to roughly [0, 1]
DENSE_FEATURES = ("chars", "words", "digit_share", "numbers", "math_symbols", "code_marks", "lines", "sentences",
                  "questions", "list_items", "upper_share", "han_share")
NUM_FEATURES = HASH_SIZE + len(DENSE_FEATURES)


def words(text: str) -> list[str]:
    """Lower-cased words, punctuation marks and number shapes; each Han character is a word of its own."""
    out: list[str] = []
    for token in _WORD.findall(text.lower()):
        if token.isdigit():
            out.append(f"<n{min(len(token), 5)}>")
        elif _HAN.search(token):
            out.extend(token)
        else:
            out.append(token)
    return out


def _bucket(feature: str) -> tuple[int, float]:
    """A feature's bucket and sign (the sign halves the bias that collisions add up)."""
    h = zlib.crc32(feature.encode())
    return h & (HASH_SIZE - 1), 1.0 if h >> 31 else -1.0


def _log_scaled(count: float, top: float) -> float:
    return min(math.log1p(count) / math.log1p(top), 1.5)


def dense_features(text: str) -> list[float]:
    """The shape measures of DENSE_FEATURES."""
    chars = len(text) or 1
    digits = sum(c.isdigit() for c in text)
    letters = [c for c in text if c.isalpha()]
    n_words = len(text.split())
    return [_log_scaled(len(text), 2000), _log_scaled(n_words, 300), digits / chars,
            _log_scaled(len(re.findall(r"\d+(?:\.\d+)?", text)), 30), _log_scaled(len(_MATH.findall(text)), 30),
            _log_scaled(len(_CODE.findall(text)), 30), _log_scaled(text.count("\n"), 30),
            _log_scaled(len(_SENTENCE_END.findall(text)), 20), _log_scaled(text.count("?") + text.count("？"), 10),
            _log_scaled(len(_LIST_ITEM.findall(text)), 15),
            sum(c.isupper() for c in letters) / (len(letters) or 1), len(_HAN.findall(text)) / chars]


def sparse_features(text: str) -> dict[int, float]:
    """Feature index -> value: the hashed n-grams (each counted once, weighted 1/sqrt of how many there are, so
    a long prompt is not louder than a short one) and the dense measures after them."""
    tokens = words(text)
    grams = set(tokens)
    grams.update(f"{a} {b}" for a, b in zip(tokens, tokens[1:], strict=False))
    head = tokens[:HEAD_WORDS]  # the instruction usually leads: "rewrite this ..." over the pasted text's words
    grams.update(f"h:{a}" for a in head)
    grams.update(f"h:{a} {b}" for a, b in zip(head, head[1:], strict=False))
    for token in tokens:
        if len(token) > 3 and token.isalpha():
            padded = f"#{token}#"
            grams.update(f"c:{padded[i:i + 3]}" for i in range(len(padded) - 2))
    out: dict[int, float] = {}
    weight = 1.0 / math.sqrt(len(grams) or 1)
    for gram in grams:
        index, sign = _bucket(gram)
        out[index] = out.get(index, 0.0) + sign * weight
    for offset, value in enumerate(dense_features(text)):
        out[HASH_SIZE + offset] = value
    return out
