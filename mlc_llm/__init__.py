"""Alias package so code written for MLC-LLM runs unchanged on mlc:

    from mlc_llm import MLCEngine
    from mlc_llm.serve import AsyncMLCEngine
"""

from mlc.runtime.engine import AsyncMLCEngine, EngineConfig, MLCEngine

__all__ = ["MLCEngine", "AsyncMLCEngine", "EngineConfig"]
