"""Compiled CPU kernels for the decode step (cpu_ops.cpp): a fused residual-add + RMSNorm, SwiGLU's
silu(gate) * up, attention read straight from the paged K/V storage and the dense decode stack; matmuls straight
from a GGUF's quantized blocks (ggml_blocks.cpp); the DeepSeek decode stack (deepseek_stack.cpp). kernels.h
holds what they share.

They are built on first use by torch's extension builder (g++, ~25 s once; `make install` builds them) and
cached under $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), named by a hash of the source and of the
CPU's flags so a cache moved to another CPU is never loaded there. `cpu_ops()` is None where they cannot be
built or are switched off with WHALE_CPU_KERNELS=0; every caller then runs its PyTorch fallback.

Processes building at once take turns on an flock, which the kernel releases when its holder dies: torch's
own lock is a plain file that a build killed half-way leaves behind, after which every later process waited on
it forever (seen: a server whose first request never finished). Under the flock such a file is stale by
construction, and is removed.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

from whale.platform import cpu_flags

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_ops.cpp", "ggml_blocks.cpp", "deepseek_stack.cpp")]
HEADERS = [Path(__file__).with_name("kernels.h")]
logger = logging.getLogger(__name__)


def _build_name() -> str:
    sources = b"".join(source.read_bytes() for source in SOURCES + HEADERS)
    digest = hashlib.sha256(sources + " ".join(sorted(cpu_flags())).encode()).hexdigest()
    return f"whale_cpu_ops_{digest[:12]}"


def build_directory() -> Path:
    """Where this Python and this torch installation build the kernels. The build file names the torch headers
    by path, so two environments sharing a directory would rebuild it each time the other had loaded it."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    installation = hashlib.sha256(str(Path(torch.__file__).resolve()).encode()).hexdigest()[:8]
    environment = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}_{installation}"
    return root / environment / _build_name()


@functools.cache
def cpu_ops() -> ModuleType | None:
    if os.environ.get("WHALE_CPU_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "whale.flock", "w") as turn:
            fcntl.flock(turn, fcntl.LOCK_EX)
            (directory / "lock").unlink(missing_ok=True)  # torch's baton, left by a build that was killed
            return load(_build_name(), [str(s) for s in SOURCES], build_directory=str(directory),
                        extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as exc:  # noqa: BLE001 - no compiler, no headers: the PyTorch fallbacks serve
        logger.warning("whale's CPU kernels could not be built (%s); using the PyTorch fallbacks", exc)
        return None
