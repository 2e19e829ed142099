"""Serving another API's request through the one chat-completion path.

The Responses API (`mlc.serve.responses`) and Anthropic's Messages API
(`mlc.serve.anthropic`) translate their request into a `ChatCompletionRequest`, run it here
through the engine's public `chat.completions.create`, and translate the `ChatCompletion` (or
its stream of `ChatCompletionChunk`s) back. What `/v1/chat/completions` does around a request
is done here too: the 429 count of open requests, aborting when the client goes away, the
`x-request-id` header.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from mlc.runtime import protocol as P

logger = logging.getLogger(__name__)


async def run_chat(state: Any, request: Request, chat: P.ChatCompletionRequest,
                   respond: Callable[[P.ChatCompletion], dict],
                   stream_events: Callable[[AsyncIterator[P.ChatCompletionChunk]],
                                           AsyncIterator[str]]) -> Response:
    """Run `chat` on the engine: `respond(completion)` is the JSON body, or for a stream
    `stream_events(chunks)` yields the SSE text. MLCErrors propagate to the caller (before
    any streaming starts); other failures are logged and re-raised."""
    from mlc.serve.app import ClientDisconnected, _SSEResponse, _unless_disconnected

    engine, rid = state.engine, chat.request_id
    headers = {"x-request-id": rid}
    state.open_request()
    try:
        result = await _unless_disconnected(request, engine.chat.completions.create(chat),
                                            engine, rid)
    except ClientDisconnected:
        state.close_request()
        return JSONResponse({}, status_code=499)   # nobody reads it
    except BaseException:
        state.close_request()
        raise
    if not chat.stream:
        state.close_request()
        return JSONResponse(respond(result), headers=headers)

    def on_close() -> None:
        state.close_request()
        engine.abort(rid)

    return _SSEResponse(stream_events(result), on_close, headers)


def sse_event(name: str, payload: str) -> str:
    """One named server-sent event (`event: NAME` + `data: JSON`)."""
    return f"event: {name}\ndata: {payload}\n\n"


__all__ = ["run_chat", "sse_event"]
