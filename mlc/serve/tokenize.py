"""vLLM's tokenizer routes: `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`.

Clients that tokenize through the server use them: lm-evaluation-harness's `local-completions`
detects them (`tokenizer_backend` auto or `remote`) and then needs no local tokenizer, so it
runs offline against any model the server has, including the embedded one.

    POST /tokenize    {"prompt": "text", "add_special_tokens": true}  (or "messages": [...])
                      -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize  {"tokens": [ids]} -> {"prompt": "text"}
    GET  /tokenizer_info -> {"tokenizer_class", "bos_token", "eos_token", "pad_token",
                             "chat_template", "model_max_length", "vocab_size"}

A prompt is tokenized as `/v1/completions` tokenizes it (the model's BOS when it adds one,
unless `add_special_tokens` is false); `messages` go through the chat template as
`/v1/chat/completions` renders them.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from mlc.errors import BadRequestError
from mlc.runtime.protocol import TopLevelRequest


class TokenizeRequest(TopLevelRequest):
    """`prompt` (a completion's text) or `messages` (a chat's), not both."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None     # validated as a chat request's
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(TopLevelRequest):
    model: str | None = None
    tokens: list[int]


def _check_model(engine: Any, model: str | None) -> None:
    if not engine.serves_model(model):
        raise BadRequestError(f"The model {model!r} does not exist: this server serves "
                              f"{engine.model_id!r}.", param="model", code="model_not_found")


def tokenize(engine: Any, req: TokenizeRequest) -> dict:
    """The body of `POST /tokenize`."""
    _check_model(engine, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise BadRequestError("Give exactly one of 'prompt' and 'messages'.", param="prompt")
    if req.prompt is not None:
        ids = engine.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    else:
        ids = engine.encode_chat(req.messages)
    strs = [engine.decode([t]) for t in ids] if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": engine.limits.context_window_size,
            "tokens": ids, "token_strs": strs}


def detokenize(engine: Any, req: DetokenizeRequest) -> dict:
    """The body of `POST /detokenize`."""
    _check_model(engine, req.model)
    vocab = engine.model.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise BadRequestError(f"Invalid 'tokens': {bad[:5]} are outside the vocabulary "
                              f"[0, {vocab}).", param="tokens")
    return {"prompt": engine.decode(req.tokens)}


def tokenizer_info(engine: Any) -> dict:
    """The body of `GET /tokenizer_info`."""
    chat = engine.chat_config

    def token(token_id: int | None, text: str | None = None) -> str | None:
        if text is not None or token_id is None:
            return text
        return engine.tokenizer.id_to_token(token_id)

    eos_id = chat.eos_token_id[0] if chat.eos_token_id else None
    return {"tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token(chat.bos_token_id, chat.bos_token),
            "eos_token": token(eos_id, chat.eos_token),
            "pad_token": token(chat.pad_token_id),
            "chat_template": chat.chat_template,
            "model_max_length": engine.limits.context_window_size,
            "vocab_size": engine.model.vocab_size}


def register(app: FastAPI, state: Any, auth: list, read_json) -> None:
    """Add the tokenizer routes to `app` (state: the app's `_ServerState`)."""

    @app.post("/tokenize", dependencies=auth, tags=["Tokenizer"])
    async def tokenize_route(request: Request) -> dict:
        """Token ids of a prompt or of chat messages (vLLM's route)."""
        data = await read_json(request, state.limits.max_body_bytes)
        return tokenize(state.engine, TokenizeRequest.model_validate(data))

    @app.post("/detokenize", dependencies=auth, tags=["Tokenizer"])
    async def detokenize_route(request: Request) -> dict:
        """The text of token ids (vLLM's route)."""
        data = await read_json(request, state.limits.max_body_bytes)
        return detokenize(state.engine, DetokenizeRequest.model_validate(data))

    @app.get("/tokenizer_info", dependencies=auth, tags=["Tokenizer"])
    async def tokenizer_info_route() -> dict:
        """The special tokens, chat template and sizes of the tokenizer (vLLM's route)."""
        return tokenizer_info(state.engine)


__all__ = ["register", "tokenize", "detokenize", "tokenizer_info"]
