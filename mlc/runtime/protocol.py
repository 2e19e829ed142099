"""OpenAI protocol types: chat/completions requests and responses (pydantic v2).

Fields follow OpenAI's documentation order; mlc's extensions (top_k, repetition_penalty,
ignore_eos, stop_token_ids, request_id) and MLC-LLM's `debug_config` come last. Requests log and drop unknown fields rather
than failing, and every validation problem surfaces as `mlc.errors.BadRequestError` whose
`param` is the path of the offending field (e.g. ``messages[1].content``), before any work.
Responses behave like the `openai` package's objects: attribute access, `model_dump()`,
`model_dump_json()`.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mlc.errors import BadRequestError
from mlc.runtime.generation_config import MAX_STOP_STRS, GenerationConfig

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "abort"]
ROLES = ("system", "user", "assistant", "tool")


# ---------------------------------------------------------------------------------------------
# Errors: pydantic ValidationError -> BadRequestError(param=path)


class _FieldError(ValueError):
    """A validator's complaint about `param`, relative to the model being validated."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


_TYPE_TAG = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE_TAG_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


def _loc_to_param(loc: tuple) -> str:
    """('messages', 0, 'content', 'str') -> 'messages[0].content' (union type tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _TYPE_TAG.fullmatch(part) and part not in _TYPE_TAG_NAMES:
            out += f".{part}" if out else part
    return out


def _join_param(path: str, param: str | None) -> str:
    if not param:
        return path
    return f"{path}.{param}" if path else param


def bad_request_from_validation(err: ValidationError) -> BadRequestError:
    """The `BadRequestError` for the first problem in a pydantic `ValidationError`."""
    first = err.errors()[0]
    path = _loc_to_param(first["loc"])
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, BadRequestError) and not path:
        return cause
    if isinstance(cause, BadRequestError):
        param = _join_param(path, cause.param)
        return BadRequestError(cause.message, param=param or None)
    if isinstance(cause, _FieldError):
        param = _join_param(path, cause.param)
        message = str(cause)
    else:
        param = path
        message = str(cause) if cause is not None else first["msg"]
    if not param:
        return BadRequestError(message)
    return BadRequestError(f"Invalid '{param}': {message}", param=param)


# ---------------------------------------------------------------------------------------------
# Request building blocks


class RequestModel(BaseModel):
    """Base of request types: unknown fields are logged and ignored instead of rejected."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _warn_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields)
            known.update(f.alias for f in cls.model_fields.values() if f.alias)
            unknown = sorted(str(k) for k in data if k not in known)
            if unknown:
                logger.warning("%s: ignoring unknown field(s) %s", cls.__name__, unknown)
        return data


class TopLevelRequest(RequestModel):
    """A whole request: constructing or validating one raises `BadRequestError`."""

    def __init__(self, /, **data: Any):   # (a body may hold a key "self")
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise bad_request_from_validation(e) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any):  # noqa: D102 (pydantic's docstring)
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as e:
            raise bad_request_from_validation(e) from None

    @classmethod
    def model_validate_json(cls, json_data: Any, **kwargs: Any):  # noqa: D102
        try:
            return super().model_validate_json(json_data, **kwargs)
        except ValidationError as e:
            raise bad_request_from_validation(e) from None


class TextContentPart(RequestModel):
    """A {"type": "text", "text": ...} part of a message's content."""

    type: Literal["text"] = "text"
    text: str


class FunctionCall(RequestModel):
    """The function an assistant message called: arguments as a JSON string."""

    name: str
    arguments: str = "{}"

    @field_validator("arguments", mode="before")
    @classmethod
    def _arguments_to_json(cls, value: Any) -> Any:
        return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else value


class ToolCall(RequestModel):
    """A tool call carried by an assistant message of the history."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestModel):
    """One message of a chat request; "developer" is read as "system"."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _check_role(cls, value: Any) -> Any:
        if value == "developer":
            return "system"
        if value not in ROLES:
            raise _FieldError(f"must be one of {', '.join(ROLES)} (or developer), got {value!r}.")
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise _FieldError("must be a string or a list of text parts, "
                              f"got {type(value).__name__}.")
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
            if kind != "text":
                raise _FieldError(f"content part type {kind!r} is not supported; "
                                  "only 'text' parts are.")
        return value

    @model_validator(mode="after")
    def _check_message(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise _FieldError(f"a {self.role} message needs content.", "content")
        if self.tool_calls and self.role != "assistant":
            raise _FieldError("only assistant messages may carry tool_calls.", "tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise _FieldError("a tool message needs the tool_call_id it answers.",
                              "tool_call_id")
        return self

    def text(self) -> str:
        """The content as one string (text parts joined by newlines; None -> "")."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class FunctionDefinition(RequestModel):
    """A function the model may call, with a JSON schema of its parameters."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(RequestModel):
    """{"type": "function", "function": {...}}."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class ToolChoiceFunction(RequestModel):
    """The function named by a tool_choice."""

    name: str


class NamedToolChoice(RequestModel):
    """tool_choice forcing one function: {"type": "function", "function": {"name": ...}}."""

    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class StreamOptions(RequestModel):
    """Streaming options: include_usage adds a final chunk with usage and no choices."""

    include_usage: bool | None = None


class JSONSchemaFormat(RequestModel):
    """The json_schema object of a response_format."""

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | str | None = Field(default=None, alias="schema")  # str: JSON text
    strict: bool | None = None


class ResponseFormat(RequestModel):
    """response_format: text, json_object or json_schema (MLC-LLM's top-level schema too);
    mlc's extensions regex ("regex" or "pattern") and grammar (Lark or GBNF), see
    `mlc.runtime.grammar`."""

    type: Literal["text", "json_object", "json_schema", "regex", "grammar"] = "text"
    json_schema: JSONSchemaFormat | None = None
    schema_: dict[str, Any] | str | None = Field(default=None, alias="schema")
    # mlc extensions
    regex: str | None = None
    pattern: str | None = None
    grammar: str | None = None

    @model_validator(mode="after")
    def _check_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None
                                           or not self.json_schema.schema_):
            raise _FieldError("type 'json_schema' needs a 'json_schema' object with a "
                              "'schema'.", "json_schema")
        return self


class DisaggConfig(RequestModel):
    """MLC-LLM's disaggregated prefill/decode metadata (mlc has no disaggregation)."""

    kind: Literal["prepare_receive", "remote_send", "start_generation"] | None = None
    kv_append_metadata: str | None = None
    kv_window_begin: int | None = None
    kv_window_end: int | None = None
    dst_group_offset: int | None = None


class DebugConfig(RequestModel):
    """MLC-LLM's per-request debug options (`debug_config` in a body or in `extra_body=`),
    with its names and defaults."""

    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens (until max_tokens)."""
    pinned_system_prompt: bool = False
    """Keep the system prompt's KV entries in the prefix cache (MLC-LLM only)."""
    special_request: Literal["query_engine_metrics"] | None = None
    """A request answered by the engine itself, e.g. its metrics in `usage.extra`."""
    grammar_execution_mode: Literal["constraint", "jump_forward"] = "jump_forward"
    """How a grammar is applied; both give the same output."""
    disagg_config: DisaggConfig | None = None
    """Disaggregation metadata (microserving)."""

    def check_supported(self) -> None:
        """Raise `BadRequestError` for options mlc cannot honour (rather than ignore them)."""
        if self.pinned_system_prompt:
            raise BadRequestError("debug_config.pinned_system_prompt needs a prefix cache, "
                                  "which mlc does not have yet; drop it.",
                                  param="debug_config.pinned_system_prompt")
        if self.special_request is not None:
            raise BadRequestError(f"debug_config.special_request={self.special_request!r} is "
                                  "not supported by mlc; read GET /metrics instead.",
                                  param="debug_config.special_request")
        if self.disagg_config is not None:
            raise BadRequestError("debug_config.disagg_config is not supported: mlc has no "
                                  "disaggregated serving.", param="debug_config.disagg_config")


# ---------------------------------------------------------------------------------------------
# Shared validation of the sampling fields of both request types


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


class _SamplingRequest(TopLevelRequest):
    """Validators shared by chat and completion requests (fields are declared by each)."""

    @field_validator("stop", mode="before", check_fields=False)
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise _FieldError("must be a string or a list of strings.")
        if any(s == "" for s in value):
            raise _FieldError("stop strings must be non-empty.")
        if len(value) > MAX_STOP_STRS:
            raise _FieldError(f"at most {MAX_STOP_STRS} stop strings are allowed, "
                              f"got {len(value)}.")
        return value

    @field_validator("logit_bias", mode="before", check_fields=False)
    @classmethod
    def _check_logit_bias(cls, value: Any) -> Any:
        if value is None:
            return value
        if not isinstance(value, dict):
            raise _FieldError("must be an object mapping token ids to biases.")
        out = {}
        for key, bias in value.items():
            try:
                token_id = int(key)
            except (TypeError, ValueError):
                raise _FieldError(f"keys must be token ids (integers), got {key!r}.") from None
            if token_id < 0 or isinstance(key, bool):
                raise _FieldError(f"keys must be token ids (integers >= 0), got {key!r}.")
            if not isinstance(bias, (int, float)) or isinstance(bias, bool) \
                    or not -100 <= bias <= 100:
                raise _FieldError(f"values must be numbers in [-100, 100], got {bias!r} "
                                  f"for token {key}.")
            out[token_id] = float(bias)
        return out

    @field_validator("stop", mode="after", check_fields=False)
    @classmethod
    def _non_empty_stop(cls, value: Any) -> Any:
        if value == "":
            raise _FieldError("stop strings must be non-empty.")
        return value

    @field_validator("stop_token_ids", mode="after", check_fields=False)
    @classmethod
    def _check_stop_token_ids(cls, value: Any) -> Any:
        if value is not None and any(t < 0 for t in value):
            raise _FieldError("token ids must be >= 0.")
        return value

    @field_validator("top_k", mode="before", check_fields=False)
    @classmethod
    def _top_k_minus_one(cls, value: Any) -> Any:
        return 0 if value == -1 else value  # -1 is a common spelling of "disabled"

    def _check_common(self, id_prefix: str) -> None:
        if self.stream_options is not None and not self.stream:
            raise BadRequestError("Invalid 'stream_options': only allowed when 'stream' "
                                  "is true.", param="stream_options")
        if self.debug_config is not None:
            self.debug_config.check_supported()
        if self.request_id is None:     # the one place a request gets its id
            self.request_id = random_id(id_prefix)

    def _generation_config(self, max_tokens: int | None, logprobs: bool,
                           top_logprobs: int) -> GenerationConfig:
        response_format = None
        if self.response_format is not None and self.response_format.type != "text":
            response_format = self.response_format.model_dump(by_alias=True, exclude_none=True)
        return GenerationConfig(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=dict(self.logit_bias or {}), logprobs=logprobs,
            top_logprobs=top_logprobs, max_tokens=max_tokens, seed=self.seed,
            stop_strs=_stop_list(self.stop), stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos or bool(self.debug_config and
                                               self.debug_config.ignore_eos),
            response_format=response_format)


# ---------------------------------------------------------------------------------------------
# Requests


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions (OpenAI) plus mlc's extensions."""

    messages: list[ChatMessage]
    model: str | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[int, float] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=128)
    parallel_tool_calls: bool | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    user: str | None = None
    # mlc extensions
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    request_id: str | None = None
    debug_config: DebugConfig | None = None

    @field_validator("messages")
    @classmethod
    def _non_empty(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise _FieldError("must contain at least one message.")
        return value

    @model_validator(mode="after")
    def _check_request(self) -> ChatCompletionRequest:
        self._check_common("chatcmpl-")
        if self.top_logprobs and not self.logprobs:
            raise BadRequestError("Invalid 'top_logprobs': requires 'logprobs' to be true.",
                                  param="top_logprobs")
        names = [t.function.name for t in self.tools or []]
        if isinstance(self.tool_choice, NamedToolChoice):
            if self.tool_choice.function.name not in names:
                raise BadRequestError(
                    f"Invalid 'tool_choice': function {self.tool_choice.function.name!r} is "
                    f"not among the tools {names}.", param="tool_choice")
        elif self.tool_choice == "required" and not names:
            raise BadRequestError("Invalid 'tool_choice': 'required' needs 'tools'.",
                                  param="tool_choice")
        return self

    def to_generation_config(self) -> GenerationConfig:
        """The request's sampling settings; unset ones stay None (see `with_defaults`)."""
        max_tokens = self.max_completion_tokens or self.max_tokens
        return self._generation_config(max_tokens, self.logprobs, self.top_logprobs or 0)


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions (OpenAI legacy) plus mlc's extensions.

    `prompt` is a string, a list of token ids, or a list holding one of these.
    """

    model: str | None = None
    prompt: str | list[int]
    best_of: int | None = None
    echo: bool = False
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    max_tokens: int | None = Field(default=None, ge=0)   # 0: score the prompt (echo), no text
    n: int = Field(default=1, ge=1, le=128)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    user: str | None = None
    # mlc extensions
    response_format: ResponseFormat | None = None
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    request_id: str | None = None
    debug_config: DebugConfig | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value:
                raise _FieldError("must not be empty.")
            return value
        if not isinstance(value, list) or not value:
            raise _FieldError("must be a non-empty string, list of token ids, "
                              "or list of one string.")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            if min(value) < 0:
                raise _FieldError("token ids must be >= 0.")
            return value
        if all(isinstance(t, (str, list)) for t in value):
            # a batch of one prompt (lm-evaluation-harness sends [[ids]] with batch_size=1)
            if len(value) != 1:
                raise _FieldError(f"batched prompts ({len(value)} prompts) are not "
                                  "supported; send one request per prompt.")
            if isinstance(value[0], list) and not all(isinstance(t, int) for t in value[0]):
                raise _FieldError("a prompt in a list must be a string or a list of token "
                                  "ids.")
            return cls._check_prompt(value[0])
        raise _FieldError("batched prompts are not supported; send a string or one list "
                          "of token ids per request.")

    @model_validator(mode="after")
    def _check_request(self) -> CompletionRequest:
        self._check_common("cmpl-")
        if self.best_of is not None and self.best_of not in (1, self.n):
            raise BadRequestError("Invalid 'best_of': only best_of == n is supported.",
                                  param="best_of")
        if self.suffix:
            raise BadRequestError("Invalid 'suffix': suffix is not supported.", param="suffix")
        return self

    def to_generation_config(self) -> GenerationConfig:
        """The request's sampling settings; unset ones stay None (see `with_defaults`)."""
        gen = self._generation_config(self.max_tokens, self.logprobs is not None,
                                      self.logprobs or 0)
        gen.prompt_logprobs = self.echo and self.logprobs is not None
        return gen


def _merge_args(data: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    merged = dict(data or {})
    merged.update(kwargs)
    return {k: v for k, v in merged.items() if v is not None}  # None at top level = unset


def parse_chat_request(data: dict[str, Any] | None = None,
                       **kwargs: Any) -> ChatCompletionRequest:
    """Validate a chat request given as a dict and/or keyword arguments.

    Top-level None values mean "not given". Raises `BadRequestError` with `param` set to the
    first failing field path.
    """
    if isinstance(data, ChatCompletionRequest) and not kwargs:
        return data
    if isinstance(data, BaseModel):
        data = data.model_dump(exclude_unset=True, by_alias=True)
    return ChatCompletionRequest.model_validate(_merge_args(data, kwargs))


def parse_completion_request(data: dict[str, Any] | None = None,
                             **kwargs: Any) -> CompletionRequest:
    """Validate a completion request given as a dict and/or keyword arguments."""
    if isinstance(data, CompletionRequest) and not kwargs:
        return data
    if isinstance(data, BaseModel):
        data = data.model_dump(exclude_unset=True, by_alias=True)
    return CompletionRequest.model_validate(_merge_args(data, kwargs))


# ---------------------------------------------------------------------------------------------
# Responses (plain pydantic models, like the openai package's)


def random_id(prefix: str) -> str:
    """An OpenAI-style id: "chatcmpl-<hex>", "cmpl-<hex>", "call_<hex>"."""
    return prefix + uuid.uuid4().hex


def _now() -> int:
    return int(time.time())


class TopLogprob(BaseModel):
    """One of the most likely tokens at a position."""

    token: str
    bytes: list[int] | None = None
    logprob: float


class ChatCompletionTokenLogprob(BaseModel):
    """The sampled token at a position, its logprob and the top alternatives."""

    token: str
    bytes: list[int] | None = None
    logprob: float
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    """Logprobs of a chat choice (one entry per generated token)."""

    content: list[ChatCompletionTokenLogprob] | None = None
    refusal: list[ChatCompletionTokenLogprob] | None = None


class Function(BaseModel):
    """A function call made by the model; `arguments` is a JSON string."""

    arguments: str
    name: str


class ChatCompletionMessageToolCall(BaseModel):
    """A tool call in a response message."""

    id: str = Field(default_factory=lambda: random_id("call_"))
    function: Function
    type: Literal["function"] = "function"


class ChatCompletionMessage(BaseModel):
    """The assistant message of a non-streaming chat choice."""

    content: str | None = None
    refusal: str | None = None
    role: Literal["assistant"] = "assistant"
    tool_calls: list[ChatCompletionMessageToolCall] | None = None


class Choice(BaseModel):
    """One choice of a ChatCompletion."""

    finish_reason: FinishReason
    index: int = 0
    logprobs: ChoiceLogprobs | None = None
    message: ChatCompletionMessage


class PromptTokensDetails(BaseModel):
    """OpenAI's breakdown of the prompt tokens: those served from the prefix cache."""

    cached_tokens: int = 0


class CompletionUsage(BaseModel):
    """Token counts of a request; `extra` holds mlc's metrics (e.g. timings)."""

    completion_tokens: int = 0
    prompt_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    extra: dict[str, Any] | None = None


class ChatCompletion(BaseModel):
    """The response of a non-streaming chat request."""

    id: str = Field(default_factory=lambda: random_id("chatcmpl-"))
    choices: list[Choice]
    created: int = Field(default_factory=_now)
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None
    usage: CompletionUsage | None = None


class ChoiceDeltaFunctionCall(BaseModel):
    """A (partial) function call in a streamed delta."""

    arguments: str | None = None
    name: str | None = None


class ChoiceDeltaToolCall(BaseModel):
    """A (partial) tool call in a streamed delta."""

    index: int
    id: str | None = None
    function: ChoiceDeltaFunctionCall | None = None
    type: Literal["function"] | None = None


class Delta(BaseModel):
    """What a streamed chunk adds to a choice's message."""

    content: str | None = None
    refusal: str | None = None
    role: Literal["assistant"] | None = None
    tool_calls: list[ChoiceDeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    """One choice of a ChatCompletionChunk."""

    delta: Delta
    finish_reason: FinishReason | None = None
    index: int = 0
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One streamed piece of a chat response (the last may carry only usage)."""

    id: str = Field(default_factory=lambda: random_id("chatcmpl-"))
    choices: list[ChunkChoice]
    created: int = Field(default_factory=_now)
    model: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    system_fingerprint: str | None = None
    usage: CompletionUsage | None = None


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs: parallel lists, one entry per token."""

    text_offset: list[int] | None = None
    token_logprobs: list[float | None] | None = None
    tokens: list[str] | None = None
    top_logprobs: list[dict[str, float] | None] | None = None


class CompletionChoice(BaseModel):
    """One choice of a Completion (streamed or not)."""

    finish_reason: FinishReason | None = None
    index: int = 0
    logprobs: CompletionLogprobs | None = None
    text: str


class Completion(BaseModel):
    """The response of a completion request; streamed chunks use this type too."""

    id: str = Field(default_factory=lambda: random_id("cmpl-"))
    choices: list[CompletionChoice]
    created: int = Field(default_factory=_now)
    model: str
    object: Literal["text_completion"] = "text_completion"
    system_fingerprint: str | None = None
    usage: CompletionUsage | None = None
