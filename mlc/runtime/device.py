"""Devices at run time, with TVM's full build or its runtime-only build.

In runtime-only mode TVM does not load its CUDA device API by itself, and the stock callback
that compiles a library's CUDA source at load time asks the (absent) compiler for a target.
`ensure_device` fixes both before the first CUDA call.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from mlc.errors import ModelLoadError
from mlc.support.cuda_arch import arch_for_compute_capability, precompiled_cubin_key

# TVM's CPU thread pool assumes hyper-threading and starts half of the cores (one on a 2-core
# machine) unless told; mlc's CPU kernels are written for all of them.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))


def _tvm_lib_dir() -> Path:
    import tvm

    return Path(tvm.__file__).parent / "lib"


@functools.lru_cache(maxsize=None)
def _load_cuda_runtime() -> bool:
    """Load TVM's CUDA runtime pieces (a no-op where they are already registered)."""
    import tvm

    if tvm.get_global_func("device_api.cuda", allow_missing=True) is not None:
        return True
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False                      # no NVIDIA driver on this machine
    for name in ("libtvm_runtime_cuda.so", "libtvm_runtime_extra.so"):
        path = _tvm_lib_dir() / name
        if path.exists():
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    return tvm.get_global_func("device_api.cuda", allow_missing=True) is not None


@functools.lru_cache(maxsize=None)
def preload_cublas() -> str | None:
    """Load cuBLAS from the nvidia-cublas wheel (or torch's copy) so mlc's CUDA kernels find it
    by soname; returns its path, or None (a system libcublas may still be found)."""
    import glob
    import importlib.util
    import site

    roots = []
    spec = importlib.util.find_spec("nvidia")
    if spec and spec.submodule_search_locations:
        roots += list(spec.submodule_search_locations)
    roots += [os.path.join(p, "nvidia") for p in site.getsitepackages()]
    for root in roots:
        for sub in ("cu13/lib", "cublas/lib", "cu12/lib"):
            found = sorted(glob.glob(os.path.join(root, sub, "libcublas.so.*")))
            if found:
                for lt in sorted(glob.glob(os.path.join(root, sub, "libcublasLt.so.*"))):
                    ctypes.CDLL(lt, mode=ctypes.RTLD_GLOBAL)
                ctypes.CDLL(found[0], mode=ctypes.RTLD_GLOBAL)
                return found[0]
    return None


def cuda_available() -> bool:
    """Whether a CUDA GPU can be used from TVM here."""
    if not _load_cuda_runtime():
        return False
    import tvm

    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001 - any driver failure means no usable GPU
        return False


def cuda_source_compiler() -> str:
    """What compiles CUDA source shipped in a library at load time: "nvrtc" (default) or
    "nvcc" (env MLC_CUDA_COMPILER)."""
    return os.environ.get("MLC_CUDA_COMPILER", "nvrtc")


def nvrtc_version() -> str | None:
    """NVRTC's version ("13.0") as TVM reaches it (the cuda-bindings package), or None when
    cuda-bindings is missing or cannot load libnvrtc."""
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        return None
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception:  # noqa: BLE001 - a missing libnvrtc surfaces as various errors
        return None
    return f"{major}.{minor}" if err == nvrtc.nvrtcResult.NVRTC_SUCCESS else None


# Cubins that libraries carry for TVM's kernels, by `precompiled_cubin_key` (see
# mlc.compiler.cuda_support.tvm_kernels_object), and what loading CUDA code has cost so far.
_PRECOMPILED_CUBINS: dict[str, bytes] = {}
CUDA_LOAD_STATS = {"compiled": 0, "compile_seconds": 0.0, "precompiled": 0}


def register_library_cubins(lib_path: str | Path) -> bool:
    """Read the precompiled cubin a CUDA library carries (symbols `mlc_tvm_cubin_*`) so that
    loading it needs no NVRTC compile. False for a library without one (an older build, or one
    built without nvcc): TVM's source is then compiled at load, as before."""
    try:
        lib = ctypes.CDLL(str(lib_path))
        key = ctypes.c_char_p(ctypes.addressof(ctypes.c_char.in_dll(lib, "mlc_tvm_cubin_key")))
        begin = ctypes.addressof(ctypes.c_char.in_dll(lib, "mlc_tvm_cubin_begin"))
        end = ctypes.addressof(ctypes.c_char.in_dll(lib, "mlc_tvm_cubin_end"))
    except (OSError, ValueError):
        return False
    _PRECOMPILED_CUBINS[key.value.decode()] = ctypes.string_at(begin, end - begin)
    return True


def precompiled_cubin(key: str) -> bytes | None:
    """The cubin registered under `key` (`precompiled_cubin_key`), if a loaded library had one."""
    return _PRECOMPILED_CUBINS.get(key)


def prepare_library(lib_path: str | Path) -> None:
    """Before TVM loads a library: in a process that runs CUDA, take the cubin it carries."""
    if _register_cuda_compile_callback.cache_info().currsize:
        register_library_cubins(lib_path)


@functools.lru_cache(maxsize=None)
def _register_cuda_compile_callback() -> None:
    """Give TVM the cubin a library carries for its CUDA source, or compile the source with
    NVRTC for this GPU's arch."""
    import time

    import tvm

    try:
        from tvm.support import nvcc
    except ImportError:   # pragma: no cover - very old TVM
        return
    arch = arch_for_compute_capability(tvm.cuda(0).compute_version)

    def compile_cuda(code, *_args):
        cubin = precompiled_cubin(precompiled_cubin_key(arch, code))
        if cubin is not None:
            CUDA_LOAD_STATS["precompiled"] += 1
            return bytearray(cubin)
        t0 = time.perf_counter()
        out = nvcc.compile_cuda(code, target_format="cubin", arch=arch,
                                compiler=cuda_source_compiler())
        CUDA_LOAD_STATS["compiled"] += 1
        CUDA_LOAD_STATS["compile_seconds"] += time.perf_counter() - t0
        return out

    tvm.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)



def parse_runtime_device(device: str):
    """`auto`/`cpu`/`cuda`/`cuda:N` -> (kind, tvm.runtime.Device)."""
    import tvm

    device = (device or "auto").lower()
    base, _, index = device.partition(":")
    if base == "auto":
        return parse_runtime_device("cuda" if cuda_available() else "cpu")
    if base in ("cpu", "llvm"):
        return "cpu", tvm.cpu(0)
    if base == "cuda":
        if not cuda_available():
            raise ModelLoadError(
                "device='cuda' was asked but no CUDA GPU (or NVIDIA driver) is visible here. "
                "Use device='cpu' with a library compiled by `mlc compile --device cpu`.",
                param="device")
        _register_cuda_compile_callback()
        preload_cublas()
        return "cuda", tvm.cuda(int(index) if index.isdigit() else 0)
    raise ModelLoadError(f"Unknown device {device!r}: use auto, cpu, cuda or cuda:N.",
                         param="device")
