"""Shared fixtures for the chat tests: the real DeepSeek-V3/R1 tokenizer and the reference templates."""

from __future__ import annotations

import json

import pytest
from tokenizer_files import V3_DIR as PACKAGE_DIR
from tokenizers import Tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(PACKAGE_DIR / "tokenizer.json"))


@pytest.fixture(scope="session")
def tokenizer_config() -> dict:
    return json.loads((PACKAGE_DIR / "tokenizer_config.json").read_text())


@pytest.fixture(scope="session")
def v3_template(tokenizer_config: dict) -> str:
    return tokenizer_config["chat_template"]
