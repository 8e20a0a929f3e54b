"""Building blocks shared by every architecture: RMSNorm, rotary embeddings, the SwiGLU MLP, and the
attention-backend interface through which a model reads and writes its KV cache."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from whale.config import RopeConfig
from whale.kernels import cpu_ops

# Whether the step being run carries prompt tokens (or tokens recomputed after a preemption) rather than only
# decode tokens. Such steps take one path whatever their size, so a prompt token is computed the same way
# whether or not its prefix came from the prefix cache, and a repeated greedy request decodes the same tokens.
_PROMPT_STEP = contextvars.ContextVar("whale_prompt_step", default=False)


@contextlib.contextmanager
def prompt_step(active: bool) -> Iterator[None]:
    token = _PROMPT_STEP.set(active)
    try:
        yield
    finally:
        _PROMPT_STEP.reset(token)


def in_prompt_step() -> bool:
    return _PROMPT_STEP.get()


class AttentionBackend(Protocol):
    """Owns the KV cache and the current batch layout. The model hands it the new tokens' q, k, v (flat over
    the batch: [tokens, heads, head_dim]); it stores k, v and returns attention over each sequence's past."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> torch.Tensor: ...


_KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # activations the compiled CPU kernels take


def _kernels_for(x: torch.Tensor, dtypes: tuple[torch.dtype, ...] = _KERNEL_DTYPES):
    """The compiled CPU kernels when they serve `x` (on the CPU, in one of `dtypes`, built), else None."""
    return cpu_ops() if x.device.type == "cpu" and x.dtype in dtypes else None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, device="meta"))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel instead of seven ops: decode is bound by per-op overhead
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32 as the reference implementations do, whatever the compute dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def add_and_norm(self, residual: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """residual += delta (in place); returns this norm of the sum: a residual connection and the next
        norm in one compiled pass where the CPU kernels serve (fp32 residual on CPU; the result then comes in
        delta's dtype, bf16 after a weight-only linear, which the next one reads as it is), else two eager
        steps in the residual's dtype."""
        ops = _kernels_for(residual, (torch.float32,))
        if ops is not None and delta.dtype in _KERNEL_DTYPES and residual.is_contiguous():
            return ops.add_rms_norm(residual, delta.contiguous(), self.weight, self.eps)
        residual.add_(delta)
        return self(residual)


def _llama3_inv_freq(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: long wavelengths divided by `factor`, short ones kept,
    a smooth blend in between."""
    old_len = rope.original_max_position_embeddings or 8192
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1·mscale·ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(rope: RopeConfig) -> float:
    """Scale of YaRN's cos/sin: mscale(factor, mscale) / mscale(factor, mscale_all_dim), 1.0 for every released
    DeepSeek config (both are 0.707 on V2, 1.0 on V3)."""
    if rope.rope_type != "yarn":
        return 1.0
    if rope.mscale and rope.mscale_all_dim:
        return yarn_get_mscale(rope.factor, rope.mscale) / yarn_get_mscale(rope.factor, rope.mscale_all_dim)
    return yarn_get_mscale(rope.factor)


def yarn_softmax_scale(rope: RopeConfig, head_dim: int) -> float:
    """DeepSeek's softmax scale: head_dim^-0.5, times mscale(factor, mscale_all_dim)² under YaRN."""
    scale = head_dim ** -0.5
    if rope.rope_type not in ("default", None) and rope.mscale_all_dim:
        scale *= yarn_get_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return scale


def _yarn_inv_freq(inv_freq: torch.Tensor, rope: RopeConfig, rotary_dim: int) -> torch.Tensor:
    """YaRN: interpolate (divide by `factor`) the long wavelengths, keep the short ones, ramp linearly between
    the dimensions that turn beta_slow and beta_fast times over the original context."""
    original = rope.original_max_position_embeddings or 4096

    def correction_dim(rotations: float) -> float:
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), rotary_dim - 1)
    span = (high - low) if high != low else 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float64) - low) / span).clamp(0, 1)
    extrapolation = 1 - ramp
    return inv_freq / rope.factor * (1 - extrapolation) + inv_freq * extrapolation


def rope_inv_freq(rope: RopeConfig, rotary_dim: int) -> torch.Tensor:
    """Inverse frequencies in float64 (rounded once, at the end) for rope types default, linear, llama3, yarn."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    if rope.rope_type in ("default", None):
        return inv_freq
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope)
    if rope.rope_type == "yarn":
        return _yarn_inv_freq(inv_freq, rope, rotary_dim)
    raise NotImplementedError(f"rope_type {rope.rope_type!r} is not implemented for this architecture")


class RotaryEmbedding(nn.Module):
    """cos/sin for given positions; `apply` rotates the two halves of each head (the HF layout)."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = attention_scaling

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, dim]; cos/sin: [tokens, dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def signed_rotary_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [tokens, dim] -> [tokens, 1, dim] tables for `apply_rotary_signed`, sin negated on the first half
    (computed once per forward, shared by every layer)."""
    half = sin.shape[-1] // 2
    return cos[:, None, :], torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)[:, None, :]


def apply_rotary_signed(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` in three ops instead of six: swapping the halves and multiplying by the signed sin is
    rotate_half(x) * sin."""
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, swapped, signed_sin)


def rotate_leading_heads(x: torch.Tensor, heads: int, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [tokens, all heads, dim] with its first `heads` heads rotated (q and k of a fused qkv, v untouched):
    in place by the compiled kernel where it serves (fp32 on CPU), else into a new tensor."""
    ops = _kernels_for(x, (torch.float32,))
    if ops is not None and cos.dtype == torch.float32 and x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]:
        ops.rotary_(x, cos, signed_sin, heads)
        return x
    return torch.cat((apply_rotary_signed(x[:, :heads], cos, signed_sin), x[:, heads:]), dim=1)


def embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """An Embedding on the meta device until the checkpoint is loaded. Given its (meta) weight, it skips the
    random initialisation, whose first call on a meta tensor imports torch's Python decompositions (2-3 s of a
    cold start)."""
    return nn.Embedding(num_embeddings, dim, _weight=torch.empty((num_embeddings, dim), device="meta"))


def linear(in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    """A Linear whose tensors are allocated only when the checkpoint is loaded (meta device until then)."""
    return nn.Linear(in_features, out_features, bias=bias, device="meta")


def fuse_linears(parts: list[nn.Module]) -> nn.Module | None:
    """One module computing every part's output side by side (weights stacked by rows): one call and one pass
    over the input instead of several. Quantized linears provide `concat` for their own layout. None when the
    parts are of different kinds (e.g. one left in fp32 by the quantizer): they stay separate."""
    first = parts[0]
    if any(type(p) is not type(first) for p in parts):
        return None
    if not isinstance(first, nn.Linear):
        return type(first).concat(parts)
    fused = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None,
                      device="meta")
    fused.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
    return fused


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the MLP of Llama, Qwen and the DeepSeek experts."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = linear(hidden, intermediate, bias)
        self.up_proj = linear(hidden, intermediate, bias)
        self.down_proj = linear(intermediate, hidden, bias)
        self.gate_up_proj: nn.Module | None = None

    def fuse(self) -> None:
        """After loading: replace gate_proj and up_proj by one gate_up_proj (HF names then no longer exist)."""
        self.gate_up_proj = fuse_linears([self.gate_proj, self.up_proj])
        if self.gate_up_proj is not None:
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate_up = self.gate_up_proj(x)
        ops = _kernels_for(gate_up)
        if ops is not None and gate_up.is_contiguous():
            return self.down_proj(ops.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
