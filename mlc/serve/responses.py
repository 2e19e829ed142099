"""`POST /v1/responses`: OpenAI's Responses API, stateless, over the chat-completion path.

    client.responses.create(model=..., input="Hi", instructions="Be brief.",
                            max_output_tokens=32)
    with client.responses.stream(model=..., input=[...], tools=[...]) as stream: ...

Supported: `input` as a string or as items (messages with text content, `function_call` and
`function_call_output` items), `instructions`, `max_output_tokens`, `temperature`, `top_p`,
function `tools` with `tool_choice` and `parallel_tool_calls`, `text.format` (text,
json_object, json_schema: the same grammar path as chat's `response_format`), `metadata`,
`user`, and `stream` with the Responses event types. Nothing is stored: the response says
`"store": false`, and `previous_response_id` is a 400 (send the whole conversation as
items instead). Errors have OpenAI's shape.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from pydantic import Field, ValidationError, field_validator

from mlc.errors import BadRequestError, MLCError
from mlc.runtime import protocol as P
from mlc.serve.bridge import run_chat, sse_event

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The request


class InputContent(P.RequestModel):
    """A text part of an input message (`input_text`; `output_text` in replayed turns)."""

    type: Literal["input_text", "output_text", "text"] = "input_text"
    text: str


class MessageItem(P.RequestModel):
    """An input message: {"role", "content": str | [text parts]} (type "message")."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputContent]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else \
            "".join(p.text for p in self.content)


class FunctionCallItem(P.RequestModel):
    """A function call the model made earlier (replayed in the input)."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(P.RequestModel):
    """The result of a function call, answering `call_id`."""

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputContent]

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else \
            "".join(p.text for p in self.output)


_ITEM_TYPES = {"message": MessageItem, "function_call": FunctionCallItem,
               "function_call_output": FunctionCallOutputItem}


class FunctionTool(P.RequestModel):
    """{"type": "function", "name", "description", "parameters", "strict"}."""

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(P.RequestModel):
    """`text.format`: {"type": "text" | "json_object" | "json_schema", "name", "schema"}."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(P.RequestModel):
    """`text`: the output's format."""

    format: TextFormat = TextFormat()


class NamedFunction(P.RequestModel):
    """tool_choice naming one function: {"type": "function", "name": ...}."""

    type: Literal["function"]
    name: str


class ResponsesRequest(P.TopLevelRequest):
    """POST /v1/responses (the fields mlc serves; others are logged and ignored)."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if not value:
            raise ValueError("must be a non-empty string or list of items.")
        return value


def _item(i: int, raw: dict[str, Any]):
    kind = raw.get("type", "message")
    model = _ITEM_TYPES.get(kind)
    if model is None:
        raise BadRequestError(f"Invalid 'input[{i}].type': {kind!r} items are not supported; "
                              f"use one of {sorted(_ITEM_TYPES)}.", param=f"input[{i}].type")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        err = P.bad_request_from_validation(e)
        param = f"input[{i}].{err.param}" if err.param else f"input[{i}]"
        raise BadRequestError(f"Invalid '{param}': {e.errors()[0]['msg']}",
                              param=param) from None


def _tools(req: ResponsesRequest) -> list[FunctionTool]:
    out = []
    for i, raw in enumerate(req.tools or []):
        if raw.get("type") != "function":
            raise BadRequestError(f"Invalid 'tools[{i}].type': only function tools are "
                                  f"supported, got {raw.get('type')!r}.",
                                  param=f"tools[{i}].type")
        try:
            out.append(FunctionTool.model_validate(raw))
        except ValidationError as e:
            err = P.bad_request_from_validation(e)
            raise BadRequestError(err.message, param=f"tools[{i}].{err.param}") from None
    return out


def chat_request(req: ResponsesRequest, request_id: str) -> P.ChatCompletionRequest:
    """The chat completion request that answers `req`."""
    if req.previous_response_id is not None:
        raise BadRequestError("This server stores no responses, so 'previous_response_id' "
                              "cannot be resolved; send the conversation as input items.",
                              param="previous_response_id")
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else \
        [_item(i, raw) for i, raw in enumerate(req.input)]
    for item in items:
        if isinstance(item, dict):
            messages.append(item)
        elif isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id,
                             "content": item.text()})
    tools = _tools(req)
    choice = req.tool_choice
    if isinstance(choice, NamedFunction):
        choice = {"type": "function", "function": {"name": choice.name}}
    fmt = (req.text or TextConfig()).format
    response_format = None
    if fmt.type == "json_object":
        response_format = {"type": "json_object"}
    elif fmt.type == "json_schema":
        if not fmt.schema_:
            raise BadRequestError("Invalid 'text.format': type 'json_schema' needs a 'schema'.",
                                  param="text.format.schema")
        response_format = {"type": "json_schema", "json_schema": {
            "name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}}
    return P.parse_chat_request(
        model=req.model, messages=messages, max_tokens=req.max_output_tokens,
        temperature=req.temperature, top_p=req.top_p,
        tools=[{"type": "function", "function": t.model_dump(exclude={"type"})}
               for t in tools] or None,
        tool_choice=choice, parallel_tool_calls=req.parallel_tool_calls,
        response_format=response_format, user=req.user, stream=req.stream,
        stream_options={"include_usage": True} if req.stream else None,
        request_id=request_id)


# ---------------------------------------------------------------------------------------------
# The response


class _Response:
    """Builds the Response object of one request (and its output items)."""

    def __init__(self, req: ResponsesRequest, rid: str, model: str):
        self.req, self.rid, self.model = req, rid, model
        self.created = int(time.time())
        self.output: list[dict[str, Any]] = []

    def body(self, status: str, usage: P.CompletionUsage | None = None,
             finish_reason: str | None = None) -> dict[str, Any]:
        req = self.req
        incomplete = {"reason": "max_output_tokens"} if finish_reason == "length" else None
        if incomplete:
            status = "incomplete"
        return {
            "id": self.rid, "object": "response", "created_at": self.created,
            "status": status, "error": None, "incomplete_details": incomplete,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "model": self.model, "output": list(self.output),
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": None, "reasoning": None, "store": False,
            "temperature": req.temperature, "text": (req.text or TextConfig()).model_dump(
                by_alias=True, exclude_none=True),
            "tool_choice": (req.tool_choice.model_dump() if isinstance(req.tool_choice,
                            NamedFunction) else req.tool_choice or "auto"),
            "tools": [t.model_dump() for t in _tools(req)], "top_p": req.top_p,
            "truncation": "disabled", "usage": _usage(usage) if usage else None,
            "user": req.user, "metadata": req.metadata or {},
        }


def _usage(usage: P.CompletionUsage) -> dict[str, Any]:
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens}


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [_text_part(text)] if status == "completed" else []}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(call: Any, arguments: str | None = None, status: str = "completed") -> dict:
    return {"type": "function_call", "id": "fc_" + call.id.removeprefix("call_"),
            "call_id": call.id, "name": call.function.name,
            "arguments": call.function.arguments if arguments is None else arguments,
            "status": status}


def response_body(req: ResponsesRequest, rid: str, completion: P.ChatCompletion) -> dict:
    """The Response object for a finished chat completion."""
    resp = _Response(req, rid, completion.model)
    choice = completion.choices[0]
    msg = choice.message
    if msg.content or not msg.tool_calls:
        resp.output.append(_message_item(P.random_id("msg_"), msg.content or ""))
    for call in msg.tool_calls or []:
        resp.output.append(_call_item(call))
    return resp.body("completed", completion.usage, choice.finish_reason)


class _EventStream:
    """Chat chunks -> the Responses API's server-sent events."""

    def __init__(self, req: ResponsesRequest, rid: str, model: str):
        self.resp = _Response(req, rid, model)
        self.seq = 0
        self.msg_id: str | None = None
        self.text = ""

    def event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return sse_event(kind, json.dumps(payload, ensure_ascii=False))

    def open_message(self) -> list[str]:
        self.msg_id = P.random_id("msg_")
        index = len(self.resp.output)
        self.resp.output.append(_message_item(self.msg_id, "", "in_progress"))
        return [self.event("response.output_item.added", output_index=index,
                           item=_message_item(self.msg_id, "", "in_progress")),
                self.event("response.content_part.added", item_id=self.msg_id,
                           output_index=index, content_index=0, part=_text_part(""))]

    def close_message(self) -> list[str]:
        index = len(self.resp.output) - 1
        item = self.resp.output[index] = _message_item(self.msg_id, self.text)
        return [self.event("response.output_text.done", item_id=self.msg_id,
                           output_index=index, content_index=0, text=self.text, logprobs=[]),
                self.event("response.content_part.done", item_id=self.msg_id,
                           output_index=index, content_index=0, part=_text_part(self.text)),
                self.event("response.output_item.done", output_index=index, item=item)]

    def call_events(self, call: Any) -> list[str]:
        index = len(self.resp.output)
        item = _call_item(call)
        self.resp.output.append(item)
        args = call.function.arguments
        return [self.event("response.output_item.added", output_index=index,
                           item=_call_item(call, "", "in_progress")),
                self.event("response.function_call_arguments.delta", item_id=item["id"],
                           output_index=index, delta=args),
                self.event("response.function_call_arguments.done", item_id=item["id"],
                           output_index=index, name=call.function.name, arguments=args),
                self.event("response.output_item.done", output_index=index, item=item)]

    async def events(self, chunks: AsyncIterator[P.ChatCompletionChunk]) -> AsyncIterator[str]:
        """The whole event stream, from response.created to response.completed (or an
        `error` event if the engine fails midway)."""
        yield self.event("response.created", response=self.resp.body("in_progress"))
        yield self.event("response.in_progress", response=self.resp.body("in_progress"))
        usage, reason, calls = None, None, []
        try:
            async for chunk in chunks:
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    reason = choice.finish_reason or reason
                    calls += choice.delta.tool_calls or []
                    if choice.delta.content:
                        if self.msg_id is None:
                            for e in self.open_message():
                                yield e
                        self.text += choice.delta.content
                        yield self.event("response.output_text.delta", item_id=self.msg_id,
                                         output_index=len(self.resp.output) - 1,
                                         content_index=0, delta=choice.delta.content,
                                         logprobs=[])
        except MLCError as e:
            yield self._error(e.to_openai()["error"])
            return
        except Exception:  # noqa: BLE001 - reported to the client, logged with traceback
            logger.exception("responses stream failed")
            yield self._error({"message": "Internal server error; see the server log.",
                               "type": "internal_server_error", "code": None, "param": None})
            return
        finally:
            await chunks.aclose()
        if self.msg_id is None and not calls:
            for e in self.open_message():
                yield e
        if self.msg_id is not None:
            for e in self.close_message():
                yield e
        for call in calls:
            for e in self.call_events(P.ChatCompletionMessageToolCall(
                    id=call.id, function=P.Function(name=call.function.name,
                                                    arguments=call.function.arguments))):
                yield e
        body = self.resp.body("completed", usage, reason)
        kind = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
        yield self.event(kind, response=body)

    def _error(self, error: dict[str, Any]) -> str:
        return self.event("error", code=error.get("code") or error.get("type"),
                          message=error["message"], param=error.get("param"))


# ---------------------------------------------------------------------------------------------
# The route


def register(app: FastAPI, state: Any, auth: list, read_json) -> None:
    """Add `POST /v1/responses` to `app` (state: the app's `_ServerState`)."""

    @app.post("/v1/responses", dependencies=auth, tags=["OpenAI"])
    async def create_response(request: Request):
        """Create a model response (OpenAI's Responses API; stateless)."""
        data = await read_json(request, state.limits.max_body_bytes)
        req = ResponsesRequest.model_validate(data)
        rid = P.random_id("resp_")
        chat = chat_request(req, rid)
        return await run_chat(state, request, chat,
                              lambda completion: response_body(req, rid, completion),
                              _EventStream(req, rid, state.engine.model_id).events)


__all__ = ["register", "ResponsesRequest", "chat_request", "response_body"]
