"""The sampling defaults a request gets for the knobs it leaves unset: one rule for the server, `whale chat`,
`whale generate` and `LLM.generate`.

Each knob comes from the first of: the checkpoint's own generation config (`generation_config.json`, or a
GGUF's `general.sampling.*` keys, which llama.cpp reads the same way), the chat format's published
recommendation (e.g. DeepSeek-R1's temperature 0.6 / top_p 0.95), and last the DeepSeek API's defaults
(temperature 1.0, top_p 1.0, nothing else filtered). As in vLLM, `do_sample` is not read: a generation config
that names a temperature is taken to mean it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from whale.sampling_params import SamplingParams

RULE = ("a knob left unset takes the model's own default (its generation_config.json or GGUF "
        "general.sampling.* keys, else its chat format's recommendation, else temperature 1.0 and top_p 1.0)")

# GGUF key (llama.cpp's gguf.Keys.General.SAMPLING_*) -> the generation_config.json field it carries
GGUF_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


@dataclass(frozen=True)
class GenerationDefaults:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    source: str = "the DeepSeek API's defaults"

    def sampling_params(self, **given: Any) -> SamplingParams:
        """SamplingParams from `given`, where a sampling knob that is absent or None takes this default."""
        knobs = {name: getattr(self, name) for name in _KNOB_TYPES}
        for name, value in given.items():
            if value is not None or name not in knobs:
                knobs[name] = value
        return SamplingParams(**knobs)

    def describe(self) -> str:
        """One line for banners: the knobs that filter anything, and where they came from."""
        shown = [f"temperature {self.temperature:g}", f"top_p {self.top_p:g}"]
        if self.top_k > 0:
            shown.append(f"top_k {self.top_k}")
        if self.min_p > 0:
            shown.append(f"min_p {self.min_p:g}")
        if self.repetition_penalty != 1.0:
            shown.append(f"repetition_penalty {self.repetition_penalty:g}")
        return f"{', '.join(shown)} (from {self.source})"


# the sampling knobs and their types, as GenerationDefaults declares them
_KNOB_TYPES = {f.name: type(f.default) for f in fields(GenerationDefaults) if f.name != "source"}


def gguf_generation_config(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """A GGUF's sampling keys as generation_config.json fields."""
    return {field: metadata[key] for key, field in GGUF_SAMPLING_KEYS.items() if key in metadata}


def resolve_generation_defaults(generation_config: Mapping[str, Any], source: str,
                                recommended: Mapping[str, float | None] | None = None,
                                recommended_source: str = "") -> GenerationDefaults:
    """The defaults of a model whose checkpoint carries `generation_config` (read from `source`) and whose chat
    format recommends `recommended` (e.g. {"temperature": 0.6, "top_p": 0.95}, None where it says nothing)."""
    knobs: dict[str, Any] = {}
    sources = []
    for layer, where in ((generation_config, source), (recommended or {}, recommended_source)):
        taken = {name: value for name, value in layer.items()
                 if name in _KNOB_TYPES and name not in knobs and value is not None}
        if taken:
            knobs.update({name: _KNOB_TYPES[name](value) for name, value in taken.items()})
            sources.append(where)
    if knobs.get("top_k") == 0:
        knobs["top_k"] = -1  # HF's "no top-k"
    return GenerationDefaults(**knobs, source=" and ".join(sources) or GenerationDefaults.source)

