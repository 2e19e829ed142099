"""The OpenAI-compatible HTTP app: FastAPI routes over an `AsyncMLCEngine`.

    app = create_app(engine, api_key="sk-...")      # any ASGI server runs it (uvicorn)

Routes: `POST /v1/chat/completions`, `POST /v1/completions` (JSON, or SSE with
``stream: true``), `POST /v1/embeddings` (`mlc.runtime.embeddings`), `GET /v1/models`,
`GET /v1/models/{id}`, `GET /health`, `GET /metrics` (Prometheus), `POST /v1/responses`
(`mlc.serve.responses`), vLLM's `POST /tokenize`, `POST /detokenize` and
`GET /tokenizer_info` (`mlc.serve.tokenize`), `POST /v1/messages` (Anthropic's,
`mlc.serve.anthropic`), `POST /debug/dump_event_trace` (with `enable_debug`,
`mlc.serve.debug`), and the schema at `/openapi.json`. The app uses only the engine's public
interface (`serve_request`, `embeddings.create`, `encode`/`decode`/`encode_chat`, `abort`,
`is_alive`, `metrics`, `model_id`, `serves_model`, `limits`). Request bodies are read as raw
JSON and validated once, by the protocol's parse functions (which also drop unknown fields and
give the request its id), so every problem is an OpenAI-shaped error,
``{"error": {"message", "type", "param", "code"}}``, never FastAPI's 422:

    400 invalid request (including max_tokens beyond the context window)
    401 missing or wrong `Authorization: Bearer KEY` (when the app has an api_key)
    404 unknown route, or a `model` this server does not serve (code "model_not_found")
    413 body larger than `max_body_bytes`
    429 more than `max_waiting_requests` requests waiting for a batch slot
    500 internal error (logged with its traceback; the response carries none)

A client that disconnects aborts its request, which frees its KV pages. An engine error in
the middle of a stream arrives as a last ``data: {"error": ...}`` event before ``[DONE]``.
vLLM's and SGLang's structured-output fields (`structured_outputs`, `guided_json`,
`guided_regex`, `guided_grammar`, `guided_choice`, `regex`, `ebnf`, `json_schema`) become the
equivalent `response_format` (`mlc.runtime.grammar.response_format_from_extensions`).
Responses carry an `x-request-id` header: the request's id (a client's own `x-request-id`
header becomes the id when the body names none).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlc.errors import BadRequestError, MLCError, ServerOverloadedError
from mlc.runtime import protocol as P
from mlc.runtime.embeddings import (
    CreateEmbeddingResponse,
    EmbeddingRequest,
    parse_embedding_request,
)
from mlc.runtime.grammar import response_format_from_extensions
from mlc.serve import anthropic, debug, responses, tokenize
from mlc.serve.metrics import metrics_registry, render

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
DEFAULT_MAX_WAITING_REQUESTS = 64


class AuthenticationError(MLCError):
    """No or a wrong API key (HTTP 401)."""

    status_code = 401


class NotFoundError(MLCError):
    """An unknown route or model (HTTP 404)."""

    status_code = 404


class PayloadTooLargeError(MLCError):
    """The request body is larger than the server accepts (HTTP 413)."""

    status_code = 413


class ClientDisconnected(Exception):
    """The client went away before its (non-streaming) response was ready."""


# ---------------------------------------------------------------------------------------------
# Error bodies


class ErrorInfo(BaseModel):
    """The `error` object of an OpenAI error response."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error response: {"error": {...}}."""

    error: ErrorInfo


def error_response(error: MLCError) -> JSONResponse:
    """The JSON response for an `MLCError` (unknown models are 404, as OpenAI answers)."""
    status = 404 if error.code == "model_not_found" else error.status_code
    return JSONResponse(error.to_openai(), status_code=status)


def _internal_error(exc: BaseException) -> MLCError:
    err = MLCError(f"Internal server error ({type(exc).__name__}); see the server log.")
    err.type, err.status_code = "internal_server_error", 500
    return err


def _sse(payload: str) -> str:
    return f"data: {payload}\n\n"


# ---------------------------------------------------------------------------------------------
# The app


@dataclass
class ServerLimits:
    """Limits the app enforces before a request reaches the engine."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS


class _ServerState:
    """What the routes share: the engine, the limits and the count of open requests."""

    def __init__(self, engine: Any, api_key: str | None, limits: ServerLimits):
        self.engine = engine
        self.api_key = api_key
        self.limits = limits
        self.open_requests = 0
        self.started = int(time.time())
        self.registry = metrics_registry(engine)

    def open_request(self) -> None:
        """Count a new request in, or refuse it (429) when too many already wait."""
        waiting = self.open_requests - self.engine.limits.max_batch_size
        if waiting >= self.limits.max_waiting_requests:
            raise ServerOverloadedError(
                f"The server is busy: {waiting} requests are already waiting for a batch slot "
                f"(limit {self.limits.max_waiting_requests}); retry later.")
        self.open_requests += 1

    def close_request(self) -> None:
        self.open_requests -= 1


def create_app(engine: Any, api_key: str | None = None, *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS,
               enable_debug: bool = False) -> FastAPI:
    """The FastAPI app serving `engine` (an `AsyncMLCEngine`); `api_key` None = no auth;
    `enable_debug` adds the /debug routes (`mlc.serve.debug`)."""
    state = _ServerState(engine, api_key, ServerLimits(max_body_bytes, max_waiting_requests))
    app = FastAPI(title="mlc", summary="OpenAI-compatible LLM server (mlc on Apache TVM).",
                  version=_package_version())
    app.state.mlc = state

    @app.exception_handler(MLCError)
    async def _on_mlc_error(request: Request, exc: MLCError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = NotFoundError(f"Unknown route {request.method} {request.url.path}.",
                                code="not_found")
        else:
            err = MLCError(str(exc.detail))
            err.status_code = exc.status_code
        return JSONResponse(err.to_openai(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def check_api_key(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 state.api_key.encode()):
            raise AuthenticationError("Incorrect or missing API key: send the header "
                                      "'Authorization: Bearer <key>'.", code="invalid_api_key")

    auth = [Depends(check_api_key)]
    err_docs = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 429, 500)}

    @app.post("/v1/chat/completions", dependencies=auth, tags=["OpenAI"],
              openapi_extra=_request_body_doc(P.ChatCompletionRequest),
              responses={200: _response_doc(P.ChatCompletion, P.ChatCompletionChunk),
                         **err_docs})
    async def chat_completions(request: Request):
        """Create a chat completion (SSE stream of chunks with `stream: true`)."""
        return await _serve_request(state, request, chat=True)

    @app.post("/v1/completions", dependencies=auth, tags=["OpenAI"],
              openapi_extra=_request_body_doc(P.CompletionRequest),
              responses={200: _response_doc(P.Completion, P.Completion), **err_docs})
    async def completions(request: Request):
        """Create a text completion (SSE stream with `stream: true`)."""
        return await _serve_request(state, request, chat=False)

    @app.post("/v1/embeddings", dependencies=auth, tags=["OpenAI"],
              openapi_extra=_request_body_doc(EmbeddingRequest),
              responses={200: {"model": CreateEmbeddingResponse}, **err_docs})
    async def embeddings(request: Request):
        """Create embeddings: each input's final hidden states, pooled and L2-normalised."""
        return await _serve_embeddings(state, request)

    @app.get("/v1/models", dependencies=auth, tags=["OpenAI"])
    async def list_models() -> dict:
        """The served model, in OpenAI's list shape."""
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}", dependencies=auth, tags=["OpenAI"],
             responses={404: {"model": ErrorResponse}}, openapi_extra={"parameters": [
                 {"name": "model_id", "in": "path", "required": True,
                  "schema": {"type": "string"}}]})
    async def retrieve_model(request: Request) -> dict:
        """One model, if this server serves it."""
        model_id = request.path_params["model_id"]
        if not model_id or not state.engine.serves_model(model_id):
            raise NotFoundError(f"The model {model_id!r} does not exist.", param="model",
                                code="model_not_found")
        return _model_card(state)

    @app.get("/metrics", tags=["Server"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics: requests, tokens, latency histograms, queue and KV-cache gauges."""
        body, content_type = render(state.registry)
        return Response(body, media_type=content_type)

    @app.get("/health", tags=["Server"])
    async def health() -> JSONResponse:
        """200 while the engine runs, 503 once it has stopped."""
        ok = state.engine.is_alive()
        return JSONResponse({"status": "ok" if ok else "engine stopped",
                             "open_requests": state.open_requests},
                            status_code=200 if ok else 503)

    responses.register(app, state, auth, _read_json)
    anthropic.register(app, state, _read_json)
    tokenize.register(app, state, auth, _read_json)
    if enable_debug:
        debug.register(app, state, auth, _read_json, NotFoundError)
    app.openapi = lambda: _openapi(app)
    return app


def _model_card(state: _ServerState) -> dict:
    return {"id": state.engine.model_id, "object": "model", "created": state.started,
            "owned_by": "MLC-LLM"}     # MLC-LLM's value: its clients and tests expect it


# ---------------------------------------------------------------------------------------------
# Serving one request


async def _serve_request(state: _ServerState, request: Request, chat: bool):
    data = await _read_json(request, state.limits.max_body_bytes)
    if data.get("request_id") is None and request.headers.get("x-request-id"):
        data["request_id"] = request.headers["x-request-id"]
    extension_format = response_format_from_extensions(data)   # vLLM's / SGLang's fields
    if extension_format is not None:
        if data.get("response_format") is not None:
            raise BadRequestError("Give either 'response_format' or one of vLLM's/SGLang's "
                                  "structured-output fields, not both.", param="response_format")
        data["response_format"] = extension_format
    parsed = P.parse_chat_request(data) if chat else P.parse_completion_request(data)
    rid = parsed.request_id
    headers = {"x-request-id": rid}
    state.open_request()
    try:
        if parsed.stream:   # returns once submitted; the SSE response watches the client
            result = await state.engine.serve_request(parsed)
        else:
            result = await _unless_disconnected(request, state.engine.serve_request(parsed),
                                                state.engine, rid)
    except ClientDisconnected:
        state.close_request()
        return JSONResponse({}, status_code=499)   # nobody reads it
    except MLCError:
        state.close_request()
        raise
    except Exception as e:  # noqa: BLE001 - any other failure is a 500 without a traceback
        state.close_request()
        logger.exception("request failed")
        return error_response(_internal_error(e))
    if isinstance(result, BaseModel):
        state.close_request()
        return Response(result.model_dump_json(), media_type="application/json",
                        headers=headers)

    def on_close() -> None:
        state.close_request()
        state.engine.abort(rid)

    return _SSEResponse(_sse_events(result), on_close, headers)


async def _serve_embeddings(state: _ServerState, request: Request) -> Response:
    data = await _read_json(request, state.limits.max_body_bytes)
    if data.get("request_id") is None and request.headers.get("x-request-id"):
        data["request_id"] = request.headers["x-request-id"]
    parsed = parse_embedding_request(data)
    rid = parsed.request_id
    state.open_request()
    try:
        result = await _unless_disconnected(request, state.engine.embeddings.create(parsed),
                                            state.engine, rid)
    except ClientDisconnected:
        return JSONResponse({}, status_code=499)   # nobody reads it
    except MLCError:
        raise
    except Exception as e:  # noqa: BLE001 - any other failure is a 500 without a traceback
        logger.exception("embeddings request failed")
        return error_response(_internal_error(e))
    finally:
        state.close_request()
    return Response(result.model_dump_json(), media_type="application/json",
                    headers={"x-request-id": rid})


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object (413 beyond `limit` bytes, 400 if not a JSON object)."""
    too_large = PayloadTooLargeError(
        f"The request body is larger than the server's limit of {limit} bytes.",
        code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequestError(f"The request body is not valid JSON: {e}.") from None
    if not isinstance(data, dict):
        raise BadRequestError("The request body must be a JSON object.")
    return data


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


async def _unless_disconnected(request: Request, coro, engine: Any, request_id: str):
    """Await `coro`; if the client disconnects first, cancel it, abort the request and
    raise `ClientDisconnected`."""
    work = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if work.done():
        return work.result()
    work.cancel()
    engine.abort(request_id)
    raise ClientDisconnected()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse_events(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """`data: {chunk}` events (chunks arrive as JSON text), an error event if the engine
    fails midway, then [DONE]. From the engine's `ChunkStream`, the events of every chunk
    ready at a wakeup go out as one body part: one socket write per stream per wakeup, however
    many steps the event loop fell behind."""
    try:
        batches = getattr(chunks, "batches", None)
        if batches is not None:
            async for batch in batches():
                yield "".join([f"data: {chunk}\n\n" for chunk in batch])
        else:
            async for chunk in chunks:
                yield f"data: {chunk}\n\n"
    except MLCError as e:
        yield _sse(json.dumps(e.to_openai()))
    except Exception as e:  # noqa: BLE001 - reported to the client, logged with traceback
        logger.exception("stream failed")
        yield _sse(json.dumps(_internal_error(e).to_openai()))
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    yield _sse("[DONE]")


class _SSEResponse(StreamingResponse):
    """A server-sent-events response that runs `on_close` however the stream ends
    (finished, failed, or the client went away)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None],
                 headers: dict[str, str]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                  **headers})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            await self.body_iterator.aclose()


# ---------------------------------------------------------------------------------------------
# OpenAPI: the raw-JSON routes still document their request and response schemas


def _request_body_doc(model: type[BaseModel]) -> dict:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _response_doc(response: type[BaseModel], chunk: type[BaseModel]) -> dict:
    return {"model": response, "description": f"A {response.__name__}; with `stream: true`, "
            f"server-sent events `data: <{chunk.__name__}>` ending with `data: [DONE]`."}


def _openapi(app: FastAPI) -> dict:
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                         routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (P.ChatCompletionRequest, P.CompletionRequest, EmbeddingRequest):
        model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(model_schema.pop("$defs", {}))
        components[model.__name__] = model_schema
    app.openapi_schema = schema
    return schema


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("mlc")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "0"


__all__ = ["create_app", "error_response", "ErrorResponse", "ServerLimits",
           "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_WAITING_REQUESTS"]
