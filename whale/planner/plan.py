"""The deployment plan: the smallest valid layout that holds the weights and the requested sequences."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from whale.errors import InvalidRequestError
from whale.planner.catalog import ModelSpec
from whale.planner.gpus import GPU
from whale.planner.launch import LaunchRequest, launch_commands, weight_source
from whale.planner.memory import (
    CUDA_GRAPH_BYTES,
    MEMORY_UTILIZATION,
    PREFILL_CHUNK_TOKENS,
    WEIGHT_FORMATS,
    KVShape,
    kv_shape,
    weight_bytes,
)
from whale.planner.parallelism import (
    DecodeEstimate,
    GpuBudget,
    Layout,
    StageWeights,
    candidate_layouts,
    decode_estimate,
    gpu_budget,
    layout_problems,
    stage_weights,
)
from whale.planner.params import ParamCount, count_params, inventory

MAX_NODES = 16


@dataclass(frozen=True)
class PlanRequest:
    spec: ModelSpec
    gpu: GPU
    dtype: str
    context: int
    concurrency: int = 1
    kv_dtype: str = "bf16"
    gpus: int | None = None  # evaluate exactly this many GPUs; None: find the fewest
    include_mtp: bool = False  # load the MTP layer (speculative decoding) and give it a KV layer
    gpus_per_node: int = 8


@dataclass(frozen=True)
class Option:
    """One layout evaluated for the request."""

    layout: Layout
    weights: StageWeights
    budget: GpuBudget
    fits: bool


@dataclass(frozen=True)
class Plan:
    request: PlanRequest
    params: ParamCount
    weights_bytes: int
    kv: KVShape
    chosen: Option | None  # None when no layout up to MAX_NODES nodes holds the model
    gpus_needed: int | None
    decode: DecodeEstimate | None
    launch: dict[str, str]
    notes: tuple[str, ...]

    @property
    def fits(self) -> bool:
        return self.chosen is not None and self.chosen.fits

    def to_json(self) -> dict[str, Any]:
        r, chosen = self.request, self.chosen
        data: dict[str, Any] = {
            "model": r.spec.label, "gpu": r.gpu.name, "dtype": r.dtype, "kv_dtype": r.kv_dtype,
            "context": r.context, "concurrency": r.concurrency,
            "total_params": self.params.total, "active_params": self.params.active,
            "mtp_params": self.params.mtp, "checkpoint_params": self.params.checkpoint,
            "weights_bytes": self.weights_bytes, "kv_cache_bytes_per_token": self.kv.token_bytes,
            "kv_cache_bytes_per_sequence_fixed": self.kv.sequence_bytes,
            "gpus_needed": self.gpus_needed, "fits": self.fits, "launch": self.launch, "notes": list(self.notes),
        }
        if chosen is not None:
            b = chosen.budget
            data["layout"] = {"gpus": chosen.layout.gpus, "nodes": chosen.layout.nodes, "tp": chosen.layout.tp,
                              "pp": chosen.layout.pp, "dp": chosen.layout.dp,
                              "dp_attention": chosen.layout.dp_attention,
                              "expert_parallel": chosen.layout.expert_parallel,
                              "description": chosen.layout.describe()}
            data["per_gpu"] = {"capacity_bytes": b.capacity, "weights_bytes": b.weights,
                               "reserved_bytes": b.reserved, "activation_bytes": b.activations,
                               "cuda_graph_bytes": b.cuda_graphs, "kv_pool_bytes": b.kv_pool,
                               "kv_bytes_per_token": b.kv_token_bytes, "kv_bytes_per_sequence": b.kv_sequence_bytes}
            data["max_concurrency_at_context"] = b.max_sequences
        if self.decode is not None:
            data["decode_tokens_per_s"] = {"single_stream": self.decode.single_stream_tps,
                                           "per_stream_at_concurrency": self.decode.per_stream_tps,
                                           "total_at_concurrency": self.decode.total_tps}
        return data


def _evaluate(r: PlanRequest, layout: Layout, kv: KVShape) -> Option:
    weights = stage_weights(r.spec, inventory(r.spec), r.dtype, layout, r.include_mtp)
    budget = gpu_budget(r.spec, r.gpu, layout, weights, kv, r.context)
    fits = budget.kv_pool > 0 and budget.max_sequences >= r.concurrency
    return Option(layout, weights, budget, fits)


def _counts(gpus_per_node: int) -> list[int]:
    return list(range(1, gpus_per_node + 1)) + [gpus_per_node * n for n in range(2, MAX_NODES + 1)]


def _smallest(r: PlanRequest, kv: KVShape) -> Option | None:
    for count in _counts(r.gpus_per_node):
        for layout in candidate_layouts(r.spec, count, r.gpus_per_node, r.dtype):
            option = _evaluate(r, layout, kv)
            if option.fits:
                return option
    return None


def _at_count(r: PlanRequest, kv: KVShape, count: int) -> Option:
    layouts = candidate_layouts(r.spec, count, r.gpus_per_node, r.dtype)
    if not layouts:
        reasons = layout_problems(r.spec, Layout(tp=count, gpus_per_node=r.gpus_per_node), r.dtype)
        across = f"; across nodes use a multiple of {r.gpus_per_node}" if count > r.gpus_per_node else ""
        raise InvalidRequestError(f"no valid layout of {r.spec.label} on {count} GPUs: "
                                  f"{'; '.join(reasons) or 'TP stays within a node'}{across}")
    options = [_evaluate(r, layout, kv) for layout in layouts]
    return next((o for o in options if o.fits), max(options, key=lambda o: (o.budget.kv_pool, o.budget.max_sequences)))


def _notes(r: PlanRequest, params: ParamCount) -> list[str]:
    notes = [f"runtime overhead per GPU: {1 - MEMORY_UTILIZATION:.0%} headroom (memory utilization "
             f"{MEMORY_UTILIZATION}: CUDA context, NCCL, fragmentation) + {CUDA_GRAPH_BYTES / 2**30:.0f} GiB CUDA "
             f"graphs + activations of a {PREFILL_CHUNK_TOKENS}-token prefill chunk"]
    _, source = weight_source(r.spec, r.dtype)
    if source:
        notes.append(f"weights: {source}")
    if r.dtype in ("fp8", "fp4") and not getattr(r.gpu, r.dtype):
        notes.append(f"{r.gpu.name} has no {r.dtype.upper()} tensor cores: weights are dequantized on the fly "
                     "(weight-only kernels), so compute runs in BF16")
    if params.mtp and not r.include_mtp:
        notes.append(f"MTP layer ({params.mtp / 1e9:.1f}B params) not loaded; --mtp adds it for speculative decoding")
    if r.spec.attention == "compressed":
        notes.append("V4: parameters counted from the public config (compressor weights not counted); KV as "
                     "whale's paged cache allocates it (rows compressed 4x / 128x per token; per sequence the "
                     "window rows and compressor inputs of its last 128 tokens, in 16-token blocks)")
    if r.spec.serving.max_model_len and r.context > r.spec.serving.max_model_len:
        notes.append(f"DeepSeek serves this model with --max-model-len {r.spec.serving.max_model_len}")
    return notes


def plan_request(spec: ModelSpec, gpu: GPU, *, context: int | None = None, concurrency: int = 1,
                 dtype: str | None = None, kv_dtype: str | None = None, gpus: int | None = None,
                 include_mtp: bool = False, gpus_per_node: int = 8) -> PlanRequest:
    """A PlanRequest with the model's defaults where an option is left out: its released weight format, its
    serving context, and fp8 KV for compressed attention (V4), bf16 otherwise."""
    if gpus_per_node < 1:
        raise InvalidRequestError("--gpus-per-node must be at least 1")
    if concurrency < 1:
        raise InvalidRequestError("concurrency must be at least 1")
    return PlanRequest(spec=spec, gpu=gpu, dtype=dtype or spec.native_dtype,
                       context=context or spec.serving.max_model_len or spec.max_context,
                       concurrency=concurrency,
                       kv_dtype=kv_dtype or ("fp8" if spec.attention == "compressed" else "bf16"),
                       gpus=gpus, include_mtp=include_mtp, gpus_per_node=gpus_per_node)


def make_plan(r: PlanRequest) -> Plan:
    """Count, size and lay out the model; `r.gpus` fixes the GPU count, otherwise the fewest that fit."""
    if r.dtype not in WEIGHT_FORMATS:
        raise InvalidRequestError(f"unknown dtype {r.dtype!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    if r.dtype == "fp4" and r.spec.native_dtype != "fp4":
        raise InvalidRequestError("dtype fp4 is DeepSeek-V4's FP4-expert release; use int4 or q4_k_m here")
    if not 1 <= r.context <= r.spec.max_context:
        raise InvalidRequestError(f"context {r.context} is outside 1..{r.spec.max_context}, "
                                  f"the maximum of {r.spec.label}")
    if r.concurrency < 1 or (r.gpus is not None and r.gpus < 1):
        raise InvalidRequestError("concurrency and --gpus must be at least 1")
    params = count_params(r.spec)
    kv = kv_shape(r.spec, r.kv_dtype, r.include_mtp)
    smallest = _smallest(r, kv)
    chosen = _at_count(r, kv, r.gpus) if r.gpus else smallest
    decode, launch = None, {}
    if chosen is not None:
        decode = decode_estimate(r.spec, r.gpu, chosen.layout, chosen.weights, chosen.budget, r.concurrency)
        launch = launch_commands(LaunchRequest(r.spec, chosen.layout, r.dtype, r.kv_dtype, r.context,
                                               r.concurrency))
    return Plan(r, params, weight_bytes(inventory(r.spec), r.dtype, r.include_mtp), kv, chosen,
                smallest.layout.gpus if smallest else None, decode, launch, tuple(_notes(r, params)))
