"""Finding or compiling the model library when MLCEngine gets no model_lib (mlc.runtime.jit).

Every test points MLC_CACHE_DIR at a fresh temp dir. One test compiles for real (two processes
racing for the same key); the others replace `compile_model` with a spy that copies the
reference library, which is enough to check the policies.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from helpers import build_lib, make_tiny_llama, write_mlc_dir

from mlc.errors import ModelLoadError
from mlc.runtime.engine import MLCEngine

MESSAGES = [{"role": "user", "content": "Hello, world!"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(hf_model, hf_dir, mlc_dir, reference lib) of the tiny random Llama."""
    tmp = tmp_path_factory.mktemp("tiny-jit")
    hf_model, hf_dir = make_tiny_llama(tmp)
    mlc_dir = write_mlc_dir(hf_model, tmp / "mlc", "q0f32", hf_dir=hf_dir)
    return hf_model, hf_dir, mlc_dir, build_lib(mlc_dir)


@pytest.fixture
def model_dir(tiny, tmp_path):
    """A private copy of the tiny MLC dir, with no library next to it."""
    return Path(shutil.copytree(tiny[2], tmp_path / "model"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("MLC_CACHE_DIR", str(root))
    monkeypatch.delenv("MLC_JIT_POLICY", raising=False)
    return root


@pytest.fixture
def compiles(tiny, monkeypatch):
    """Replace compile_model with a spy that copies the reference library; returns the list
    of output paths it was asked for."""
    import mlc.compiler.compile as compile_module

    calls = []

    def fake_compile(model_dir, device, output, *args, **kwargs):
        calls.append(Path(output))
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(output).with_suffix(".tmp")
        shutil.copy(tiny[3], tmp)
        os.replace(tmp, output)

    monkeypatch.setattr(compile_module, "compile_model", fake_compile)
    return calls


def cached_lib_path(model_dir: Path) -> Path:
    """Where the JIT cache keeps the CPU library of `model_dir`."""
    from mlc.runtime.jit import library_key
    from mlc.support.chat_config import ChatConfig
    from mlc.support.paths import cache_root

    chat = ChatConfig.load(model_dir)
    return cache_root() / "lib" / \
        f"{chat.model_type}-{chat.quantization}-cpu-{library_key(chat, 'cpu', {})}.so"


def greedy(engine) -> str:
    r = engine.chat.completions.create(messages=MESSAGES, temperature=0, max_tokens=8,
                                       ignore_eos=True)
    return r.choices[0].message.content


@pytest.fixture(scope="module")
def reference_text(tiny):
    with MLCEngine(str(tiny[2]), "cpu", model_lib=str(tiny[3])) as engine:
        return greedy(engine)


def so_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.so")) if root.exists() else []


# ------------------------------------------------------------------------------ lookup order


def test_library_next_to_the_weights_is_used(tiny, model_dir, cache, compiles, monkeypatch,
                                             reference_text):
    shutil.copy(tiny[3], model_dir / "lib-cpu.so")
    monkeypatch.setenv("MLC_JIT_POLICY", "OFF")       # would refuse to compile anything
    with MLCEngine(str(model_dir), "cpu") as engine:
        assert engine.model.lib_path == model_dir / "lib-cpu.so"
        assert greedy(engine) == reference_text
    # also when the model is given as the path of its mlc-chat-config.json
    with MLCEngine(str(model_dir / "mlc-chat-config.json"), "cpu") as engine:
        assert engine.model.lib_path == model_dir / "lib-cpu.so"
    assert compiles == [] and so_files(cache) == []


def test_cached_library_is_reused_without_compiling(tiny, model_dir, cache, compiles,
                                                    reference_text):
    path = cached_lib_path(model_dir)
    path.parent.mkdir(parents=True)
    shutil.copy(tiny[3], path)
    mtime = path.stat().st_mtime_ns
    with MLCEngine(str(model_dir), "cpu") as engine:
        assert engine.model.lib_path == path and greedy(engine) == reference_text
    assert compiles == [] and path.stat().st_mtime_ns == mtime


def test_missing_library_is_compiled_into_the_cache_then_reused(model_dir, cache, compiles,
                                                                reference_text):
    with MLCEngine(str(model_dir), "cpu") as engine:
        assert greedy(engine) == reference_text
    assert compiles == [cached_lib_path(model_dir)]
    assert so_files(cache) == [cached_lib_path(model_dir)]
    mtime = cached_lib_path(model_dir).stat().st_mtime_ns
    with MLCEngine(str(model_dir), "cpu") as engine:
        assert engine.model.lib_path == cached_lib_path(model_dir)
    assert len(compiles) == 1 and cached_lib_path(model_dir).stat().st_mtime_ns == mtime


# ------------------------------------------------------------------------------ policies


def test_policy_off_without_a_library_is_a_clear_error(model_dir, cache, compiles,
                                                       monkeypatch):
    monkeypatch.setenv("MLC_JIT_POLICY", "OFF")
    with pytest.raises(ModelLoadError) as e:
        MLCEngine(str(model_dir), "cpu")
    assert "MLC_JIT_POLICY=OFF" in e.value.message and "mlc compile" in e.value.message
    assert e.value.param == "model_lib"
    assert compiles == [] and so_files(cache) == []


def test_policy_readonly_uses_the_cache_but_never_writes_it(tiny, model_dir, cache, compiles,
                                                            monkeypatch):
    monkeypatch.setenv("MLC_JIT_POLICY", "READONLY")
    with pytest.raises(ModelLoadError) as e:
        MLCEngine(str(model_dir), "cpu")
    assert "MLC_JIT_POLICY=READONLY" in e.value.message
    assert compiles == [] and so_files(cache) == []
    path = cached_lib_path(model_dir)
    path.parent.mkdir(parents=True)
    shutil.copy(tiny[3], path)
    with MLCEngine(str(model_dir), "cpu") as engine:
        assert engine.model.lib_path == path
    assert compiles == [] and so_files(cache) == [path]


def test_policy_redo_recompiles(tiny, model_dir, cache, compiles, monkeypatch, reference_text):
    path = cached_lib_path(model_dir)
    path.parent.mkdir(parents=True)
    shutil.copy(tiny[3], path)
    shutil.copy(tiny[3], model_dir / "lib-cpu.so")
    os.utime(path, ns=(0, 0))
    monkeypatch.setenv("MLC_JIT_POLICY", "redo")      # case-insensitive
    with MLCEngine(str(model_dir), "cpu") as engine:
        assert engine.model.lib_path == path and greedy(engine) == reference_text
    assert compiles == [path] and path.stat().st_mtime_ns > 0


def test_unknown_policy_is_refused(model_dir, cache, monkeypatch):
    monkeypatch.setenv("MLC_JIT_POLICY", "SOMETIMES")
    with pytest.raises(ModelLoadError, match="MLC_JIT_POLICY"):
        MLCEngine(str(model_dir), "cpu")


# ------------------------------------------------------------------------------ mismatches


def test_library_that_does_not_match_the_weights_is_refused(tiny, tmp_path, cache, compiles):
    hf_model, hf_dir, _, lib = tiny
    q4 = write_mlc_dir(hf_model, tmp_path / "q4", "q4f16_1", hf_dir=hf_dir)
    shutil.copy(lib, q4 / "lib-cpu.so")                 # a q0f32 library beside q4 weights
    with pytest.raises(ModelLoadError) as e:
        MLCEngine(str(q4), "cpu")
    assert "does not match" in e.value.message and "quantization q0f32 != q4f16_1" in \
        e.value.message and e.value.param == "model_lib"
    other, other_hf = make_tiny_llama(tmp_path, seed=1, intermediate_size=96)
    narrow = write_mlc_dir(other, tmp_path / "narrow", "q0f32", hf_dir=other_hf)
    with pytest.raises(ModelLoadError) as e:             # same quantization, other shapes
        MLCEngine(str(narrow), "cpu", model_lib=str(lib))
    assert "does not match" in e.value.message and "shape" in e.value.message
    assert "96" in e.value.message and "128" in e.value.message
    assert compiles == []


# ------------------------------------------------------------------------------ real compiles


def _build_in_child(model_dir: str, cache_dir: str, log: str) -> tuple[str, float, float]:
    """Run find_or_build_library in a fresh process, logging each compile_model call.
    Returns (library path, time entered, time returned)."""
    os.environ["MLC_CACHE_DIR"] = cache_dir
    os.environ.pop("MLC_JIT_POLICY", None)
    import mlc.compiler.compile as compile_module
    from mlc.runtime.device import parse_runtime_device
    from mlc.runtime.jit import find_or_build_library

    real = compile_module.compile_model

    def logged(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(*args, **kwargs)

    compile_module.compile_model = logged
    kind, dev = parse_runtime_device("cpu")
    entered = time.time()
    path = find_or_build_library(Path(model_dir), kind, dev, quiet=True)
    return str(path), entered, time.time()


def test_two_processes_compiling_the_same_library_share_one_build(model_dir, cache, tmp_path,
                                                                  compiles, reference_text):
    log = tmp_path / "compiles.log"
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        futures = [pool.submit(_build_in_child, str(model_dir), str(cache), str(log))
                   for _ in range(2)]
        results = [f.result(timeout=600) for f in futures]
    paths = {Path(p) for p, _, _ in results}
    assert paths == {cached_lib_path(model_dir)}
    assert max(t for _, t, _ in results) < min(t for _, _, t in results), \
        "the two processes did not overlap"
    assert len(log.read_text().split()) == 1             # one compiled, the other waited
    assert so_files(cache) == [cached_lib_path(model_dir)]
    assert not [p for p in cache.rglob("*") if "tmp" in p.name]
    mtime = cached_lib_path(model_dir).stat().st_mtime_ns
    with MLCEngine(str(model_dir), "cpu") as engine:       # this process: reuse, no compile
        assert engine.model.lib_path == cached_lib_path(model_dir)
        assert greedy(engine) == reference_text
    assert compiles == [] and cached_lib_path(model_dir).stat().st_mtime_ns == mtime
