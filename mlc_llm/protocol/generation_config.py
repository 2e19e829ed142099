"""`mlc_llm.protocol.generation_config`: MLC-LLM's low-level sampling config.

Its fields and defaults are MLC-LLM's (`max_tokens=-1` means "until a stop or the context
window"); `to_mlc()` turns it into the `GenerationConfig` mlc's engine runs.
"""

from __future__ import annotations

from pydantic import BaseModel

from mlc.runtime import generation_config as _G
from mlc.runtime import protocol as _P
from mlc.runtime.protocol import DebugConfig, ResponseFormat


class GenerationConfig(BaseModel):
    """How to sample and when to stop, for one request (MLC-LLM's field names)."""

    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: dict[int, float] | None = None
    max_tokens: int = -1
    seed: int | None = None
    stop_strs: list[str] | None = None
    stop_token_ids: list[int] | None = None
    response_format: ResponseFormat | None = None
    debug_config: DebugConfig | None = None

    def to_mlc(self) -> _G.GenerationConfig:
        """The same settings as mlc's `GenerationConfig`, validated once, as a chat request's
        are (`BadRequestError` naming the field; also for debug options mlc cannot honour)."""
        fields = self.model_dump(exclude_none=True, exclude={"stop_strs", "max_tokens",
                                                             "response_format", "debug_config"})
        request = _P.ChatCompletionRequest(
            messages=[{"role": "user", "content": ""}], **fields,
            stop=self.stop_strs or None, max_tokens=None if self.max_tokens < 0 else self.max_tokens,
            response_format=self.response_format, debug_config=self.debug_config)
        return request.to_generation_config()


__all__ = ["GenerationConfig"]
