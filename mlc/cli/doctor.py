"""`mlc doctor [MODEL_DIR] [--model-lib LIB]`: what a user needs to know when something fails.

It prints the Python, TVM and tvm-ffi versions (and whether TVM is the runtime-only build),
the CPU, the GPUs with their driver and CUDA versions, whether NVRTC, cuBLAS and nvcc are
found, and the JIT cache. Given a model dir (and a library) it checks that the two belong
together: model type, quantization, parameter names, shapes and dtypes, vocabulary, the mlc
version that built the library, and whether this machine can run the library's code.

Every problem is printed with its fix, and the exit code is 1 when there is one.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import click

from mlc.errors import MLCError


@dataclass
class Problem:
    """Something that will make mlc fail (or run wrong), and what to do about it."""

    what: str
    fix: str = ""       # empty when `what` is an MLCError message, which names its fix


@dataclass
class Report:
    """Rows of (label, value) under section titles, and the problems found."""

    sections: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def section(self, title: str) -> list[tuple[str, str]]:
        rows: list[tuple[str, str]] = []
        self.sections.append((title, rows))
        return rows

    def problem(self, what: str, fix: str = "") -> None:
        self.problems.append(Problem(what, fix))

    def render(self) -> str:
        lines = []
        width = max((len(k) for _, rows in self.sections for k, _ in rows), default=0)
        for title, rows in self.sections:
            lines.append(f"{title}:")
            lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s) found:")
            for i, p in enumerate(self.problems, 1):
                lines.append(f"  {i}. {p.what}")
                if p.fix:
                    lines.append(f"     fix: {p.fix}")
        else:
            lines.append("No problems found.")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The environment


def _pinned_versions() -> dict[str, str]:
    """The exact versions mlc's package metadata pins (apache-tvm, apache-tvm-ffi)."""
    try:
        requires = importlib_metadata.requires("mlc") or []
    except importlib_metadata.PackageNotFoundError:   # running from a source tree
        return {}
    pins = {}
    for req in requires:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;]+)\s*", req)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def _dist_version(name: str) -> str | None:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return None


def check_software(report: Report) -> bool:
    """Python, mlc, TVM, tvm-ffi; False when TVM cannot be imported at all."""
    from mlc.support.versions import LIBRARY_VERSION

    rows = report.section("Software")
    rows.append(("Python", f"{platform.python_version()} ({sys.executable})"))
    rows.append(("mlc", f"{_dist_version('mlc') or 'source tree'} (libraries: "
                        f"{LIBRARY_VERSION})"))
    pins = _pinned_versions()
    try:
        import tvm
        import tvm_ffi
    except Exception as e:  # noqa: BLE001 - a broken install raises anything
        rows.append(("TVM", f"cannot be imported: {e}"))
        want = " ".join(f"{n}=={pins[n]}" for n in ("apache-tvm", "apache-tvm-ffi") if n in pins)
        report.problem(f"TVM cannot be imported ({type(e).__name__}: {e}).",
                       f"pip install {want or 'apache-tvm apache-tvm-ffi'}")
        return False
    runtime_only = bool(getattr(tvm.base, "_RUNTIME_ONLY", False))
    build = "runtime-only: runs libraries, cannot compile" if runtime_only \
        else "compiler + runtime"
    rows.append(("TVM", f"{tvm.__version__} ({build})"))
    rows.append(("tvm-ffi", str(tvm_ffi.__version__)))
    for dist in ("apache-tvm", "apache-tvm-ffi"):
        have, want = _dist_version(dist), pins.get(dist)
        if want and have and have != want:
            report.problem(f"{dist} {have} is installed but mlc is built and tested against "
                           f"{want}.", f"pip install {dist}=={want}")
    return True


def check_cpu(report: Report) -> None:
    import mlc.runtime.device  # noqa: F401 - sets the TVM_NUM_THREADS mlc runs with
    from mlc.support.cpu_info import cpu_model, host_features

    rows = report.section("CPU")
    rows.append(("model", f"{cpu_model()} ({os.cpu_count()} cores, {platform.machine()})"))
    rows.append(("features", " ".join(host_features()) or "baseline only"))
    rows.append(("threads", f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'unset')}"))


def nvidia_smi() -> tuple[list[dict[str, str]], str | None, str | None]:
    """(GPUs, CUDA version the driver supports, error) from nvidia-smi; ([], None, None)
    when nvidia-smi is not installed."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return [], None, None
    fields = ("index", "name", "driver_version", "memory.total", "compute_cap")
    try:
        out = subprocess.run([exe, f"--query-gpu={','.join(fields)}",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30)
        header = subprocess.run([exe], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return [], None, str(e)
    if out.returncode != 0:
        return [], None, (out.stderr or out.stdout).strip()[:300]
    gpus = [dict(zip(fields, (v.strip() for v in line.split(","))))
            for line in out.stdout.strip().splitlines() if line.strip()]
    m = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return gpus, (m.group(1) if m else None), None


def check_gpu(report: Report) -> bool:
    """GPUs, CUDA, NVRTC, cuBLAS, nvcc; True when TVM can use a CUDA GPU here."""
    from mlc.compiler.cuda_support import kernels_available, nvcc_path
    from mlc.runtime.device import (
        cuda_available,
        cuda_source_compiler,
        nvrtc_version,
        preload_cublas,
    )

    rows = report.section("GPU")
    gpus, cuda_version, error = nvidia_smi()
    if error:
        rows.append(("GPUs", f"nvidia-smi failed: {error}"))
        report.problem(f"nvidia-smi is installed but fails ({error}).",
                       "Check the NVIDIA driver: `nvidia-smi` must list the GPUs (reinstall or "
                       "reload the driver; in a container, run it with --gpus all).")
    elif not gpus:
        rows.append(("GPUs", "none found" if shutil.which("nvidia-smi")
                     else "none (nvidia-smi not found)"))
    for gpu in gpus:
        rows.append((f"GPU {gpu.get('index')}",
                     f"{gpu.get('name')}, {gpu.get('memory.total')}, compute capability "
                     f"{gpu.get('compute_cap')}"))
    if gpus:
        rows.append(("driver", f"{gpus[0].get('driver_version')} (CUDA {cuda_version or '?'})"))
    usable = cuda_available()
    rows.append(("TVM CUDA", "usable" if usable else "not usable"))
    if gpus and not usable:
        report.problem("nvidia-smi lists a GPU but TVM cannot use it.",
                       "Check that libcuda.so.1 loads (the driver's user-space library; in a "
                       "container, mount it with the NVIDIA container toolkit) and that the "
                       "apache-tvm wheel ships libtvm_runtime_cuda.so.")
    nvrtc = nvrtc_version()
    compiler = cuda_source_compiler()
    rows.append(("NVRTC", f"found ({nvrtc})" if nvrtc
                 else "not found (pip install cuda-bindings)"))
    cublas = preload_cublas()
    rows.append(("cuBLAS", f"found ({cublas})" if cublas
                 else "not found (pip install nvidia-cublas)"))
    nvcc = nvcc_path()
    rows.append(("nvcc", (f"{nvcc} (mlc's CUDA kernels: "
                          f"{'can' if kernels_available() else 'cannot'} be built)")
                 if nvcc else "not found (CUDA libraries get TVM's kernels only)"))
    if usable and not nvrtc and (compiler == "nvrtc" or not nvcc):
        report.problem(
            "NVRTC is not found, so CUDA code in a library cannot be compiled for this GPU.",
            "pip install cuda-bindings (`pip install 'mlc[cuda]'`)"
            + (", or set MLC_CUDA_COMPILER=nvcc to use the installed nvcc." if nvcc else "."))
    if usable and not cublas:
        report.problem("cuBLAS is not found; libraries with mlc's CUDA kernels need it.",
                       "pip install nvidia-cublas (`pip install 'mlc[cuda]'`)")
    return usable


def _dir_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)


def check_jit_cache(report: Report) -> None:
    from mlc.runtime.jit import cache_root, jit_policy

    rows = report.section("JIT cache")
    root = cache_root()
    count, size = _dir_size(root)
    libs = len(list((root / "lib").glob("*.so"))) if (root / "lib").is_dir() else 0
    rows.append(("location", f"{root} (MLC_CACHE_DIR to move it)"))
    rows.append(("size", f"{size / 2**20:.1f} MiB in {count} files, {libs} model libraries"))
    try:
        rows.append(("policy", f"MLC_JIT_POLICY={jit_policy()}"))
    except MLCError as e:
        rows.append(("policy", "invalid"))
        report.problem(e.message, "Set MLC_JIT_POLICY to ON, OFF, REDO or READONLY (or unset it).")
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK):
        report.problem(f"The JIT cache {root} is not writable ({existing} is read-only), so "
                       "models without a library cannot be compiled on demand.",
                       "Set MLC_CACHE_DIR to a writable dir, or pass model_lib / --model-lib.")


# ---------------------------------------------------------------------------------------------
# A model dir and its library


def check_model(report: Report, model_dir: Path, model_lib: Path | None, gpu_usable: bool,
                verify: bool = False) -> None:
    """Whether `model_dir` loads and whether `model_lib` (or the library the engine would
    pick) belongs to it."""
    from mlc.support.chat_config import ChatConfig
    from mlc.support.tensor_cache import TensorCache

    rows = report.section(f"Model {model_dir}")
    if not model_dir.is_dir():
        report.problem(f"{model_dir} is not a directory.",
                       "Give the MLC model dir (the one holding mlc-chat-config.json), e.g. "
                       "the output of `mlc convert`.")
        return
    try:
        chat = ChatConfig.load(model_dir)
    except MLCError as e:
        report.problem(e.message)
        return
    rows.append(("model", f"{chat.model_type} {chat.quantization}, vocab {chat.vocab_size}, "
                          f"context {chat.context_window_size}, "
                          f"tensor_parallel_shards {chat.tensor_parallel_shards}"))
    _check_architecture(report, chat)
    try:
        cache = TensorCache(model_dir)
        _check_shards(report, model_dir, cache, verify)
    except MLCError as e:
        report.problem(e.message)
        cache = None
    if cache is not None:
        total = sum(r.nbytes for r in cache.records.values())
        rows.append(("weights", f"{len(cache.records)} tensors, {total / 2**20:.1f} MiB in "
                                f"{len(cache.shards)} shards"))
    _check_tokenizer(report, rows, model_dir, chat)
    if model_lib is None:
        model_lib = _engine_library(report, rows, model_dir, chat, gpu_usable)
        if model_lib is None:
            return
    check_library(report, rows, Path(model_lib), chat, cache, gpu_usable, model_dir)


def _check_architecture(report: Report, chat) -> None:
    from mlc.models.registry import MODELS

    if chat.model_type not in MODELS:
        report.problem(f"model_type {chat.model_type!r} is not an architecture this mlc "
                       f"supports ({', '.join(sorted(MODELS))}).",
                       "Use a model of a supported architecture, or a newer mlc.")


def _check_shards(report: Report, model_dir: Path, cache, verify: bool) -> None:
    if verify:
        cache.verify()             # sizes and md5 sums; raises on the first bad shard
        return
    for shard in cache.shards:
        path = model_dir / shard["dataPath"]
        if not path.is_file():
            report.problem(f"Weight shard {path} is missing.",
                           "Re-download the model or convert it again (`mlc convert`).")
        elif "nbytes" in shard and path.stat().st_size != shard["nbytes"]:
            report.problem(f"Weight shard {path} has {path.stat().st_size} bytes, the index "
                           f"says {shard['nbytes']} (truncated or replaced).",
                           "Re-download the model or convert it again (`mlc convert`).")


def _check_tokenizer(report: Report, rows: list, model_dir: Path, chat) -> None:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        report.problem(f"{model_dir} has no tokenizer.json, which the engine reads.",
                       "Convert the model again with `mlc convert` (it copies the tokenizer) "
                       "or copy tokenizer.json from the source model.")
        return
    try:
        from tokenizers import Tokenizer

        size = Tokenizer.from_file(str(path)).get_vocab_size()
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception types
        report.problem(f"{path} cannot be read by the tokenizers package: {e}.",
                       "Copy tokenizer.json again from the source model.")
        return
    rows.append(("tokenizer", f"{size} tokens"))
    if size > chat.vocab_size:
        report.problem(f"The tokenizer has {size} tokens but the model's vocabulary is "
                       f"{chat.vocab_size}: token ids past it have no embedding.",
                       "Use the tokenizer of the model the weights came from.")


def _engine_library(report: Report, rows: list, model_dir: Path, chat,
                    gpu_usable: bool) -> Path | None:
    """The library the engine would pick on the default device, if one exists yet."""
    from mlc.runtime.jit import cached_library_path, jit_policy, library_next_to_weights
    from mlc.support.cuda_arch import arch_for_compute_capability

    if gpu_usable:
        import tvm

        target = "cuda:" + arch_for_compute_capability(tvm.cuda(0).compute_version)
    else:
        target = "cpu"
    found = library_next_to_weights(model_dir, target)
    if found is None:
        cached = cached_library_path(chat, target)
        found = cached if cached.is_file() else None
    if found is not None:
        rows.append(("library", f"{found} (what the engine picks for {target})"))
        return found
    rows.append(("library", f"none for {target} yet: the engine compiles one on first use"))
    import tvm

    try:
        policy = jit_policy()
    except MLCError:
        policy = "ON"
    if getattr(tvm.base, "_RUNTIME_ONLY", False) or policy in ("OFF", "READONLY"):
        reason = ("TVM is runtime-only here" if getattr(tvm.base, "_RUNTIME_ONLY", False)
                  else f"MLC_JIT_POLICY={policy}")
        report.problem(f"There is no library of {model_dir} for {target}, and {reason}, so "
                       "the engine cannot compile one.",
                       f"Build one where the full apache-tvm is installed with `mlc compile "
                       f"{model_dir} --device {target} -o {model_dir}/lib-{target.split(':')[0]}"
                       ".so` (or pass --model-lib / model_lib=).")
    return None


def check_library(report: Report, rows: list, lib: Path, chat, cache, gpu_usable: bool,
                  model_dir: Path) -> None:
    """Read the library's metadata and compare it with the model dir."""
    from mlc.runtime.model import read_library_metadata

    try:
        meta = read_library_metadata(lib)
    except MLCError as e:
        rows.append(("library", f"{lib}: cannot be loaded"))
        report.problem(e.message)
        return
    except Exception as e:  # noqa: BLE001 - a foreign .so fails in TVM with anything
        rows.append(("library", f"{lib}: cannot be loaded"))
        report.problem(f"{lib} cannot be read as an mlc model library: "
                       f"{str(e).strip().splitlines()[-1][:300]}",
                       f"Rebuild it with `mlc compile {model_dir} --device ... -o {lib}`.")
        return
    rows.append(("library", f"{lib}: {meta.get('model_type')} {meta.get('quantization')} for "
                            f"{meta.get('device')} ({meta.get('opt')}), built by "
                            f"{meta.get('compiler_version')}"))
    for problem in compare_library(meta, chat, cache, gpu_usable, model_dir, lib):
        report.problems.append(problem)


def compare_library(meta: dict[str, Any], chat, cache, gpu_usable: bool,
                    model_dir: str | Path = "MODEL_DIR", lib: str | Path = "LIB") -> list[Problem]:
    """Why a library's `_metadata` does not fit a model dir (chat config + tensor cache) or
    this machine: one Problem per reason."""
    from mlc.runtime.model import check_library_matches
    from mlc.support.cpu_info import host_features
    from mlc.support.versions import LIBRARY_VERSION

    rebuild = (f"Rebuild the library for this model dir: `mlc compile {model_dir} --device "
               f"{meta.get('device') or 'DEVICE'} -o {lib}`.")
    problems = []
    if cache is not None:
        try:
            check_library_matches(meta, chat, cache)   # names, shapes and dtypes
        except MLCError as e:
            problems.append(Problem(e.message))
    if meta.get("vocab_size") != chat.vocab_size:
        problems.append(Problem(f"The library's vocabulary is {meta.get('vocab_size')} tokens "
                                f"but mlc-chat-config.json says {chat.vocab_size}.", rebuild))
    shards = meta.get("tensor_parallel_shards", 1)
    if shards != chat.tensor_parallel_shards:
        problems.append(Problem(f"The library is built for tensor_parallel_shards={shards} but "
                                f"the weights for {chat.tensor_parallel_shards}.", rebuild))
    if meta.get("compiler_version") != LIBRARY_VERSION:
        problems.append(Problem(
            f"The library was built by {meta.get('compiler_version')}; this mlc builds and runs "
            f"{LIBRARY_VERSION} libraries.", rebuild))
    device = str(meta.get("device") or "")
    if device.startswith("cuda") and not gpu_usable:
        problems.append(Problem(
            f"The library is for {device}, and this machine has no usable CUDA GPU.",
            f"Build a CPU library with `mlc compile {model_dir} --device cpu -o LIB`, or run "
            "on a machine with an NVIDIA GPU."))
    lib_features = (meta.get("cpu") or {}).get("features") or []
    missing = [f for f in lib_features if f not in host_features()]
    if device.startswith("cpu") and missing:
        problems.append(Problem(
            f"The library uses CPU features this CPU lacks ({', '.join(missing)}): it would "
            "stop with an illegal instruction.",
            f"Build it on this machine with `mlc compile {model_dir} --device cpu -o {lib}`, or "
            "for a portable baseline with --device cpu:x86-64-v3 (any AVX2 CPU)."))
    return problems


# ---------------------------------------------------------------------------------------------
# The command


def run_doctor(model_dir: str | None = None, model_lib: str | None = None,
               verify: bool = False) -> Report:
    """Inspect this machine (and a model dir with its library); return the report."""
    report = Report()
    tvm_ok = check_software(report)
    check_cpu(report)
    gpu_usable = check_gpu(report) if tvm_ok else False
    check_jit_cache(report)
    if model_dir is not None and tvm_ok:
        check_model(report, Path(model_dir), Path(model_lib) if model_lib else None,
                    gpu_usable, verify)
    return report


@click.command("doctor")
@click.argument("model_dir", required=False)
@click.option("--model-lib", default=None, help="The library to check against MODEL_DIR "
              "(default: the one the engine would pick, if any).")
@click.option("--verify", is_flag=True, help="Also check the md5 sum of every weight shard.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(model_dir: str | None, model_lib: str | None, verify: bool, as_json: bool) -> None:
    """Print versions, CPU, GPUs, CUDA libraries and the JIT cache; with MODEL_DIR, check that
    the model dir and its library belong together. Exits 1 when a problem is found."""
    if model_lib and not model_dir:
        raise click.UsageError("--model-lib needs MODEL_DIR (the model the library is for).")
    report = run_doctor(model_dir, model_lib, verify)
    if as_json:
        click.echo(json.dumps({"sections": {t: dict(rows) for t, rows in report.sections},
                               "problems": [vars(p) for p in report.problems]}, indent=2))
    else:
        click.echo(report.render())
    sys.exit(1 if report.problems else 0)
