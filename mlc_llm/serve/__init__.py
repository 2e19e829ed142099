"""`mlc_llm.serve`, as in MLC-LLM."""

from mlc.runtime.engine import AsyncMLCEngine, EngineConfig, MLCEngine
from mlc_llm.serve.server import PopenServer

__all__ = ["MLCEngine", "AsyncMLCEngine", "EngineConfig", "PopenServer"]
