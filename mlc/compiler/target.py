"""Device strings (`cpu`, `cuda`, `cuda:sm_90a`, `auto`, ...) -> TVM targets."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from mlc.errors import CompileError
from mlc.support.cuda_arch import arch_for_compute_capability

# What the PyPI TVM wheel can emit (verified for 0.27, see TVM-NOTES.md).
SUPPORTED = ("cpu", "cuda", "opencl", "webgpu")
UNSUPPORTED = {
    "metal": "the PyPI TVM wheel's Metal codegen segfaults on Relax matmuls; build on a Mac "
             "with a TVM built from source",
    "rocm": "the PyPI TVM wheel needs a ROCm install (ld.lld and the ROCm device libraries) "
            "to emit ROCm code; install ROCm or build TVM with ROCm",
    "vulkan": "the PyPI TVM wheel has no Vulkan/SPIR-V codegen; use opencl or webgpu",
    "nvptx": "the PyPI TVM wheel cannot find libdevice for nvptx; use cuda",
}


@dataclass(frozen=True)
class DeviceTarget:
    """A parsed device string: the TVM target dict and what kind of device it is."""

    device: str          # as the user wrote it, normalized (e.g. "cuda:sm_90a")
    kind: str            # "cpu", "cuda", "opencl", "webgpu"
    target: dict
    host: dict | None = None

    def tvm_target(self):
        from tvm.target import Target

        return Target(self.target, host=self.host) if self.host else Target(self.target)

    @property
    def is_gpu(self) -> bool:
        return self.kind != "cpu"


def detect_cuda_arch() -> str | None:
    """The local GPU's arch (sm_90a for Hopper), or None without a GPU."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    cap = out.strip().splitlines()[0].strip() if out.strip() else ""
    if not re.fullmatch(r"\d+\.\d+", cap):
        return None
    return arch_for_compute_capability(cap)


def _cpu_target(mcpu: str = "") -> dict:
    """An llvm target for this machine's triple: for its own CPU, or for `mcpu` (an LLVM CPU
    name such as x86-64-v3, the portable AVX2 baseline, or znver4, sapphirerapids)."""
    from tvm.target import codegen

    triple = codegen.llvm_get_system_triple()
    if mcpu and not codegen.llvm_is_valid_cpu(mcpu, triple):
        raise CompileError(
            f"Unknown CPU {mcpu!r} for {triple}: use an LLVM CPU name, e.g. cpu:x86-64-v3 "
            "(any AVX2 CPU), cpu:x86-64-v4 (AVX-512), cpu:znver4, cpu:sapphirerapids, or plain "
            "cpu for this machine.", param="device")
    return {"kind": "llvm", "mtriple": triple, "mcpu": mcpu or codegen.llvm_get_system_cpu()}


def parse_device(device: str) -> DeviceTarget:
    """Parse a device string; errors name the accepted forms and why a backend is missing."""
    device = (device or "auto").strip().lower()
    base, _, arch = device.partition(":")
    if base == "auto":
        arch = detect_cuda_arch()
        return parse_device(f"cuda:{arch}" if arch else "cpu")
    if base in ("cpu", "llvm"):
        return DeviceTarget(f"cpu:{arch}" if arch else "cpu", "cpu", _cpu_target(arch))
    if base in UNSUPPORTED:
        raise CompileError(f"Device {base!r} cannot be built here: {UNSUPPORTED[base]}.",
                           param="device")
    if base == "cuda":
        arch = arch or detect_cuda_arch()
        if not arch:
            raise CompileError(
                "No local GPU to read the CUDA arch from: say it, e.g. --device cuda:sm_90a "
                "(H100) or --device cuda:sm_80 (A100).", param="device")
        if not re.fullmatch(r"sm_\d{2,3}a?", arch):
            raise CompileError(f"Bad CUDA arch {arch!r}: use the form sm_80, sm_89, sm_90a.",
                               param="device")
        if int(re.sub(r"\D", "", arch)) < 70:
            raise CompileError(f"CUDA arch {arch} is too old: mlc needs sm_70 or newer.",
                               param="device")
        target = {"kind": "cuda", "arch": arch, "max_threads_per_block": 1024,
                  "max_num_threads": 1024, "thread_warp_size": 32,
                  "max_shared_memory_per_block": 49152}
        return DeviceTarget(f"cuda:{arch}", "cuda", target, _cpu_target())
    if base == "opencl":
        return DeviceTarget("opencl", "opencl", {"kind": "opencl"}, _cpu_target())
    if base == "webgpu":
        return DeviceTarget("webgpu", "webgpu", {"kind": "webgpu"},
                            {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"})
    raise CompileError(
        f"Unknown device {device!r}. Use one of: auto, cpu, cpu:MCPU, cuda, cuda:sm_XX, opencl, webgpu "
        f"(not buildable with the PyPI TVM wheel: {', '.join(UNSUPPORTED)}).", param="device")
