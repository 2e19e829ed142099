"""`POST /v1/messages`: Anthropic's Messages API over the chat-completion path.

    client = anthropic.Anthropic(base_url="http://127.0.0.1:8000", api_key="none")
    client.messages.create(model=..., max_tokens=64, messages=[{"role": "user", ...}])
    with client.messages.stream(...) as stream: ...

Supported: `system` (a string or text blocks), `messages` with text, `tool_use` and
`tool_result` content blocks, `max_tokens`, `temperature`, `top_p`, `top_k`,
`stop_sequences`, `tools` (`input_schema`) with `tool_choice` (auto, any, tool, none), and
`stream` with Anthropic's events (message_start, content_block_start/delta/stop,
message_delta, message_stop; `error` if the engine fails midway). The API key may come as
`x-api-key` (Anthropic's header) or `Authorization: Bearer`. Errors have Anthropic's shape,
``{"type": "error", "error": {"type": "invalid_request_error", "message": ...}}``.

Differences: a stop sequence ends a message with `stop_reason` "end_turn" (the chat path does
not say which stop ended it); `message_start` counts 0 input tokens and `message_delta`
carries the real input and output counts (the SDK's accumulated message has both); image and
document blocks are a 400.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError, field_validator

from mlc.errors import BadRequestError, MLCError
from mlc.runtime import protocol as P
from mlc.serve.bridge import run_chat, sse_event

logger = logging.getLogger(__name__)

# HTTP status -> Anthropic's error type
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "abort": "end_turn", "content_filter": "refusal"}


# ---------------------------------------------------------------------------------------------
# The request


class TextBlock(P.RequestModel):
    """{"type": "text", "text": ...}."""

    type: Literal["text"]
    text: str


class ToolUseBlock(P.RequestModel):
    """A tool call the assistant made earlier: {"type": "tool_use", "id", "name", "input"}."""

    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(P.RequestModel):
    """The result of a tool call, in a user message."""

    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(b.text for b in self.content)


_BLOCKS = {"text": TextBlock, "tool_use": ToolUseBlock, "tool_result": ToolResultBlock}


class MessageParam(P.RequestModel):
    """One message: a user or assistant turn, content a string or blocks."""

    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class ToolParam(P.RequestModel):
    """A client tool: {"name", "description", "input_schema"}."""

    type: Literal["custom"] | None = None
    name: str
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoiceParam(P.RequestModel):
    """{"type": "auto" | "any" | "tool" | "none", "name"}."""

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class MessagesRequest(P.TopLevelRequest):
    """POST /v1/messages (the fields mlc serves; others are logged and ignored)."""

    model: str
    max_tokens: int = Field(ge=1)
    messages: list[MessageParam]
    system: str | list[TextBlock] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stop_sequences: list[str] | None = None
    stream: bool = False
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _non_empty(cls, value: list) -> list:
        if not value:
            raise ValueError("must contain at least one message.")
        return value


def _blocks(i: int, message: MessageParam) -> list:
    if isinstance(message.content, str):
        return [TextBlock(type="text", text=message.content)]
    out = []
    for j, raw in enumerate(message.content):
        param = f"messages[{i}].content[{j}]"
        kind = raw.get("type")
        model = _BLOCKS.get(kind)
        if model is None:
            raise BadRequestError(f"{param}.type: {kind!r} blocks are not supported; use "
                                  f"text, tool_use or tool_result.", param=f"{param}.type")
        try:
            out.append(model.model_validate(raw))
        except ValidationError as e:
            err = P.bad_request_from_validation(e)
            raise BadRequestError(f"{param}.{err.param}: {e.errors()[0]['msg']}",
                                  param=f"{param}.{err.param}") from None
    return out


def chat_request(req: MessagesRequest, request_id: str) -> P.ChatCompletionRequest:
    """The chat completion request that answers `req`."""
    messages: list[dict[str, Any]] = []
    if req.system:
        system = req.system if isinstance(req.system, str) else \
            "\n".join(b.text for b in req.system)
        messages.append({"role": "system", "content": system})
    for i, message in enumerate(req.messages):
        text, calls = [], []
        for block in _blocks(i, message):
            if isinstance(block, TextBlock):
                text.append(block.text)
            elif isinstance(block, ToolUseBlock):
                calls.append({"id": block.id, "type": "function", "function": {
                    "name": block.name, "arguments": json.dumps(block.input,
                                                                ensure_ascii=False)}})
            else:
                messages.append({"role": "tool", "tool_call_id": block.tool_use_id,
                                 "content": block.text()})
        if message.role == "assistant" and (text or calls):
            messages.append({"role": "assistant", "content": "".join(text) or None,
                             "tool_calls": calls or None})
        elif text:
            messages.append({"role": "user", "content": "".join(text)})
    tools, choice = req.tools, req.tool_choice
    tool_choice: Any = None
    if choice is not None:
        tool_choice = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type) or \
            {"type": "function", "function": {"name": choice.name}}
    return P.parse_chat_request(
        model=req.model, messages=messages, max_tokens=req.max_tokens,
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        stop=req.stop_sequences or None,
        tools=[{"type": "function", "function": {"name": t.name, "description": t.description,
                                                 "parameters": t.input_schema}}
               for t in tools] if tools else None,
        tool_choice=tool_choice,
        parallel_tool_calls=(False if choice is not None and choice.disable_parallel_tool_use
                             else None),
        stream=req.stream, stream_options={"include_usage": True} if req.stream else None,
        request_id=request_id)


# ---------------------------------------------------------------------------------------------
# The response


def _tool_use(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    try:
        args = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        args = {}
    return {"type": "tool_use", "id": "toolu_" + call_id.removeprefix("call_"), "name": name,
            "input": args if isinstance(args, dict) else {"value": args}}


def message_body(rid: str, completion: P.ChatCompletion) -> dict[str, Any]:
    """The Message object for a finished chat completion."""
    choice = completion.choices[0]
    content: list[dict[str, Any]] = []
    if choice.message.content or not choice.message.tool_calls:
        content.append({"type": "text", "text": choice.message.content or ""})
    for call in choice.message.tool_calls or []:
        content.append(_tool_use(call.id, call.function.name, call.function.arguments))
    usage = completion.usage or P.CompletionUsage()
    return {"id": rid, "type": "message", "role": "assistant", "model": completion.model,
            "content": content, "stop_reason": STOP_REASONS[choice.finish_reason],
            "stop_sequence": None,
            "usage": {"input_tokens": usage.prompt_tokens,
                      "output_tokens": usage.completion_tokens}}


def _event(kind: str, **fields: Any) -> str:
    return sse_event(kind, json.dumps({"type": kind, **fields}, ensure_ascii=False))


async def stream_events(rid: str, model: str, chunks: AsyncIterator[P.ChatCompletionChunk]
                        ) -> AsyncIterator[str]:
    """Chat chunks -> Anthropic's message stream events."""
    yield _event("message_start", message={
        "id": rid, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0}})
    text_open, index, reason, usage, calls = False, 0, "stop", None, []
    try:
        async for chunk in chunks:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                reason = choice.finish_reason or reason
                calls += choice.delta.tool_calls or []
                if choice.delta.content:
                    if not text_open:
                        text_open = True
                        yield _event("content_block_start", index=0,
                                     content_block={"type": "text", "text": ""})
                    yield _event("content_block_delta", index=0,
                                 delta={"type": "text_delta", "text": choice.delta.content})
    except MLCError as e:
        yield _error_event(e.status_code, e.message)
        return
    except Exception:  # noqa: BLE001 - reported to the client, logged with traceback
        logger.exception("messages stream failed")
        yield _error_event(500, "Internal server error; see the server log.")
        return
    finally:
        await chunks.aclose()
    if text_open or not calls:
        if not text_open:
            yield _event("content_block_start", index=0,
                         content_block={"type": "text", "text": ""})
        yield _event("content_block_stop", index=0)
        index = 1
    for call in calls:
        block = _tool_use(call.id, call.function.name, call.function.arguments)
        yield _event("content_block_start", index=index, content_block={**block, "input": {}})
        yield _event("content_block_delta", index=index, delta={
            "type": "input_json_delta", "partial_json": json.dumps(block["input"],
                                                                   ensure_ascii=False)})
        yield _event("content_block_stop", index=index)
        index += 1
    usage = usage or P.CompletionUsage()
    yield _event("message_delta", delta={"stop_reason": STOP_REASONS[reason],
                                         "stop_sequence": None},
                 usage={"input_tokens": usage.prompt_tokens,
                        "output_tokens": usage.completion_tokens})
    yield _event("message_stop")


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"),
                                       "message": message}}


def _error_event(status: int, message: str) -> str:
    return sse_event("error", json.dumps(_error_body(status, message), ensure_ascii=False))


def error_response(err: MLCError) -> JSONResponse:
    """An `MLCError` in Anthropic's shape (an unknown model is a 404)."""
    status = 404 if err.code == "model_not_found" else err.status_code
    return JSONResponse(_error_body(status, err.message), status_code=status)


# ---------------------------------------------------------------------------------------------
# The route


def register(app: FastAPI, state: Any, read_json) -> None:
    """Add `POST /v1/messages` to `app` (state: the app's `_ServerState`)."""

    @app.post("/v1/messages", tags=["Anthropic"])
    async def create_message(request: Request):
        """Create a message (Anthropic's Messages API)."""
        try:
            _check_api_key(state.api_key, request)
            data = await read_json(request, state.limits.max_body_bytes)
            req = MessagesRequest.model_validate(data)
            rid = P.random_id("msg_")
            chat = chat_request(req, rid)
            return await run_chat(state, request, chat,
                                  lambda completion: message_body(rid, completion),
                                  lambda chunks: stream_events(rid, state.engine.model_id,
                                                               chunks))
        except MLCError as e:
            return error_response(e)
        except Exception:  # noqa: BLE001 - a 500 without the traceback
            logger.exception("messages request failed")
            return JSONResponse(_error_body(500, "Internal server error; see the server log."),
                                status_code=500)


def _check_api_key(api_key: str | None, request: Request) -> None:
    if api_key is None:
        return
    given = request.headers.get("x-api-key")
    if given is None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else ""
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        err = MLCError("Incorrect or missing API key: send the header 'x-api-key: <key>'.")
        err.status_code = 401
        raise err


__all__ = ["register", "MessagesRequest", "chat_request", "message_body", "stream_events"]
