"""Fixtures the server tests share: the tiny random DeepSeek-V3 checkpoint (real tokenizer), written once."""

from __future__ import annotations

import openai
import pytest
from server_harness import DEFAULT_OPTIONS, serving, write_tiny_deepseek


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return write_tiny_deepseek(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def tiny_server(tiny_path, default_llm):  # default_llm: the session's model, loaded before the timing-sensitive work
    """(ServerState, openai client) of a fresh server on the tiny checkpoint, for one test module."""
    from whale.models.loader import load_model

    with serving(load_model(str(tiny_path), dtype="float32")) as (state, url):
        yield state, openai.OpenAI(base_url=url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def default_url(default_llm):
    """The base URL of a fresh server on the default model (DEFAULT_OPTIONS), for one test module."""
    with serving(default_llm.loaded, **DEFAULT_OPTIONS) as (_, url):
        yield url
