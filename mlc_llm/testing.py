"""`mlc_llm.testing`, as in MLC-LLM: pytest helpers its serve tests import.

    @require_test_model("Llama-2-7b-chat-hf-q4f16_1-MLC")
    def test_something(model):          # `model` is the path of the model dir
        engine = MLCEngine(model)

A model is looked up by name in MLC_LLM_TEST_MODEL_PATH (dirs separated by os.pathsep), then
MLC-LLM's weight cache ($MLC_LLM_HOME, else ~/.cache/mlc_llm, under model_weights/hf/mlc-ai),
mlc's converted-model cache ($MLC_CACHE_DIR/models), the current dir and ./dist; a name that
is itself a model dir is used as it is. A test whose model is missing is skipped.
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Callable

from mlc.support.chat_config import CHAT_CONFIG_NAME


def _mlc_llm_home() -> Path:
    if "MLC_LLM_HOME" in os.environ:
        return Path(os.environ["MLC_LLM_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlc_llm"


def model_search_paths() -> list[Path]:
    """The dirs searched for test models, in order."""
    from mlc.runtime.jit import cache_root

    paths = [Path(p) for p in os.environ.get("MLC_LLM_TEST_MODEL_PATH", "").split(os.pathsep)
             if p]
    cwd = Path.cwd()
    return paths + [_mlc_llm_home() / "model_weights" / "hf" / "mlc-ai",
                    cache_root() / "models", cwd, cwd / "dist"]




def find_test_model(model: str) -> Path | None:
    """The model dir for `model` (a name under the search paths, or a dir), or None."""
    for base in model_search_paths():
        if (base / model / CHAT_CONFIG_NAME).is_file():
            return base / model
    if (Path(model) / CHAT_CONFIG_NAME).is_file():
        return Path(model)
    return None


def require_test_model(*models: str) -> Callable:
    """Decorate a test taking the model dirs as its first arguments; skip it when one of the
    models is not found."""
    import pytest

    found = [find_test_model(m) for m in models]
    missing = [m for m, p in zip(models, found) if p is None]
    reason = (f"test model(s) {', '.join(missing)} not found in "
              f"{[str(p) for p in model_search_paths()]}; set MLC_LLM_TEST_MODEL_PATH to the dir "
              "that holds them.")
    paths = [str(p) for p in found if p is not None]

    def decorate(func: Callable) -> Callable:
        if inspect.iscoroutinefunction(func):
            @functools.wraps(func)
            async def wrapper(*args, **kwargs):
                return await func(*paths, *args, **kwargs)
        else:
            @functools.wraps(func)
            def wrapper(*args, **kwargs):
                return func(*paths, *args, **kwargs)
        # pytest must see the test's own arguments (fixtures) only, not the model ones
        params = list(inspect.signature(func).parameters.values())[len(models):]
        wrapper.__signature__ = inspect.Signature(params)
        del wrapper.__wrapped__
        return pytest.mark.skipif(bool(missing), reason=reason)(wrapper)

    return decorate


def require_test_tokenizers(*models: str) -> Callable:
    """Like `require_test_model` (a model dir holds its tokenizer)."""
    return require_test_model(*models)


__all__ = ["require_test_model", "require_test_tokenizers", "find_test_model",
           "model_search_paths"]
