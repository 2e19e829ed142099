"""mlc: quantize, compile and serve LLMs with Apache TVM.

    from mlc import MLCEngine
    engine = MLCEngine("SmolLM2-135M-Instruct")       # or an MLC model dir / HF:// link
    for chunk in engine.chat.completions.create(
            messages=[{"role": "user", "content": "Hi"}], stream=True):
        print(chunk.choices[0].delta.content or "", end="")
    engine.terminate()
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["MLCEngine", "AsyncMLCEngine", "EngineConfig", "__version__"]


def __getattr__(name: str):
    # Imported lazily: `mlc convert`/`mlc compile` should not pay for the engine's imports.
    if name in ("MLCEngine", "AsyncMLCEngine", "EngineConfig"):
        from mlc.runtime import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'mlc' has no attribute {name!r}")
