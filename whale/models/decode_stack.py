"""What the compiled decode stacks (dense_stack.py, deepseek_stack.py) share: the wrapper a model holds and the
test of whether it serves a step."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ABSENT = torch.empty(0)  # a stack's tensor list holds this where a layer has no such tensor (a bias, a norm)


class DecodeStack:
    """A compiled stack and the most tokens a step may carry through it (None: any number)."""

    def __init__(self, compiled, max_tokens: int | None):
        self.compiled, self.max_tokens = compiled, max_tokens

    def serves(self, tokens: int) -> bool:
        return self.max_tokens is None or tokens <= self.max_tokens

    def forward(self, *inputs) -> torch.Tensor:
        return self.compiled.forward(*inputs)


class CompiledDecode:
    """A model's compiled decode path, built on first use (`build(model)`: a DecodeStack, or None where none
    serves the model)."""

    def __init__(self, build: Callable[[nn.Module], DecodeStack | None]):
        self.build, self.stack, self.tried = build, None, False

    def inputs(self, model: nn.Module, attn, hidden: torch.Tensor) -> tuple | None:
        """The stack's cache and layout inputs when it serves this step (fp32 activations, a backend whose
        compiled attention serves the step: `kernel_inputs`), else None."""
        if hidden.dtype != torch.float32:
            return None
        kernel_inputs = getattr(attn, "kernel_inputs", None)
        inputs = None if kernel_inputs is None else kernel_inputs()
        if inputs is None:
            return None
        if not self.tried:
            self.stack, self.tried = self.build(model), True
        return inputs if self.stack is not None and self.stack.serves(hidden.shape[0]) else None
