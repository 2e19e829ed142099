"""`mlc_llm.serve`, as in MLC-LLM."""

from mlc.runtime.engine import AsyncMLCEngine, EngineConfig, MLCEngine

__all__ = ["MLCEngine", "AsyncMLCEngine", "EngineConfig"]
