"""What each chat format can serve, and the 400 that says what to change when a request asks for more."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from whale.chat.variants import ChatVariant, variant_name
from whale.errors import CapabilityError
from whale.generation_defaults import GenerationDefaults, resolve_generation_defaults


@dataclass(frozen=True)
class Sampling:
    """Recommended defaults, applied where the request leaves a value unset."""

    temperature: float | None = None
    top_p: float | None = None


@dataclass(frozen=True)
class Capabilities:
    thinking_modes: frozenset[str]  # subset of {"chat", "thinking"}
    default_thinking: bool
    tools: bool
    tools_in_thinking: bool
    system_prompt: bool  # False: whale moves the system prompt into the first user turn
    fim: bool
    prefix_completion: bool
    context_length: int
    sampling: Sampling = field(default_factory=Sampling)
    reasoning_parser: str = "identity"
    tool_parser: str | None = None
    # how the format's models end a think block, which the engine writes to end one early (a reasoning budget)
    forced_think_end: str = "\n</think>\n\n"


_CHAT = frozenset({"chat"})
_THINK = frozenset({"thinking"})
_BOTH = frozenset({"chat", "thinking"})
_R1_SAMPLING = Sampling(temperature=0.6, top_p=0.95)  # DeepSeek-R1 README "Usage Recommendations"

CAPABILITIES: dict[str, Capabilities] = {
    "v3": Capabilities(_CHAT, False, True, False, True, True, True, 131072, Sampling(temperature=0.3),
                       tool_parser="deepseek_v3"),
    "v3-0324": Capabilities(_CHAT, False, True, False, True, True, True, 131072, Sampling(temperature=0.3),
                            tool_parser="deepseek_v3"),
    "r1": Capabilities(_THINK, True, False, False, False, False, True, 131072, _R1_SAMPLING, "deepseek_r1"),
    "r1-0528": Capabilities(_THINK, True, True, True, True, False, True, 131072, _R1_SAMPLING, "deepseek_r1",
                            "deepseek_v3"),
    "v3.1": Capabilities(_BOTH, False, True, False, True, True, True, 131072, Sampling(),
                         "deepseek_r1", "deepseek_v31", "</think>"),
    "v3.2": Capabilities(_BOTH, False, True, True, True, True, True, 131072, Sampling(1.0, 0.95),
                         "deepseek_r1", "deepseek_v32", "</think>"),
    # V4 model card: temperature 1.0, top_p 1.0; 1M-token context
    "v4": Capabilities(_BOTH, True, True, True, True, True, True, 1048576, Sampling(1.0, 1.0),
                       "deepseek_r1", "deepseek_v4", "</think>"),
    "r1-distill-qwen": Capabilities(_THINK, True, True, True, False, False, True, 32768, _R1_SAMPLING,
                                    "deepseek_r1", "r1_distill"),
    "r1-distill-llama": Capabilities(_THINK, True, True, True, False, False, True, 32768, _R1_SAMPLING,
                                     "deepseek_r1", "r1_distill"),
    "r1-0528-qwen3": Capabilities(_THINK, True, True, True, True, False, True, 32768, _R1_SAMPLING,
                                  "deepseek_r1", "r1_distill"),
    "jinja": Capabilities(_CHAT, False, False, False, True, False, True, 4096),
}


def capabilities_for(variant: ChatVariant | str, config: dict[str, Any] | None = None) -> Capabilities:
    """The variant's capabilities; a checkpoint's `max_position_embeddings` caps the context length."""
    caps = CAPABILITIES[variant_name(variant)]
    limit = (config or {}).get("max_position_embeddings")
    if isinstance(limit, int) and limit > 0 and (variant_name(variant) == "jinja" or limit < caps.context_length):
        caps = Capabilities(**{**caps.__dict__, "context_length": limit})
    return caps


def generation_defaults(variant: ChatVariant | str | None, generation_config: Mapping[str, Any],
                        source: str) -> GenerationDefaults:
    """A model's sampling defaults: its checkpoint's generation config (read from `source`), then what its chat
    format recommends (no variant: nothing), then the DeepSeek API's (whale.generation_defaults)."""
    recommended = asdict(CAPABILITIES[variant_name(variant)].sampling) if variant is not None else {}
    where = f"the {variant_name(variant)} chat format's recommendation" if variant is not None else ""
    return resolve_generation_defaults(generation_config, source, recommended, where)


def resolve_thinking(variant: ChatVariant | str, thinking: bool | None) -> bool:
    """The thinking mode a request gets: its own choice if the model has it, else the default; or a 400."""
    name = variant_name(variant)
    caps = CAPABILITIES[name]
    if thinking is None:
        return caps.default_thinking
    mode = "thinking" if thinking else "chat"
    if mode not in caps.thinking_modes:
        other = "enabled" if not thinking else "disabled"
        raise CapabilityError(
            f"model chat format {name!r} cannot run with thinking {'enabled' if thinking else 'disabled'}: "
            f"set thinking to {other!r} (or leave it out), or serve a model with both modes (v3.1, v3.2)")
    return thinking


# the DeepSeek API's reasoning_effort values: it runs high and max, reads low and medium as high, xhigh as max,
# and runs high when the request names none (api.md §14)
REASONING_EFFORTS: dict[str, str] = {"low": "high", "medium": "high", "high": "high", "xhigh": "max", "max": "max"}


def resolve_effort(effort: str | None) -> str:
    """The effort a request runs at: "high" or "max"; an unknown value is a 400 listing the known ones."""
    if effort is None:
        return "high"
    if effort not in REASONING_EFFORTS:
        raise CapabilityError(f"reasoning_effort {effort!r} is not one of: {', '.join(REASONING_EFFORTS)}")
    return REASONING_EFFORTS[effort]


def check_request(variant: ChatVariant | str, *, thinking: bool | None = None, tools: list[Any] | None = None,
                  fim: bool = False, prefix: bool = False, config: dict[str, Any] | None = None) -> bool:
    """Refuse what the model cannot serve with a CapabilityError (HTTP 400); return the resolved thinking flag."""
    name = variant_name(variant)
    caps = capabilities_for(variant, config)
    resolved = resolve_thinking(variant, thinking) if not fim else False
    if fim and not caps.fim:
        raise CapabilityError(f"model chat format {name!r} does not support FIM completion: use "
                              "/chat/completions, or serve a V3-family model (v3, v3-0324, v3.1, v3.2)")
    if fim and thinking:
        raise CapabilityError("FIM completion is not available in thinking mode: disable thinking")
    if tools and not caps.tools:
        raise CapabilityError(f"model chat format {name!r} does not support function calling: remove 'tools' "
                              "(and 'tool_choice'), or serve r1-0528, v3, v3.1 or v3.2")
    if tools and resolved and not caps.tools_in_thinking:
        raise CapabilityError(f"model chat format {name!r} calls tools only in non-thinking mode: set thinking "
                              "to {'type': 'disabled'} or remove 'tools'")
    if prefix and not caps.prefix_completion:
        raise CapabilityError(f"model chat format {name!r} does not support prefix completion")
    return resolved
