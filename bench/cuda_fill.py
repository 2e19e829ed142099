"""Random tensors made on the GPU for the benchmark scripts (bench/cuda/fill_random.cu): built
once with nvcc into a small shared library (cached beside mlc's kernel objects) and loaded,
which registers `mlc.bench.fill_random(tensor, seed, lo, hi)`."""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("cuda") / "fill_random.cu"


def load_fill_random(arch: str):
    """`mlc.bench.fill_random` for a GPU of `arch` (e.g. "sm_90a")."""
    import tvm
    import tvm_ffi

    from mlc.compiler.cuda_support import compile_object, cudart_static, nvcc_path
    from mlc.support.paths import cache_root

    cache = cache_root() / "kernels"
    obj = compile_object(SOURCE, arch, cache)
    lib = obj.with_suffix(".so")
    if not lib.exists():
        ffi_lib = Path(tvm_ffi.__file__).parent / "lib"
        tmp = lib.with_name(f"{lib.name}.{os.getpid()}.tmp")
        subprocess.run([nvcc_path(), "-shared", "-o", str(tmp), str(obj),
                        str(cudart_static(nvcc_path())), "-L", str(ffi_lib), "-ltvm_ffi",
                        "-Xlinker", f"-rpath,{ffi_lib}", "-ldl", "-lrt", "-lpthread"],
                       check=True)
        os.replace(tmp, lib)
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)   # its static initializer registers it
    return tvm.get_global_func("mlc.bench.fill_random")
