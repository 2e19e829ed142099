"""MLC-LLM's debug routes, served with `mlc serve --enable-debug`.

    POST /debug/dump_event_trace   {"model": "<id>"}  ->  the Chrome trace JSON of the
                                   requests so far (needs `--enable-tracing`)

Errors are OpenAI-shaped: 400 without `model` or without tracing, 404 for another model.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from mlc.errors import BadRequestError


def register(app: FastAPI, state: Any, auth: list, read_json, not_found) -> None:
    """Add the /debug routes to `app` (state: the app's `_ServerState`)."""

    @app.post("/debug/dump_event_trace", dependencies=auth, tags=["Debug"])
    async def dump_event_trace(request: Request) -> dict:
        """The recorded per-request events in Chrome's trace event format."""
        data = await read_json(request, state.limits.max_body_bytes)
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequestError("The body must name the model to query, e.g. "
                                  f'{{"model": "{state.engine.model_id}"}}.', param="model")
        if not state.engine.serves_model(model):
            raise not_found(f"The model {model!r} does not exist.", param="model",
                            code="model_not_found")
        trace = state.engine.event_trace()
        if trace is None:
            raise BadRequestError(f"Engine {state.engine.model_id!r} does not record events; "
                                  "start the server with --enable-tracing.", param="model")
        return trace
