"""CUDA specifics of building: mlc's own CUDA kernels (q4 GEMV/GEMM, cuBLAS, attention).

Every `cuda_kernels/*.cu` is compiled with nvcc into an object that is linked into every CUDA
model library, so the library registers its kernels itself when TVM loads it. Without nvcc
the library still builds, with TVM-generated kernels only (and says so).

Several libraries load into one process (a target model and its draft): each library calls
its kernels as `mlc.cuda.<KERNEL_DIGEST>.<name>` (`kernel_function`), the digest naming the
kernel sources, so libraries built from different kernel code never call each other's, and
libraries with identical code share one registration (`RegisterKernel` in cuda_check.h:
registered once, a second registration skipped, the registering library pinned in memory).
`mlc.cuda.<name>` is also registered, by the first library only, for benchmarks and tests.

TVM 0.27 keeps the CUDA *source* of its own generated kernels in a library built on a machine
without a GPU, and compiles it (NVRTC) every time the library is loaded: seconds per load. When
nvcc is here, `tvm_kernels_object` compiles that source into a cubin at build time and links it
into the library under `mlc_tvm_cubin_*` symbols, keyed by the arch and the source's digest; the runtime's
compile callback (`mlc.runtime.device`) returns it instead of compiling when the digest matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from mlc.compiler.target import DeviceTarget
from mlc.errors import CompileError
from mlc.support.cuda_arch import precompiled_cubin_key
from mlc.support.paths import cache_root

KERNEL_DIR = Path(__file__).with_name("cuda_kernels")
ARCHS = ("80", "86", "89", "90a")


def nvcc_path() -> str | None:
    cuda = os.environ.get("CUDA_PATH") or os.environ.get("CUDA_HOME")
    if cuda and Path(cuda, "bin", "nvcc").exists():
        return str(Path(cuda, "bin", "nvcc"))
    return shutil.which("nvcc")


def kernels_available() -> bool:
    """Whether mlc's CUDA kernels can be built here (nvcc and the static CUDA runtime found,
    MLC_CUDA_KERNELS not 0); without them CUDA libraries use TVM's kernels only."""
    if os.environ.get("MLC_CUDA_KERNELS", "1") == "0" or nvcc_path() is None:
        return False
    try:
        cudart_static(nvcc_path())
    except CompileError:
        return False
    return True


def cuda_kernels_enabled(dev: DeviceTarget) -> bool:
    """Whether this build uses mlc's CUDA kernels."""
    return dev.kind == "cuda" and kernels_available()


def _cuda_root(nvcc: str) -> Path:
    return Path(os.path.realpath(_real_nvcc(nvcc))).parent.parent


def _real_nvcc(nvcc: str) -> str:
    # some installs put a wrapper script on PATH: follow `exec /path/to/nvcc`
    try:
        text = Path(nvcc).read_text(errors="ignore")[:2000]
    except OSError:
        return nvcc
    for token in text.split():
        if token.endswith("/nvcc") and Path(token).exists() and token != nvcc:
            return token
    return nvcc


def kernel_sources() -> list[Path]:
    return sorted(KERNEL_DIR.glob("*.cu"))


def _kernel_digest() -> str:
    h = hashlib.sha256()
    for path in sorted([*KERNEL_DIR.glob("*.cu"), *KERNEL_DIR.glob("*.h")]):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


KERNEL_DIGEST = _kernel_digest()


def kernel_function(name: str) -> str:
    """The global function a library built now calls for mlc's kernel `name`."""
    return f"mlc.cuda.{KERNEL_DIGEST}.{name}"


def build_kernel_objects(arch: str, cache_dir: Path) -> list[Path]:
    """Compile each kernel source for `arch` (e.g. sm_90a) once; cached by source hash."""
    return [compile_object(src, arch, cache_dir) for src in kernel_sources()]


def compile_object(source_path: Path, arch: str, cache_dir: Path) -> Path:
    """nvcc one CUDA source (which may include mlc's kernel headers, e.g. cuda_check.h) into
    a position-independent object for `arch`; cached by source and header hash."""
    import tvm_ffi

    nvcc = nvcc_path()
    digest = hashlib.sha256(source_path.read_bytes() + arch.encode() + KERNEL_DIGEST.encode())
    for header in sorted(KERNEL_DIR.glob("*.h")):     # the sources include these
        digest.update(header.read_bytes())
    key = digest.hexdigest()[:16]
    out = cache_dir / f"mlc-{source_path.stem}-{arch}-{key}.o"
    if out.exists():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    include = Path(tvm_ffi.__file__).parent / "include"
    num = arch.replace("sm_", "")
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    cmd = [nvcc, "-c", "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-I", str(include),
           "-I", str(KERNEL_DIR), f'-DMLC_KERNEL_DIGEST="{KERNEL_DIGEST}"',
           "-gencode", f"arch=compute_{num},code=sm_{num}", str(source_path), "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompileError(f"nvcc failed to build mlc's CUDA kernels ({source_path.name}):\n"
                           f"{proc.stderr[-2000:]}\nSet MLC_CUDA_KERNELS=0 to build without them.")
    os.replace(tmp, out)
    return out


def cudart_static(nvcc: str) -> Path:
    """The static CUDA runtime, linked in so the library needs no libcudart at load time."""
    root = _cuda_root(nvcc)
    for d in (root / "lib64", root / "lib", root / "targets" / "x86_64-linux" / "lib"):
        if (d / "libcudart_static.a").exists():
            return d / "libcudart_static.a"
    raise CompileError(f"libcudart_static.a not found under {root}; set CUDA_PATH.")


def tvm_cuda_source(ex) -> str | None:
    """The CUDA source of TVM's generated kernels inside a built executable, if any."""
    pending = [ex.mod]
    while pending:
        mod = pending.pop()
        if mod.kind == "cuda":
            return mod.inspect_source("cuda") or None
        pending.extend(mod.imports)
    return None


def tvm_kernels_object(ex, dev: DeviceTarget, cache_dir: Path) -> Path | None:
    """An object holding the cubin of TVM's kernels (nvcc, cached by source digest) under the
    symbols `mlc_tvm_cubin_key` / `_begin` / `_end`; None when there is no CUDA source."""
    code = tvm_cuda_source(ex)
    if code is None:
        return None
    import tvm
    from tvm.support import nvcc as tvm_nvcc

    arch = dev.target["arch"]
    key = precompiled_cubin_key(arch, code)
    stem = f"tvm-{key.replace(':', '-')}"
    cubin = cache_dir / f"{stem}.cubin"
    if not cubin.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("CUDA_PATH", str(_cuda_root(nvcc_path())))
        with tvm.target.Target({"kind": "cuda", "arch": arch}):
            data = tvm_nvcc.compile_cuda(code, target_format="cubin", arch=arch,
                                         compiler="nvcc")
        tmp = cubin.with_name(f"{cubin.name}.{os.getpid()}.tmp")
        tmp.write_bytes(bytes(data))
        os.replace(tmp, cubin)
    obj = cache_dir / f"{stem}.o"
    if not obj.exists():
        asm = cache_dir / f"{stem}.S"
        # .incbin keeps the (megabytes of) cubin out of a C array the compiler would parse
        asm.write_text(
            '\t.section .rodata\n\t.balign 64\n'
            '\t.globl mlc_tvm_cubin_key\nmlc_tvm_cubin_key:\n'
            f'\t.asciz "{key}"\n\t.balign 64\n'
            '\t.globl mlc_tvm_cubin_begin\nmlc_tvm_cubin_begin:\n'
            f'\t.incbin "{cubin}"\n'
            '\t.globl mlc_tvm_cubin_end\nmlc_tvm_cubin_end:\n'
            '\t.byte 0\n\t.section .note.GNU-stack,"",@progbits\n')
        tmp = obj.with_name(f"{obj.name}.{os.getpid()}.tmp")
        proc = subprocess.run([shutil.which("cc") or "gcc", "-c", str(asm), "-o", str(tmp)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise CompileError(f"Could not assemble the precompiled TVM kernels: "
                               f"{proc.stderr[-1000:]}")
        os.replace(tmp, obj)
    return obj


@contextlib.contextmanager
def precompiled_cuda(dev: DeviceTarget, ex=None):
    """Yields the extra `export_library` arguments that link mlc's kernels in (and, given the
    executable, the cubin of TVM's own kernels)."""
    if not cuda_kernels_enabled(dev):
        yield {}
        return
    objs = build_kernel_objects(dev.target["arch"], cache_root() / "kernels")
    tvm_obj = tvm_kernels_object(ex, dev, cache_root() / "kernels") if ex is not None else None
    if tvm_obj is not None:
        objs.append(tvm_obj)
    # archives go after the objects that use them: pass it as a file, not as -l
    yield {"addons": [*map(str, objs), str(cudart_static(nvcc_path()))],
           "options": ["-ldl", "-lrt", "-lpthread"]}
