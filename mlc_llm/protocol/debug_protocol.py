"""`mlc_llm.protocol.debug_protocol`: MLC-LLM's per-request debug options.

MLC-LLM accepts them as a request's `debug_config` (server bodies and the engine's
`extra_body=`); mlc's engine applies `ignore_eos` through `GenerationConfig.to_mlc()`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class DisaggConfig(BaseModel):
    """MLC-LLM's disaggregated prefill/decode metadata (mlc has no disaggregation)."""

    kind: Literal["prepare_receive", "remote_send", "start_generation"] | None = None
    kv_append_metadata: str | None = None
    kv_window_begin: int | None = None
    kv_window_end: int | None = None
    dst_group_offset: int | None = None


class DebugConfig(BaseModel):
    """Debug options of one request, with MLC-LLM's names and defaults."""

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


__all__ = ["DebugConfig", "DisaggConfig"]
