"""`mlc_llm.protocol.generation_config`: MLC-LLM's low-level sampling config.

Its fields and defaults are MLC-LLM's (`max_tokens=-1` means "until a stop or the context
window"); `to_mlc()` turns it into the `GenerationConfig` mlc's engine runs.
"""

from __future__ import annotations

from pydantic import Field

from mlc.errors import BadRequestError
from mlc.runtime import generation_config as _G
from mlc.runtime.protocol import ResponseFormat, TopLevelRequest
from mlc_llm.protocol.debug_protocol import DebugConfig


class GenerationConfig(TopLevelRequest):
    """How to sample and when to stop, for one request (MLC-LLM's field names). Values out of
    range raise `BadRequestError` naming the field, as a request body's would."""

    n: int = Field(default=1, ge=1, le=_G.MAX_N)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=_G.MAX_TOP_LOGPROBS)
    logit_bias: dict[int, float] | None = None
    max_tokens: int = -1
    seed: int | None = None
    stop_strs: list[str] | None = None
    stop_token_ids: list[int] | None = None
    response_format: ResponseFormat | None = None
    debug_config: DebugConfig | None = None

    def to_mlc(self) -> _G.GenerationConfig:
        """The same settings as mlc's `GenerationConfig` (validated at construction). Raises
        `BadRequestError` for debug options mlc cannot honour."""
        debug = self.debug_config or DebugConfig()
        if debug.pinned_system_prompt:
            raise BadRequestError("debug_config.pinned_system_prompt needs a prefix cache, which "
                                  "mlc does not have yet; drop it.",
                                  param="debug_config.pinned_system_prompt")
        if debug.special_request is not None:
            raise BadRequestError(f"debug_config.special_request={debug.special_request!r} is "
                                  "not supported by mlc; drop it.",
                                  param="debug_config.special_request")
        if debug.disagg_config is not None:
            raise BadRequestError("debug_config.disagg_config is not supported: mlc has no "
                                  "disaggregated serving.", param="debug_config.disagg_config")
        response_format = None
        if self.response_format is not None and self.response_format.type != "text":
            response_format = self.response_format.model_dump(by_alias=True, exclude_none=True)
        return _G.GenerationConfig(
            n=self.n, temperature=self.temperature, top_p=self.top_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=dict(self.logit_bias or {}),
            logprobs=self.logprobs, top_logprobs=self.top_logprobs,
            max_tokens=None if self.max_tokens < 0 else self.max_tokens, seed=self.seed,
            stop_strs=list(self.stop_strs or []), stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=debug.ignore_eos, response_format=response_format)


__all__ = ["GenerationConfig"]
