"""The wire format of the DeepSeek API (OpenAI shape): request bodies as pydantic models with the documented
defaults and limits, in strict types (no "12" or true where a number is due). A body that is not the right
shape is a 400, as is an input the server cannot take (`unsupported`); a value out of range is a 422
(errors.py)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from whale.chat.capabilities import REASONING_EFFORTS
from whale.sampling_params import SEED_MAX, SEED_MIN

MAX_STOP_SEQUENCES = 16
MAX_TOOLS = 128
MAX_TOP_LOGPROBS = 20
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


UNSUPPORTED = "unsupported"  # the pydantic error type of an input the server cannot take (a 400)


def unsupported(message: str) -> PydanticCustomError:
    return PydanticCustomError(UNSUPPORTED, message)


def check_function_name(name: str) -> str:
    if not _FUNCTION_NAME.match(name):
        raise ValueError(f"function name {name!r} must be 1-64 characters of a-z, A-Z, 0-9, '_' or '-'")
    return name


class WireModel(BaseModel):
    # Clients send fields the DeepSeek API ignores (user, logit_bias, ...): accept and drop them, as it does.
    model_config = ConfigDict(extra="ignore", strict=True)


class ContentPart(WireModel):
    """An OpenAI content part; only text reaches a text model, anything else is refused rather than dropped."""

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type != "text":
            raise unsupported(f"content parts of type {self.type!r} are not supported: this server's models read "
                              "text only; send {'type': 'text', 'text': ...} parts or a string")
        if self.text is None:
            raise ValueError("a 'text' content part needs 'text'")
        return self


class FunctionCall(WireModel):
    name: str
    arguments: str = "{}"


class ToolCall(WireModel):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(WireModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    # a string, or OpenAI content parts ([{"type": "text", "text": ...}]) which are joined as text
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    prefix: bool = False
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _required_fields(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs 'tool_call_id' (the id of the call it answers)")
        if self.role != "assistant" and self.content is None:
            raise ValueError(f"a {self.role!r} message needs 'content'")
        if self.prefix and self.role != "assistant":
            raise ValueError("'prefix': true is only valid on the last message, with role 'assistant'")
        return self

    @property
    def text(self) -> str:
        """The content as one string (content parts joined; none: empty)."""
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content)
        return self.content or ""

    def as_template_dict(self) -> dict[str, Any]:
        """The plain dict the chat layer renders; content parts are joined into one string."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = self.text
        return message


class FunctionDefinition(WireModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name_rule(cls, value: str) -> str:
        return check_function_name(value)


class Tool(WireModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ToolChoiceFunction(WireModel):
    name: str


class NamedToolChoice(WireModel):
    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class JsonSchemaFormat(WireModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(WireModel):
    # json_schema: OpenAI's shape, which the hosted DeepSeek API lacks; whale constrains the output to it
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs 'json_schema': {'name': ..., 'schema': "
                             "{...}}")
        return self


ReasoningEffort = Literal[tuple(REASONING_EFFORTS)]  # whale.chat.capabilities says what each one runs as


class StructuredOutputs(WireModel):
    """vLLM's `structured_outputs` (sent in `extra_body`), for clients written for vLLM: exactly one of a JSON schema
    (`json`), a `regex`, a `choice` of strings, or a Lark `grammar` (llguidance's dialect)."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = Field(default=None, min_length=1)
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        given = [name for name, value in (("json", self.json_), ("regex", self.regex), ("choice", self.choice),
                                          ("grammar", self.grammar)) if value is not None]
        if len(given) != 1:
            raise ValueError("'structured_outputs' takes exactly one of 'json', 'regex', 'choice', 'grammar' "
                             f"(got {', '.join(given) or 'none'})")
        return self


class StreamOptions(WireModel):
    include_usage: bool = False


class Thinking(WireModel):
    type: Literal["enabled", "disabled"]
    # whale: at most this many reasoning tokens (Anthropic's field; the hosted DeepSeek API ignores it)
    budget_tokens: int | None = Field(default=None, ge=1)


StopField = str | list[str] | None
TokenId = Annotated[int, Field(ge=0)]


def check_stop(stop: StopField) -> StopField:
    if isinstance(stop, list) and len(stop) > MAX_STOP_SEQUENCES:
        raise ValueError(f"'stop' has {len(stop)} sequences; at most {MAX_STOP_SEQUENCES} are allowed")
    return stop


def _check_n(n: int | None) -> int | None:
    if n is not None and n > 1:
        raise unsupported(f"'n' is {n}: this server returns one choice per request; send n=1 (or leave it out) "
                          "and make separate requests for more choices")
    return n


class ChatCompletionRequest(WireModel):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    thinking: Thinking | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    # the OpenAI SDK's current name for max_tokens (langchain-openai sends only this one)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    reasoning_effort: ReasoningEffort | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's extra
    stop: StopField = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # not in the DeepSeek reference; honoured because a self-hosted server can
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    n: int | None = Field(default=None, ge=1)

    @field_validator("stop")
    @classmethod
    def _stop_count(cls, value: StopField) -> StopField:
        return check_stop(value)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        return _check_n(value)

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' requires 'logprobs': true")
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' is only valid with 'stream': true")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or ()}
            wanted = self.tool_choice.function.name
            if wanted not in names:
                raise ValueError(f"'tool_choice' names function {wanted!r}, which is not in 'tools'")
        elif self.tool_choice == "required" and not self.tools:
            raise ValueError("'tool_choice': 'required' needs 'tools'")
        for message in self.messages[:-1]:
            if message.prefix:
                raise ValueError("'prefix': true is only valid on the last message")
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError(f"'max_tokens' ({self.max_tokens}) and 'max_completion_tokens' "
                                 f"({self.max_completion_tokens}) disagree: send one of them")
            self.max_tokens = self.max_completion_tokens
        return self

    @property
    def prefix(self) -> bool:
        return self.messages[-1].prefix


class CompletionRequest(WireModel):
    """FIM completion (Beta): `prompt` is the prefix, `suffix` what follows the hole."""

    model: str
    # OpenAI's forms: a string, token ids, or a list of one of either (one prompt per request, as with `n`)
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    suffix: str | None = None
    echo: bool | None = False
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: StopField = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    n: int | None = Field(default=None, ge=1)
    # vLLM's extras, for clients (and whale fronts, `--upstream-protocol vllm`) written for vLLM
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False  # each choice carries its `token_ids` (and `prompt_token_ids`)
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:N"
    structured_outputs: StructuredOutputs | None = None

    @field_validator("stop")
    @classmethod
    def _stop_count(cls, value: StopField) -> StopField:
        return check_stop(value)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        return _check_n(value)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[Any]) -> str | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str | list):
            if len(value) > 1:
                raise unsupported(f"'prompt' holds {len(value)} prompts: this server completes one prompt per "
                                  "request; send each as its own request")
            value = value[0]
        if isinstance(value, list) and not value:
            raise ValueError("'prompt' is empty: send a string or a list of token ids")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' is only valid with 'stream': true")
        if isinstance(self.prompt, list) and self.suffix is not None:
            raise ValueError("'suffix' needs a text 'prompt' (FIM is built from text): send the prompt as a string")
        return self
