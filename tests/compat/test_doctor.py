"""`mlc doctor`: the environment report, and a model dir checked against matching and
mismatched libraries (on this machine: the CPU, and a CUDA library where there is no GPU)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner
from helpers import REPO, build_lib, make_tiny_llama, write_mlc_dir

from mlc.cli.doctor import Report, check_model, compare_library, doctor, run_doctor
from mlc.runtime.device import cuda_available
from mlc.support.chat_config import ChatConfig
from mlc.support.tensor_cache import TensorCache
from mlc.support.versions import LIBRARY_VERSION


def run(*args: str):
    return CliRunner().invoke(doctor, [str(a) for a in args])


def model_problems(mlc_dir, lib=None) -> list[str]:
    report = Report()
    check_model(report, mlc_dir, lib, cuda_available())
    return [f"{p.what} {p.fix}" for p in report.problems]


@pytest.fixture(scope="module")
def other_lib(tmp_path_factory):
    """The library of another tiny model: other vocabulary, q0f32 instead of q4f32_1."""
    tmp = tmp_path_factory.mktemp("doctor-other")
    hf_model, hf_dir = make_tiny_llama(tmp, vocab_size=384)
    return build_lib(write_mlc_dir(hf_model, tmp / "mlc", "q0f32", hf_dir=hf_dir))


def test_environment_report(tmp_path, monkeypatch):
    import tvm
    import tvm_ffi

    monkeypatch.setenv("MLC_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache" / "lib").mkdir(parents=True)
    (tmp_path / "cache" / "lib" / "x.so").write_bytes(b"\0" * 3 * 2**20)
    result = run()
    out = result.output
    assert platform.python_version() in out
    assert tvm.__version__ in out and str(tvm_ffi.__version__) in out
    runtime_only = bool(getattr(tvm.base, "_RUNTIME_ONLY", False))
    assert ("runtime-only" in out) == runtime_only
    assert "compiler + runtime" in out or runtime_only
    from mlc.support.cpu_info import cpu_model

    assert cpu_model() in out
    for label in ("NVRTC", "cuBLAS", "nvcc", "GPUs" if not cuda_available() else "driver"):
        assert label in out
    assert str(tmp_path / "cache") in out and "3.0 MiB in 1 files, 1 model libraries" in out
    # the exit code says whether a problem was found, and each problem is listed
    problems = run_doctor().problems
    assert result.exit_code == (1 if problems else 0), out
    assert ("No problems found." in out) == (not problems)


def test_json_report_and_bad_policy(monkeypatch):
    monkeypatch.setenv("MLC_JIT_POLICY", "SOMETIMES")
    result = run("--json")
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["sections"]["JIT cache"]["policy"] == "invalid"
    bad = [p for p in data["problems"] if "SOMETIMES" in p["what"]]
    assert bad and "ON, OFF, REDO or READONLY" in bad[0]["fix"]


def test_matching_model_and_library(tiny):
    assert model_problems(tiny.mlc_dir, tiny.lib) == []
    result = run(tiny.mlc_dir, "--model-lib", tiny.lib)
    out = result.output
    assert "llama q4f32_1, vocab 320" in out
    assert f"llama q4f32_1 for cpu (O2), built by {LIBRARY_VERSION}" in out
    assert "tokenizer" in out and "25 tensors" in out
    assert result.exit_code == (1 if run_doctor().problems else 0), out


def test_mismatched_library_says_why_and_how_to_fix(tiny, other_lib):
    result = run(tiny.mlc_dir, "--model-lib", other_lib)
    assert result.exit_code == 1
    out = result.output
    assert "quantization q0f32 != q4f32_1" in out
    assert "vocabulary is 384 tokens but mlc-chat-config.json says 320" in out
    assert "mlc compile" in out and "fix:" in out


def test_library_the_engine_would_pick(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MLC_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(tiny.mlc_dir, model)
    if cuda_available():
        pytest.skip("the engine would pick a CUDA library here")
    # none yet: the engine compiles one (fine with the full TVM and MLC_JIT_POLICY=ON)
    assert model_problems(model) == []
    monkeypatch.setenv("MLC_JIT_POLICY", "OFF")
    [problem] = model_problems(model)
    assert "MLC_JIT_POLICY=OFF" in problem and f"mlc compile {model} --device cpu" in problem
    # a library next to the weights is the one checked
    shutil.copy(tiny.lib, model / "lib-cpu.so")
    assert model_problems(model) == []
    assert str(model / "lib-cpu.so") in run(model).output


def test_runtime_only_tvm_without_a_library(tiny, tmp_path, monkeypatch):
    import tvm

    if cuda_available():
        pytest.skip("the engine would pick a CUDA library here")
    monkeypatch.setenv("MLC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tvm.base, "_RUNTIME_ONLY", True)
    [problem] = model_problems(tiny.mlc_dir)
    assert "TVM is runtime-only" in problem and "mlc compile" in problem


def test_broken_model_dirs(tiny, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny.mlc_dir, model)
    shard = model / "params_shard_0.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    (model / "tokenizer.json").unlink()
    problems = model_problems(model, tiny.lib)
    assert any("has 100 bytes" in p and "convert it again" in p for p in problems)
    assert any("no tokenizer.json" in p for p in problems)
    shard.unlink()
    assert any("is missing" in p for p in model_problems(model, tiny.lib))
    (tmp_path / "garbage.so").write_bytes(b"not a library")
    [problem] = [p for p in model_problems(model, tmp_path / "garbage.so") if "garbage" in p]
    assert "Cannot load model library" in problem and "mlc compile" in problem
    # --verify checks md5 sums too; a missing chat config names the command that makes one
    (model / "mlc-chat-config.json").unlink()
    result = run(model)
    assert result.exit_code == 1 and "mlc convert" in result.output
    assert run(tmp_path / "nowhere").exit_code == 1


def test_md5_verification(tiny, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny.mlc_dir, model)
    shard = model / "params_shard_0.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF                                  # same size, other content
    shard.write_bytes(bytes(data))
    assert model_problems(model, tiny.lib) == []          # the sizes are right
    result = run(model, "--model-lib", tiny.lib, "--verify", "--json")
    problems = [p["what"] for p in json.loads(result.output)["problems"]]
    assert result.exit_code == 1 and any("is corrupt: md5" in p for p in problems)


def test_compare_library_machine_checks(tiny, monkeypatch):
    """What a real library of this machine cannot show: a CPU that lacks the library's
    features, a library of another mlc version, a CUDA library without a GPU."""
    import mlc.support.cpu_info as cpu_info
    from mlc.runtime.model import read_library_metadata

    meta = read_library_metadata(tiny.lib)
    chat, cache = ChatConfig.load(tiny.mlc_dir), TensorCache(tiny.mlc_dir)
    assert compare_library(meta, chat, cache, gpu_usable=False) == []
    monkeypatch.setattr(cpu_info, "host_features", lambda: ["sse4.2", "avx", "avx2", "fma"])
    meta = {**meta, "cpu": {**meta.get("cpu", {}), "features": ["avx2", "avx512f", "avx512bw"]}}
    [problem] = compare_library(meta, chat, cache, gpu_usable=False)
    assert "avx512f, avx512bw" in problem.what and "cpu:x86-64-v3" in problem.fix
    meta = {**meta, "cpu": {"features": []}, "compiler_version": "mlc-0.0.1/tvm-0.26/lib-1"}
    [problem] = compare_library(meta, chat, cache, gpu_usable=False)
    assert "mlc-0.0.1/tvm-0.26/lib-1" in problem.what and "mlc compile" in problem.fix
    meta = {**meta, "compiler_version": LIBRARY_VERSION, "device": "cuda:sm_90a"}
    [problem] = compare_library(meta, chat, cache, gpu_usable=False)
    assert "no usable CUDA GPU" in problem.what and "--device cpu" in problem.fix
    # a weight stored in another dtype than the library expects
    params = [dict(p, dtype="float16") if p["name"].endswith("norm.weight") else p
              for p in meta["params"]]
    [problem] = compare_library({**meta, "device": "cpu", "params": params}, chat, cache,
                                gpu_usable=False)
    assert "float32 but the library expects float16" in problem.what


@pytest.mark.skipif(cuda_available(), reason="needs a machine without a GPU")
def test_cuda_library_on_a_machine_without_gpu(tiny):
    # In a process of its own: after a CUDA library failed to load, TVM 0.27 crashes (SIGSEGV)
    # when the same process compiles a model and then tries to load a CUDA library again.
    cuda_lib = build_lib(tiny.mlc_dir, "cuda:sm_90a")
    proc = subprocess.run([sys.executable, "-m", "mlc", "doctor", str(tiny.mlc_dir),
                           "--model-lib", str(cuda_lib)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "is a cuda library" in proc.stdout and "--device cpu" in proc.stdout


# What nvidia-smi printed on an H200 machine (2026-12, driver 580), for the GPU rows.
H200_QUERY = "0, NVIDIA H200, 580.159.04, 143771 MiB, 9.0"
H200_HEADER = "| NVIDIA-SMI 580.159.04   Driver Version: 580.159.04   CUDA Version: 13.0     |"


def fake_nvidia_smi(tmp_path, monkeypatch, query: str, header: str, code: int = 0):
    script = tmp_path / "bin" / "nvidia-smi"
    script.parent.mkdir()
    script.write_text(f"""#!/bin/sh
case "$1" in --query-gpu=*) echo '{query}';; *) echo '{header}';; esac
exit {code}
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}:{os.environ['PATH']}")


@pytest.mark.skipif(cuda_available(), reason="checks the report of a GPU TVM cannot use")
def test_gpu_rows_from_nvidia_smi(tmp_path, monkeypatch):
    from mlc.cli.doctor import check_gpu

    fake_nvidia_smi(tmp_path, monkeypatch, H200_QUERY, H200_HEADER)
    report = Report()
    assert check_gpu(report) is False
    rows = dict(report.sections[0][1])
    assert rows["GPU 0"] == "NVIDIA H200, 143771 MiB, compute capability 9.0"
    assert rows["driver"] == "580.159.04 (CUDA 13.0)"
    [problem] = report.problems                     # a GPU is listed, TVM cannot open it
    assert "TVM cannot use it" in problem.what and "libcuda.so.1" in problem.fix


def test_failing_nvidia_smi(tmp_path, monkeypatch):
    from mlc.cli.doctor import check_gpu

    fake_nvidia_smi(tmp_path, monkeypatch, "Failed to initialize NVML: Driver/library version "
                    "mismatch", "", code=18)
    report = Report()
    check_gpu(report)
    assert any("version mismatch" in p.what and "driver" in p.fix
               for p in report.problems)
