"""What the server knows about the model it serves: its names and aliases, its chat format, and how a request
becomes prompt ids + SamplingParams + an output parser (the HTTP-free half of every route)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from whale.chat import (
    ChatOutputParser,
    ChatVariant,
    capabilities_for,
    check_request,
    detect_loaded_variant,
    encode_prompt,
    render_fim,
)
from whale.chat.capabilities import Capabilities, generation_defaults, resolve_thinking
from whale.chat.constrained_calls import forced_call_grammar, has_strict_tools, strict_tools_grammar
from whale.chat.conversation import ChatPrompt, chat_prompt
from whale.engine.grammar import compile_grammar, grammar_tokenizer, token_marker
from whale.engine.llm_engine import eos_token_ids
from whale.errors import InvalidRequestError
from whale.generation_defaults import GenerationDefaults
from whale.route.policy import RouteDecision
from whale.sampling_params import SamplingParams, StructuredOutput
from whale.server.errors import APIError
from whale.server.model_names import NAME_THINKING, served_names
from whale.server.protocol import NamedToolChoice

# DeepSeek's documented max_tokens: (default, maximum) without and with thinking; FIM output is at most 4K
CHAT_MAX_TOKENS, THINKING_MAX_TOKENS, FIM_MAX_TOKENS = (4096, 8192), (32768, 65536), (4096, 4096)
# reasoning budgets of the reasoning_effort values a request may send (None: no cap beyond max_tokens' answer room)
EFFORT_BUDGETS: dict[str, int | None] = {"low": 1024, "medium": 4096, "high": None, "xhigh": None, "max": None}
MIN_ANSWER_TOKENS = 256  # what a reasoning budget leaves for the answer under max_tokens (at most half of it)


@dataclass
class PreparedRequest:
    """One request ready for the engine, plus what the response needs to know about it."""

    model: str
    prompt_ids: list[int]
    params: SamplingParams
    thinking: bool = False
    parser: ChatOutputParser | None = None  # None: plain text (FIM)
    echo_text: str = ""  # /completions with echo: the prompt, returned before the completion
    route: RouteDecision | None = None  # what the complexity route chose (server/routing.py), if it ran


@dataclass
class ServedModel:
    """The model behind the server: `name` is its served id, `variant` its chat format."""

    name: str
    tokenizer: Any  # whale.tokenizer.Tokenizer (encode/decode/id_to_token)
    variant: ChatVariant
    max_model_len: int
    config: dict[str, Any] = field(default_factory=dict)
    created: int = 0
    defaults: GenerationDefaults | None = None  # None: the chat format's recommendation, else the API's
    effort_budgets: dict[str, int | None] = field(default_factory=lambda: dict(EFFORT_BUDGETS))
    thinking_budget: int | None = None  # the budget of a request that names none (None: max_tokens' answer room)
    min_answer_tokens: int = MIN_ANSWER_TOKENS
    vocab_size: int = 0  # the model's (0: the tokenizer's); with eos_ids, what a grammar is compiled for
    eos_ids: frozenset[int] = frozenset()
    kernels: str = "dense"  # the linears' kernels the model loaded with (LoadedModel.kernels), for the banner
    route_names: tuple[str, ...] = ()  # the complexity route's names (deepseek-auto, auto) where it is on

    def __post_init__(self) -> None:
        if self.defaults is None:
            self.defaults = generation_defaults(self.variant, {}, "")

    @property
    def capabilities(self) -> Capabilities:
        return capabilities_for(self.variant, self.config)

    @property
    def model_ids(self) -> list[str]:
        return served_names(self.name, self.route_names)

    def thinking_for(self, model: str) -> bool | None:
        """The thinking preference a model name carries: the aliases pick a mode where the model has both."""
        if model not in self.model_ids:
            raise APIError(400, f"Model Not Exist: this server serves {', '.join(map(repr, self.model_ids))}; "
                                f"set 'model' to one of them (got {model!r})", param="model")
        if model == self.name or model in self.route_names or len(self.capabilities.thinking_modes) < 2:
            return None
        return NAME_THINKING[model]

    def thinking_of(self, model: str, requested: bool | None) -> bool:
        """Whether a request for `model` runs in thinking mode: its explicit choice, else the name's, else the
        model's default; a mode the model lacks is a 400."""
        return resolve_thinking(self.variant, self.thinking_for(model) if requested is None else requested)

    # -- chat ---------------------------------------------------------------------------------------------
    def prepare_chat(self, req: Any, clamp_max_tokens: bool = False) -> PreparedRequest:
        """`req` is a ChatCompletionRequest; capability problems and over-long prompts raise 400s.
        `clamp_max_tokens` fits a too-large max_tokens into the mode's maximum and the context instead of refusing
        (the Anthropic route: its clients ask for large budgets, 32K is common)."""
        prompt = self._chat_prompt(req)
        thinking, ids = prompt.thinking, prompt.ids
        limits = THINKING_MAX_TOKENS if thinking else CHAT_MAX_TOKENS
        max_tokens = self._max_tokens(len(ids), req.max_tokens, limits, clamp=clamp_max_tokens)
        budget = self.reasoning_budget(req, max_tokens) if prompt.reasoning is not None else None
        structured = self.structured_output(req)
        reasoning = prompt.reasoning if budget is not None or (structured and prompt.thinking) else None
        # thinking mode ignores the sampling knobs, as the DeepSeek API does
        params = self.defaults.sampling_params(
            thinking_budget=budget, reasoning=reasoning, structured_output=structured,
            temperature=None if thinking else req.temperature, top_p=None if thinking else req.top_p,
            presence_penalty=0.0 if thinking else (req.presence_penalty or 0.0),
            frequency_penalty=0.0 if thinking else (req.frequency_penalty or 0.0), max_tokens=max_tokens,
            stop=req.stop, seed=req.seed,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        return PreparedRequest(req.model, ids, params, thinking, prompt.parser)

    def structured_output(self, req: Any) -> StructuredOutput | None:
        """The grammar a request asks for: a forced tool call (`tool_choice` "required" or a named function, in the
        model's own call format), a reply that answers or calls `strict` tools (their arguments held to their
        schemas; the answer to the response_format's JSON, if any), or its response_format; checked here (a 400
        naming what llguidance cannot serve) on the request's worker thread, which also builds the tokenizer's
        grammar view once."""
        tools = _request_tools(req)
        forced = req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice)
        strict = not forced and has_strict_tools(tools)
        kind = req.response_format.type if req.response_format is not None else "text"
        extra = req.structured_outputs
        if not forced and not strict and kind == "text" and extra is None:
            return None
        if strict and extra is not None:
            raise APIError(400, "structured_outputs cannot be combined with strict tools: give the answer's JSON "
                           "schema as response_format, or drop `strict` from the tools", param="structured_outputs")
        param = "tool_choice" if forced else "tools" if strict else "response_format" if kind != "text" else (
            "structured_outputs")
        schema = req.response_format.json_schema.schema_ if kind == "json_schema" else {}
        try:
            view = grammar_tokenizer(self.tokenizer, self.vocab_size or self.tokenizer.vocab_size, self.eos_ids)
            marker = token_marker(self.tokenizer, view)
            if forced:
                name = req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else None
                spec = StructuredOutput("grammar", forced_call_grammar(self.variant, tools, name, marker))
            elif strict:
                answer = None if kind == "text" else {"type": "object", **schema}
                spec = StructuredOutput("grammar", strict_tools_grammar(self.variant, tools, marker, answer))
            elif kind == "text":
                spec = _vllm_structured_output(extra)
            else:
                spec = StructuredOutput(kind, json.dumps(schema) if kind == "json_schema" else "")
            compile_grammar(spec, view)
        except InvalidRequestError as exc:
            raise APIError(400, str(exc), param=param) from exc
        return spec

    def reasoning_budget(self, req: Any, max_tokens: int) -> int | None:
        """A thinking request's reasoning budget: its `thinking.budget_tokens`, else its reasoning_effort's, else
        the server's; always lowered so that the answer keeps `min_answer_tokens` (at most half of max_tokens).
        None where no budget is asked for and max_tokens leaves no room to keep."""
        budget = req.thinking.budget_tokens if req.thinking is not None else None
        if budget is None and req.reasoning_effort is not None:
            budget = self.effort_budgets.get(req.reasoning_effort)
        if budget is None:
            budget = self.thinking_budget
        ceiling = max_tokens - min(self.min_answer_tokens, max_tokens // 2)
        if budget is None:
            return ceiling if max_tokens >= 2 * self.min_answer_tokens else None
        return max(1, min(budget, ceiling))

    def prompt_tokens(self, req: Any) -> int:
        """How many tokens the ChatCompletionRequest's prompt is, as the model would see it."""
        return len(self._chat_prompt(req).ids)

    def _chat_prompt(self, req: Any) -> ChatPrompt:
        """The ChatCompletionRequest's conversation ready for the engine (whale.chat.conversation), refusing what
        the model cannot do."""
        named = self.thinking_for(req.model)
        thinking = named if req.thinking is None else req.thinking.type == "enabled"
        tools = _request_tools(req)
        messages = [m.as_template_dict() for m in req.messages]
        if req.response_format is not None and req.response_format.type != "text":
            schema = req.response_format.json_schema.schema_ if req.response_format.json_schema else None
            messages = _with_json_instruction(messages, schema)
        prompt = chat_prompt(self.variant, self.tokenizer, messages, thinking=thinking, tools=tools,
                             prefix=req.prefix, effort=req.reasoning_effort, config=self.config)
        if prompt.thinking and (req.logprobs or req.top_logprobs is not None):
            raise APIError(400, "logprobs and top_logprobs are not supported in thinking mode: remove them, or "
                                "disable thinking (model 'deepseek-chat' or thinking {'type': 'disabled'})",
                           param="logprobs")
        return prompt

    # -- FIM ----------------------------------------------------------------------------------------------
    def prepare_fim(self, req: Any) -> PreparedRequest:
        """`req` is a CompletionRequest: with a `suffix` on a FIM-capable model the prompt is the FIM format,
        otherwise the prompt is completed as plain text."""
        thinking = self.thinking_for(req.model)
        if thinking:
            raise APIError(400, "FIM completion is not available in thinking mode: use model 'deepseek-chat'",
                           param="model")
        limits = FIM_MAX_TOKENS
        if isinstance(req.prompt, list):  # token ids, sent as the model is to read them (the engine checks them)
            ids = list(req.prompt)
            echo = self.tokenizer.decode(ids) if req.echo and max(ids) < self.tokenizer.vocab_size else ""
            limits = (FIM_MAX_TOKENS[0], self.max_model_len)  # a rendered conversation (a whale front's), not FIM
        elif req.suffix is not None or self.capabilities.fim:
            check_request(self.variant, fim=True, config=self.config)
            ids, echo = encode_prompt(self.tokenizer, render_fim(req.prompt, req.suffix or "")), req.prompt
        else:
            ids, echo = self.tokenizer.encode(req.prompt), req.prompt
        max_tokens = self._max_tokens(len(ids), req.max_tokens, limits)
        structured = _vllm_structured_output(req.structured_outputs) if req.structured_outputs else None
        params = self.defaults.sampling_params(
            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
            repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0, max_tokens=max_tokens, stop=req.stop, seed=req.seed,
            min_tokens=req.min_tokens, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
            skip_special_tokens=req.skip_special_tokens, include_stop_str_in_output=req.include_stop_str_in_output,
            structured_output=structured, logprobs=req.logprobs,
            prompt_logprobs=req.logprobs if req.echo else None)
        return PreparedRequest(req.model, ids, params, echo_text=echo if req.echo else "")

    def _max_tokens(self, prompt_tokens: int, requested: int | None, limits: tuple[int, int],
                    clamp: bool = False) -> int:
        """The one max_tokens rule: the request's max_tokens within DeepSeek's limit for the mode (a 422 past it)
        and the context (a 400 with both numbers when the prompt plus an explicit max_tokens does not fit);
        `clamp` lowers a too-large max_tokens to both instead. Unset: the mode's default, within the context."""
        default, maximum = limits
        if clamp and requested is not None:
            requested = max(1, min(requested, maximum, self.max_model_len - prompt_tokens))
        if requested is not None and requested > maximum:
            raise APIError(422, f"Invalid max_tokens value, the valid range of max_tokens is [1, {maximum}]",
                           param="max_tokens")
        completion = requested or 0
        if prompt_tokens + completion > self.max_model_len or prompt_tokens >= self.max_model_len:
            room = self.max_model_len - prompt_tokens
            fix = (f"set max_tokens to at most {room}, or shorten the messages" if room > 0 and completion
                   else "Please reduce the length of the messages")
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                f"you requested {prompt_tokens + completion} tokens ({prompt_tokens} in the "
                                f"messages, {completion} in the completion): {fix}.",
                           param="max_tokens" if room > 0 and completion else "messages")
        return requested or min(default, self.max_model_len - prompt_tokens)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False)) if text else 0


def _vllm_structured_output(extra: Any) -> StructuredOutput:
    if extra.json_ is not None:
        return StructuredOutput("json_schema", extra.json_ if isinstance(extra.json_, str) else json.dumps(extra.json_))
    if extra.regex is not None:
        return StructuredOutput("regex", extra.regex)
    if extra.choice is not None:
        return StructuredOutput("choice", json.dumps(extra.choice))
    return StructuredOutput("grammar", extra.grammar)


_JSON_INSTRUCTION = "Reply with one valid JSON object and nothing else."


def _with_json_instruction(messages: list[dict[str, Any]], schema: dict[str, Any] | None) -> list[dict[str, Any]]:
    """JSON mode: the DeepSeek API asks the prompt to mention JSON; whale adds a one-line instruction (with the
    schema, if any) to the system prompt, so the model knows what the grammar will hold it to."""
    instruction = _JSON_INSTRUCTION
    if schema is not None:
        instruction += f" It must follow this JSON schema: {json.dumps(schema, ensure_ascii=False)}"
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{_content_text(first.get('content'))}\n\n{instruction}"
        return [first, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]


def _content_text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def _request_tools(req: Any) -> list[dict[str, Any]]:
    """The tools a ChatCompletionRequest offers the model, as dicts (none with `tool_choice: "none"`)."""
    return [t.model_dump(exclude_none=True) for t in req.tools or ()] if req.tool_choice != "none" else []


def served_model_from_loaded(loaded: Any, max_model_len: int, name: str | None = None,
                             chat_format: str | None = None, created: int = 0) -> ServedModel:
    """Build the ServedModel of a whale LoadedModel."""
    variant, config = detect_loaded_variant(loaded, forced=chat_format)
    stem = loaded.files.path.name if loaded.files.format == "hf" else loaded.files.path.stem
    # a GGUF's served id drops its quantisation suffix: SmolLM2-135M-Instruct.Q4_1 -> smollm2-135m-instruct
    default_name = re.sub(r"\.(q\d\w*|i?q\d\w*|f16|f32|bf16)$", "", stem.lower())
    defaults = generation_defaults(variant, loaded.generation_config, loaded.generation_config_source)
    return ServedModel(name or default_name, loaded.tokenizer, variant, max_model_len, config, created, defaults,
                       vocab_size=loaded.config.vocab_size, eos_ids=eos_token_ids(loaded), kernels=loaded.kernels)
