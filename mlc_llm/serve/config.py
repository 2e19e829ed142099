"""`mlc_llm.serve.config`, as in MLC-LLM: `from mlc_llm.serve.config import EngineConfig`."""

from mlc.runtime.engine import EngineConfig

__all__ = ["EngineConfig"]
