"""`mlc_llm.protocol.debug_protocol`: MLC-LLM's per-request debug options.

MLC-LLM accepts them as a request's `debug_config` (server bodies and the engine's
`extra_body=`); so does mlc, whose request types (`mlc.runtime.protocol`) define them: the
engine applies `ignore_eos` and refuses, with a 400, the options it cannot honour.
"""

from mlc.runtime.protocol import DebugConfig, DisaggConfig

__all__ = ["DebugConfig", "DisaggConfig"]
