"""The offline API, in vLLM's shape: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from whale.chat.capabilities import generation_defaults
from whale.chat.conversation import ChatPrompt, chat_prompt
from whale.chat.output import parse_output
from whale.chat.variants import detect_loaded_variant
from whale.engine.llm_engine import EngineConfig, LLMEngine
from whale.engine.request import Request
from whale.engine.sampler import SampledToken
from whale.errors import InvalidRequestError
from whale.models.loader import load_model
from whale.sampling_params import SamplingParams

PromptType = str | dict


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_logprobs: list[dict[int, float] | None] | None = None  # with SamplingParams.prompt_logprobs
    message: dict | None = None  # LLM.chat: the reply split into content, reasoning_content and tool_calls


def _output(request: Request) -> RequestOutput:
    logprobs = prompt_logprobs = None
    if request.params.logprobs is not None:
        # vLLM's shape: per position, token id -> logprob, the sampled token always included
        logprobs = [_position(s) for s in request.logprobs]
    if request.params.prompt_logprobs is not None:
        prompt_logprobs = [None if s is None else _position(s) for s in request.prompt_logprobs]
    completion = CompletionOutput(0, request.text, list(request.output_token_ids),
                                  request.cumulative_logprob if logprobs is not None else None, logprobs,
                                  request.finish_reason, request.stop_reason)
    return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids[:], [completion],
                         request.status.finished, request.num_cached_tokens, prompt_logprobs)


def _position(scored: SampledToken) -> dict[int, float]:
    return {**(scored.top_logprobs or {}), scored.token_id: scored.logprob}


class LLM:
    """Load a model reference (`default`, a .gguf, a checkpoint directory or a hub id) and generate."""

    def __init__(self, model: str = "default", dtype: str | torch.dtype | None = None,
                 device: str | None = None, kernels: str = "auto", **engine_options):
        """`kernels`: the linears' kernels (auto, dense, int4, hybrid, blocks; `whale.platform.cpu_weight_kernels`).
        `engine_options` are EngineConfig fields: max_num_seqs, max_num_batched_tokens, block_size,
        kv_cache_bytes, num_kv_blocks, enable_prefix_caching, max_model_len, speculative ("ngram": prompt-lookup
        drafts), num_speculative_tokens."""
        self.loaded = load_model(model, dtype=dtype, device=device, kernels=kernels)
        self.engine = LLMEngine(self.loaded, EngineConfig(**engine_options))
        self.tokenizer = self.loaded.tokenizer
        self.chat_variant, self._config, self.no_chat_reason = None, {}, ""
        try:
            self.chat_variant, self._config = detect_loaded_variant(self.loaded)
        except InvalidRequestError as exc:  # no chat template and no DeepSeek name: no chat, no recommendation
            self.no_chat_reason = str(exc)
        self.generation_defaults = generation_defaults(self.chat_variant, self.loaded.generation_config,
                                                       self.loaded.generation_config_source)

    def get_default_sampling_params(self, **given) -> SamplingParams:
        """SamplingParams with the model's defaults (whale.generation_defaults) for every knob `given` leaves
        unset or None; what `generate` and `chat` use when no SamplingParams are passed."""
        return self.generation_defaults.sampling_params(**given)

    def _prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        raise InvalidRequestError("a prompt is a string or a dict with 'prompt_token_ids'")

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        params = sampling_params or self.get_default_sampling_params()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise InvalidRequestError("pass one SamplingParams, or one per prompt")
        requests = []
        for prompt, p in zip(prompts, params_list, strict=True):
            text, ids = self._prompt_ids(prompt)
            requests.append(self.engine.add_request(ids, p, prompt=text))
        while self.engine.has_unfinished():
            self.engine.step()
        return [_output(r) for r in requests]

    def chat_prompt(self, messages: list[dict], *, thinking: bool | None = None, tools: list[dict] | None = None,
                    reasoning_effort: str | None = None) -> ChatPrompt:
        """The conversation rendered in the model's chat format (as the server renders it), with the parser for
        the reply."""
        if self.chat_variant is None:
            raise InvalidRequestError(self.no_chat_reason)
        return chat_prompt(self.chat_variant, self.tokenizer, messages, thinking=thinking, tools=tools,
                           effort=reasoning_effort, config=self._config)

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None, *,
             thinking: bool | None = None, tools: list[dict] | None = None,
             reasoning_effort: str | None = None, thinking_budget: int | None = None) -> RequestOutput:
        """Generate the assistant's reply to one conversation. `output.message` is the reply as the API returns it
        (`content`, `reasoning_content`, `tool_calls`); `outputs[0].text` is what the model wrote.
        `reasoning_effort` as in the API (low/medium/high: high, xhigh/max: max); `thinking_budget`: at most this
        many reasoning tokens, then the end of thinking is forced (thinking mode)."""
        prompt = self.chat_prompt(messages, thinking=thinking, tools=tools, reasoning_effort=reasoning_effort)
        if thinking_budget is not None:
            if prompt.reasoning is None:
                raise InvalidRequestError("thinking_budget needs thinking mode on a model whose <think> and </think> "
                                          "are single tokens")
            base = sampling_params or self.get_default_sampling_params()
            sampling_params = replace(base, thinking_budget=thinking_budget, reasoning=prompt.reasoning)
        output = self.generate({"prompt": prompt.text, "prompt_token_ids": prompt.ids}, sampling_params)[0]
        output.message = parse_output(prompt.parser, output.outputs[0].text)
        return output
