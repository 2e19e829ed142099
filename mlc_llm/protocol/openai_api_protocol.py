"""`mlc_llm.protocol.openai_api_protocol`: mlc's OpenAI types under MLC-LLM's names.

The classes are mlc's own (`mlc.runtime.protocol`), so a request built here is validated as
the engine and the server validate it, and a response is what they return. Where MLC-LLM uses
one class for a request message and a response message (`ChatCompletionMessage`), the name
points at mlc's request message, which takes every role.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, Field

from mlc.runtime import protocol as _P
from mlc.runtime.generation_config import MAX_TOP_LOGPROBS

# OpenAI's limits, which mlc's request validation enforces.
CHAT_COMPLETION_MAX_TOP_LOGPROBS = MAX_TOP_LOGPROBS       # 20: chat top_logprobs
COMPLETION_MAX_TOP_LOGPROBS = 5                           # completions' logprobs

# requests
ChatCompletionRequest = _P.ChatCompletionRequest
CompletionRequest = _P.CompletionRequest
ChatCompletionMessage = _P.ChatMessage
ChatTool = _P.Tool
ChatFunction = _P.FunctionDefinition
ChatToolCall = _P.ToolCall
ChatFunctionCall = _P.FunctionCall
StreamOptions = _P.StreamOptions
RequestResponseFormat = _P.ResponseFormat

# responses
ChatCompletionResponse = _P.ChatCompletion
ChatCompletionResponseChoice = _P.Choice
ChatCompletionStreamResponse = _P.ChatCompletionChunk
ChatCompletionStreamResponseChoice = _P.ChunkChoice
CompletionResponse = _P.Completion
CompletionResponseChoice = _P.CompletionChoice
CompletionUsage = _P.CompletionUsage
CompletionLogProbs = _P.CompletionLogprobs
LogProbs = _P.ChoiceLogprobs
LogProbsContent = _P.ChatCompletionTokenLogprob
TopLogProbs = _P.TopLogprob


class ModelResponse(BaseModel):
    """One model of `GET /v1/models` (MLC-LLM's defaults)."""

    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    object: str = "model"
    owned_by: str = "MLC-LLM"


class ListResponse(BaseModel):
    """OpenAI's list object, e.g. the body of `GET /v1/models`."""

    object: str = "list"
    data: list[Any]


__all__ = [
    "CHAT_COMPLETION_MAX_TOP_LOGPROBS", "COMPLETION_MAX_TOP_LOGPROBS",
    "ChatCompletionRequest", "CompletionRequest", "ChatCompletionMessage", "ChatTool",
    "ChatFunction", "ChatToolCall", "ChatFunctionCall", "StreamOptions", "RequestResponseFormat",
    "ChatCompletionResponse", "ChatCompletionResponseChoice", "ChatCompletionStreamResponse",
    "ChatCompletionStreamResponseChoice", "CompletionResponse", "CompletionResponseChoice",
    "CompletionUsage", "CompletionLogProbs", "LogProbs", "LogProbsContent", "TopLogProbs",
    "ModelResponse", "ListResponse",
]
